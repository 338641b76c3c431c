"""Receiving a detect request's body: its deadline, its size limit, the bytes budget, and the multipart form.

A body is received *before* the request is admitted to the batcher, so a client that trickles its body
holds no admission slot (``max_queue``), only its connection, for at most ``read_timeout_s`` (then 408).
The bodies still arriving share a byte budget of ``max_queue * max_bytes`` (503 beyond), which keeps
memory bounded without an admission slot per body.
"""

from __future__ import annotations

import asyncio

from starlette.requests import ClientDisconnect, Request

from paadet.serve.limits import RequestError
from paadet.serve.settings import ServeSettings


class Receiving:
    """The detect requests whose bodies are arriving: how many, and the bytes they hold (for the budget)."""

    def __init__(self, settings: ServeSettings) -> None:
        self.settings = settings
        self.budget = settings.max_queue * settings.max_bytes
        self.requests = 0
        self.bytes = 0

    def count(self) -> int:
        """Detect requests whose bodies are arriving now (the ``paadet_receiving_requests`` gauge)."""
        return self.requests

    async def body(self, request: Request) -> bytes:
        """The raw body, received within ``read_timeout_s`` of the request's headers.

        Raises:
            RequestError: 413 past ``max_bytes``; 408 past ``read_timeout_s`` (and the connection is closed);
                503 when the bodies arriving together would exceed the budget; 400 when the client hung up.
        """
        max_bytes, timeout = self.settings.max_bytes, self.settings.read_timeout_s
        length = request.headers.get("content-length")
        if length is not None and length.strip().isdigit() and int(length) > max_bytes:
            raise RequestError(413, f"body of {int(length)} bytes is over the limit of {max_bytes}")
        chunks: list[bytes] = []
        held = 0

        async def read() -> None:
            nonlocal held
            async for chunk in request.stream():
                if held + len(chunk) > max_bytes:
                    raise RequestError(413, f"body is over the limit of {max_bytes} bytes")
                if self.bytes + len(chunk) > self.budget:
                    raise RequestError(
                        503,
                        "too many request bodies arriving at once; retry later",
                        {"Retry-After": str(self.settings.retry_after_s), "Connection": "close"},
                    )
                self.bytes += len(chunk)
                held += len(chunk)
                chunks.append(chunk)

        self.requests += 1
        try:
            await asyncio.wait_for(read(), timeout)
        except asyncio.TimeoutError:
            raise RequestError(
                408,
                f"the request body did not arrive within --read-timeout-s {timeout:g} s ({held} bytes came)",
                {"Connection": "close"},
            ) from None
        except ClientDisconnect:
            raise RequestError(400, "the client disconnected before its body arrived") from None
        finally:
            self.requests -= 1
            self.bytes -= held
        return b"".join(chunks)


async def image_from_body(request: Request, body: bytes) -> bytes:
    """The image's bytes: ``body`` itself, or the ``image`` field of a multipart form (400 if it has none)."""
    if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
        return body
    sent = False

    async def replay() -> dict:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    form_request = Request(request.scope, replay)
    try:
        form = await form_request.form(max_files=1, max_fields=16, max_part_size=64 * 1024)
    except Exception as exc:
        raise RequestError(400, f"unreadable multipart form: {exc}") from None
    try:
        field = form.get("image")
        if field is None or isinstance(field, str):
            raise RequestError(400, "the multipart form has no file field 'image'")
        return await field.read()
    finally:
        await form.close()
