"""``paadet serve``: an HTTP detection service with dynamic batching (``pip install "paadet[serve]"``).

Example (mount the ASGI app in your own server)::

    from paadet import Detector
    from paadet.serve import ServeSettings, create_app
    app = create_app(Detector.from_checkpoint("paa.pth", device="cpu"), ServeSettings(max_batch=4))
    # uvicorn.run(app, host="127.0.0.1", port=8000)
"""

from __future__ import annotations

from paadet.serve.settings import ServeSettings

__all__ = ["ServeSettings", "create_app"]


def __getattr__(name: str):
    if name == "create_app":  # lazy: Starlette is imported only when the app is built
        from paadet.serve.app import create_app

        return create_app
    raise AttributeError(f"module 'paadet.serve' has no attribute {name!r}")
