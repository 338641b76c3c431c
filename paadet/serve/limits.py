"""What a request may send: body size, image size read from the header, the API key.

The pixel count is read with Pillow from the file's header (``Image.open`` parses only the header)
before OpenCV decodes anything, so a small file that would decode to a huge image (a decompression
bomb) costs a header parse, not gigabytes. Whatever Pillow raises on a header is the client's bad input
(400), whichever of its forty-odd format parsers raised it and however (``NotImplementedError``,
``AttributeError``, ``struct.error``, ...): a 500 is kept for the server's own faults.
"""

from __future__ import annotations

import hmac
import io
import warnings


class RequestError(Exception):
    """A request the service refuses: ``status`` and a one-line ``message`` for ``{"error": ...}``."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


def image_size_from_header(data: bytes, max_pixels: int) -> tuple[int, int]:
    """``(width, height)`` from the encoded image's header, without decoding its pixels.

    Raises:
        RequestError: 400 when the data is empty or its header is not an image Pillow knows; 413 when
            ``width * height > max_pixels``.
    """
    if not data:
        raise RequestError(400, "empty body: send the image file's bytes, or a multipart form with the field 'image'")
    from PIL import Image, UnidentifiedImageError

    # Pillow refuses (DecompressionBombError) images over 2 * MAX_IMAGE_PIXELS already at open(); keep that
    # threshold above ours so that such a refusal always means "over max_pixels".
    if Image.MAX_IMAGE_PIXELS is not None and max_pixels > Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # DecompressionBombWarning, and a malformed file's warnings
            with Image.open(io.BytesIO(data)) as image:  # lazy: reads the header only
                width, height = image.size
    except Image.DecompressionBombError:
        raise RequestError(413, f"image has more than {max_pixels} pixels") from None
    except Exception as exc:  # any parser's failure on the client's bytes is a bad request
        name = "not an image Pillow knows" if isinstance(exc, UnidentifiedImageError) else type(exc).__name__
        raise RequestError(400, f"not an image, or an unreadable one ({name})") from None
    if width * height > max_pixels:
        raise RequestError(413, f"image is {width}x{height} = {width * height} pixels, over the limit of {max_pixels}")
    return width, height


def check_api_key(expected: str | None, authorization: str | None, x_api_key: str | None) -> None:
    """Raise 401 unless ``expected`` is None or one of the headers carries it (constant-time compare)."""
    if expected is None:
        return
    given = x_api_key
    if given is None and authorization and authorization.lower().startswith("bearer "):
        given = authorization[7:].strip()
    if given is None or not hmac.compare_digest(given.encode(), expected.encode()):
        raise RequestError(
            401,
            "missing or wrong API key (send 'Authorization: Bearer KEY' or 'X-API-Key: KEY')",
            {"WWW-Authenticate": "Bearer"},
        )
