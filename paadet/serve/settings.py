"""The one dataclass of ``paadet serve``'s settings, with its defaults (passed down, never re-read)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServeSettings:
    """How the service batches, what it admits, and how long it waits.

    Attributes:
        max_batch: images per network call at most.
        max_wait_ms: how long the first image of a batch waits for others of its padded shape.
        max_queue: detect requests admitted at once (decoding, queued or running). A request is admitted
            once its whole body has arrived, so slow senders never hold a slot; one more is answered 503
            with ``Retry-After``. The bodies still arriving share a budget of ``max_queue * max_bytes``
            bytes (503 beyond), so memory stays bounded by about ``2 * max_queue * max_bytes`` of bodies
            plus ``workers`` full decodes.
        max_bytes: largest request body (413 beyond).
        max_pixels: largest image, width x height, read from the file's header before decoding (413 beyond).
        timeout_s: an admitted detect request (its body received) not answered by then gets 504.
        read_timeout_s: a request's body must arrive within this many seconds of its headers (408 beyond);
            on ``paadet serve``'s own server, its headers too, within this many seconds of the connection
            opening or of the first byte after the previous answer.
        max_connections: open connections at most on ``paadet serve``'s own server; one more is answered
            503 and closed at once, before it is read. (Not applied by :func:`create_app` alone, nor behind
            Ray Serve's proxy.)
        workers: threads that check, decode and resize images (never the event loop).
        api_key: when set, ``POST /v1/detect`` needs ``Authorization: Bearer KEY`` or ``X-API-Key: KEY``.
        retry_after_s: the ``Retry-After`` of a 503.
        access_log: log one line per request (:class:`paadet.serve.access.AccessLog`, at INFO level).
    """

    max_batch: int = 4
    max_wait_ms: float = 10.0
    max_queue: int = 64
    max_bytes: int = 50 * 1024 * 1024
    max_pixels: int = 64_000_000
    timeout_s: float = 30.0
    workers: int = 2
    api_key: str | None = None
    retry_after_s: int = 1
    read_timeout_s: float = 30.0
    max_connections: int = 512
    access_log: bool = True

    def __post_init__(self) -> None:
        for name in (
            "max_batch",
            "max_queue",
            "max_bytes",
            "max_pixels",
            "workers",
            "retry_after_s",
            "max_connections",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {self.max_wait_ms}")
        for name in ("timeout_s", "read_timeout_s"):
            if not 0 < getattr(self, name) < float("inf"):
                raise ValueError(f"{name} must be a finite number > 0, got {getattr(self, name)}")
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key must not be empty (use None for no key)")
