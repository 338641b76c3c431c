"""paadet: the PAA object detector in pure PyTorch, with mmdetection parity, ONNX export and fast inference."""
from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["Detector", "ImageResult", "__version__"]


def __getattr__(name: str):
    # Lazy so that light modules (paadet.testing, paadet.model) import without the runtime stack.
    if name in ("Detector", "ImageResult"):
        from . import detector

        return getattr(detector, name)
    raise AttributeError(f"module 'paadet' has no attribute {name!r}")
