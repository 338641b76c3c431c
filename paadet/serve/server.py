"""``paadet serve``'s own HTTP server: its listening sockets, and uvicorn's protocol with a connection guard.

- :func:`bind_sockets` binds ``--host``/``--port`` before the model loads, so a port already in use is a
  one-line error (exit status 2), not uvicorn's log line after the model has loaded.
- :func:`guarded_protocol` is uvicorn's HTTP protocol (httptools, else h11) with what uvicorn lacks
  against slow and greedy clients:

  * a header deadline: a request's headers must arrive within ``read_timeout_s`` of the connection
    opening (or of its first byte, on a kept-alive connection), else ``408`` and the connection closes
    (an idle connection that sent nothing is closed without an answer). The body's deadline is the app's
    (:mod:`paadet.serve.receive`), from the headers on.
  * headers of at most :data:`MAX_HEAD_BYTES` (``431`` beyond), and a request that cannot be parsed
    answered ``400`` in JSON (uvicorn answers it in plain text);
  * ``max_connections`` open connections at most: one more is answered ``503`` at once, before it is read.

  Each refusal is ``{"error": "one line"}`` with ``Connection: close``.
  * every close the server starts (a refusal, or an answer with ``Connection: close`` such as the app's
    body-deadline ``408``) is a lingering close: the answer is flushed with a FIN, the connection's further
    input is discarded, and it closes when the client does or after :data:`LINGER_S`. Closing at once while
    the client still sends would make the kernel answer with a reset, which discards the answer unread.
- :func:`make_server` / :func:`run_server` run the app on those sockets with that protocol.
"""

from __future__ import annotations

import asyncio
import copy
import errno
import json
import logging
import socket
from typing import Any

from paadet.serve.settings import ServeSettings

MAX_HEAD_BYTES = 64 * 1024
"""Largest request head (request line and headers) read before answering 431."""
LINGER_S = 2.0
"""How long a refused connection stays open (its input discarded) so that the client reads the answer."""

log = logging.getLogger("uvicorn.error")

_REASONS = {
    400: "Bad Request",
    408: "Request Timeout",
    431: "Request Header Fields Too Large",
    503: "Service Unavailable",
}


def bind_sockets(host: str, port: int) -> list[socket.socket]:
    """TCP sockets bound to every address of ``host`` (as asyncio's ``create_server`` would bind them).

    They listen only once the server starts (until then a client is refused, not left waiting).

    Raises:
        RuntimeError: one line naming the address when it cannot be resolved or bound (a port in use).
    """
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise RuntimeError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _name, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6 and hasattr(socket, "IPPROTO_IPV6"):
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
    except OSError as exc:
        for sock in sockets:
            sock.close()
        hint = " (another process listens there: stop it or choose another --port)"
        raise RuntimeError(
            f"cannot listen on {host}:{port}: {exc.strerror or exc}{hint if exc.errno == errno.EADDRINUSE else ''}"
        ) from None
    return sockets


class _LingeringTransport:
    """The connection's transport as uvicorn's protocol sees it: ``close()`` is the guard's lingering close."""

    def __init__(self, transport: asyncio.Transport, guard: _Guard) -> None:
        self._transport = transport
        self._guard = guard

    def close(self) -> None:
        self._guard._close_lingering()

    def is_closing(self) -> bool:
        return self._transport.is_closing() or self._guard._linger is not None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class _Guard:
    """The connection guard (see the module docstring), mixed into one of uvicorn's HTTP protocols."""

    read_timeout_s: float = 30.0
    max_connections: int = 512
    # uvicorn's protocol sets these
    transport: asyncio.Transport
    loop: asyncio.AbstractEventLoop
    connections: set
    cycle: Any

    def connection_made(self, transport: asyncio.Transport) -> None:
        self._refused = False
        self._head_timer: asyncio.TimerHandle | None = None
        self._linger: asyncio.TimerHandle | None = None
        self._shutting_down = False
        self._head_bytes = 0
        self._head_of: Any = None
        self._raw = transport
        super().connection_made(_LingeringTransport(transport, self))  # type: ignore[misc]
        open_connections = sum(1 for c in self.connections if not getattr(c, "_refused", False))
        if open_connections > self.max_connections:
            self._refuse(
                503,
                f"too many open connections (--max-connections {self.max_connections}); retry later",
                {"Retry-After": "1"},
            )
            return
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # lingering: the answer is sent, the rest is discarded
        if self._head_timer is None and (self.cycle is None or self.cycle.response_complete):
            self._arm()  # the first bytes of the next request on a kept-alive connection
        if self._head_timer is not None:
            self._head_bytes += len(data)
        super().data_received(data)  # type: ignore[misc]
        if self._head_timer is None or self._refused:
            return
        if self.cycle is not self._head_of:  # its headers are complete: the app has the request now
            self._disarm()
        elif self._head_bytes > MAX_HEAD_BYTES and not self.transport.is_closing():
            self._refuse(431, f"the request's headers are over {MAX_HEAD_BYTES} bytes")

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a request it cannot parse, as one-line JSON like every other refusal."""
        self._refuse(400, f"invalid HTTP request: {msg}")

    def shutdown(self) -> None:
        """The server stops: close at once (no lingering), answering what is in flight as uvicorn does."""
        self._shutting_down = True
        super().shutdown()  # type: ignore[misc]

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
        super().connection_lost(exc)  # type: ignore[misc]

    def _arm(self) -> None:
        self._disarm()
        self._head_bytes = 0
        self._head_of = self.cycle
        self._head_timer = self.loop.call_later(self.read_timeout_s, self._head_timed_out)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing() or self._refused or self.cycle is not self._head_of:
            return
        if self._head_bytes == 0:  # an idle connection: nothing to answer
            self._raw.close()
            return
        self._refuse(408, f"the request's headers did not arrive within --read-timeout-s {self.read_timeout_s:g} s")

    def _refuse(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        self._disarm()
        self._refused = True
        body = json.dumps({"error": message}).encode()
        lines = [
            f"HTTP/1.1 {status} {_REASONS[status]}",
            "content-type: application/json",
            f"content-length: {len(body)}",
            "connection: close",
            *(f"{name}: {value}" for name, value in (headers or {}).items()),
        ]
        self._raw.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        self._close_lingering()

    def _close_lingering(self) -> None:
        """Flush what was written with a FIN, discard further input, close when the client does or after
        :data:`LINGER_S`."""
        raw = self._raw
        if raw.is_closing() or self._linger is not None:
            return
        if self._shutting_down or not raw.can_write_eof():
            raw.close()
            return
        self._disarm()
        self._refused = True  # data_received discards from now on
        raw.write_eof()
        self._linger = self.loop.call_later(LINGER_S, raw.close)
        if not raw.is_reading():
            raw.resume_reading()  # read (and discard) rather than leave input for a reset


def guarded_protocol(settings: ServeSettings, base: type[asyncio.Protocol] | None = None) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol class ``base`` (default: its ``auto`` choice) with the connection guard."""
    if base is None:
        from uvicorn.protocols.http.auto import AutoHTTPProtocol

        base = AutoHTTPProtocol
    attributes = {"read_timeout_s": settings.read_timeout_s, "max_connections": settings.max_connections}
    return type(f"Guarded{base.__name__}", (_Guard, base), attributes)


def make_server(
    app: Any, settings: ServeSettings, log_level: str = "info", http: type[asyncio.Protocol] | None = None
) -> Any:
    """A ``uvicorn.Server`` for ``app`` with the guarded protocol; run it with ``.run(sockets=...)``.

    ``http`` is the uvicorn protocol to guard (default: uvicorn's choice, httptools when it is installed, else h11).

    uvicorn drains on SIGTERM (stops accepting, answers what is in flight, runs the app's lifespan shutdown,
    which drains the batcher) within ``timeout_s + read_timeout_s + 5`` seconds.
    """
    import uvicorn

    config = uvicorn.Config(
        app,
        log_level=log_level,
        log_config=log_config(log_level),
        access_log=False,
        timeout_graceful_shutdown=int(settings.timeout_s + settings.read_timeout_s) + 5,
        lifespan="on",
        http=guarded_protocol(settings, http),
        h11_max_incomplete_event_size=2 * MAX_HEAD_BYTES,  # h11's own limit (16 KiB) would answer in plain text
    )

    class Server(uvicorn.Server):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets)
            for sock in sockets or []:  # uvicorn says where it listens only for the sockets it bound itself
                host, port = sock.getsockname()[:2]
                log.info("paadet serve: listening on http://%s:%d", f"[{host}]" if ":" in host else host, port)

    return Server(config)


def log_config(log_level: str) -> dict:
    """uvicorn's logging configuration plus paadet's loggers at ``log_level``: ``paadet.serve`` (start-up line,
    errors) on stderr as uvicorn's own log, ``paadet.serve.access`` (a line per request) on stdout as
    uvicorn's access log."""
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config["formatters"]["paadet"] = {"()": "uvicorn.logging.DefaultFormatter", "fmt": "%(levelprefix)s %(message)s"}
    config["handlers"]["paadet_access"] = {
        "formatter": "paadet",
        "class": "logging.StreamHandler",
        "stream": "ext://sys.stdout",
    }
    level = log_level.upper()
    config["loggers"]["paadet.serve"] = {"handlers": ["default"], "level": level, "propagate": False}
    config["loggers"]["paadet.serve.access"] = {"handlers": ["paadet_access"], "level": level, "propagate": False}
    return config


def run_server(app: Any, sockets: list[socket.socket], settings: ServeSettings, log_level: str) -> bool:
    """Serve ``app`` on ``sockets`` (from :func:`bind_sockets`) until SIGTERM or Ctrl-C; True if it started.

    OpenCV's own log is silenced in this process: it would print lines for every malformed image a client
    sends, each of which is answered 400 with its reason already.
    """
    from cv2.utils import logging as cv_logging

    cv_logging.setLogLevel(cv_logging.LOG_LEVEL_SILENT)
    server = make_server(app, settings, log_level)
    server.run(sockets=sockets)
    return server.started
