"""``paadet serve``'s console: the start-up line, and one access-log line per request.

- :func:`startup_line`: what is being served (model, classes, preset, backend, device, limits), logged once
  the model is loaded.
- :class:`AccessLog`: an ASGI middleware that logs, when a request's answer is complete, one line with the
  client, the method and path, the status, the milliseconds from the request to the end of the answer, and
  for ``POST /v1/detect`` the size of the batch the image ran in (``X-Batch-Size``). It logs at INFO level
  on :data:`ACCESS_LOGGER` (``--access-log``, the default; ``--no-access-log`` or ``--log-level warning``
  silences it).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from paadet.serve.settings import ServeSettings

ACCESS_LOGGER = "paadet.serve.access"
"""The logger of the access lines (``paadet serve`` sends it to stdout, as uvicorn's own access log)."""

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


def startup_line(described: dict, classes: int, settings: ServeSettings) -> str:
    """``serving PAA R101-FPN (80 classes) at preset mmdet on torch cpu fp32; limits: ...`` from a backend's
    ``describe()``, its class count and the limits."""
    parts = [f"serving {described.get('architecture', 'PAA')} ({classes} classes)"]
    parts.append(f"at preset {described.get('preset', '?')} on {described.get('backend', '?')}")
    for key in ("device", "precision"):
        if described.get(key):
            parts.append(str(described[key]))
    limits = (
        f"batches of <= {settings.max_batch} (wait <= {settings.max_wait_ms:g} ms), queue <= {settings.max_queue}, "
        f"body <= {settings.max_bytes} bytes, <= {settings.max_pixels} pixels, answer within {settings.timeout_s:g} s, "
        f"API key {'required' if settings.api_key else 'not required'}"
    )
    return " ".join(parts) + f"; limits: {limits}"


class AccessLog:
    """ASGI middleware: one INFO line on :data:`ACCESS_LOGGER` per HTTP request, once its answer is sent."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
        self.app = app
        self.log = logging.getLogger(ACCESS_LOGGER)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.log.isEnabledFor(logging.INFO):
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        answer: dict[str, Any] = {"status": 500, "batch": None}

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                answer["status"] = message["status"]
                for name, value in message.get("headers", ()):
                    if name.lower() == b"x-batch-size":
                        answer["batch"] = value.decode("latin-1")
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            client = scope.get("client")
            where = f"{client[0]}:{client[1]}" if client else "-"
            batch = f" batch {answer['batch']}" if answer["batch"] is not None else ""
            self.log.info(
                '%s "%s %s" %d %.1f ms%s',
                where,
                scope.get("method", "-"),
                scope.get("path", "-"),
                answer["status"],
                1000.0 * (time.perf_counter() - started),
                batch,
            )
