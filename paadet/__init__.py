"""paadet: the PAA object detector in pure PyTorch, with mmdetection parity, ONNX export and fast inference."""
from __future__ import annotations

import os

# Intel MKL's multi-threaded GEMMs are not reproducible from run to run on some CPUs unless
# Conditional Numerical Reproducibility is on. On a 2-core Xeon with AMX, torch's backward of a 3x3
# convolution on a 1x1 map (PAA's P7 level) gave 2 or 3 different input gradients in 300 calls.
# That broke bit-identical training resumes. MKL reads this variable at its first call, so it is set
# here, before paadet uses torch. A user's own setting wins. It did not change a training iteration's
# time measurably (0.435-0.441 s either way; docs/benchmarks.md).
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

__version__ = "0.1.0"
__all__ = ["Detector", "ImageResult", "__version__"]


def __getattr__(name: str):
    # Lazy so that light modules (paadet.testing, paadet.model) import without the runtime stack.
    if name in ("Detector", "ImageResult"):
        from . import detector

        return getattr(detector, name)
    raise AttributeError(f"module 'paadet' has no attribute {name!r}")
