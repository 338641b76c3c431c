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

from paadet.version import __version__

__all__ = ["Detector", "DetectorSpec", "ImageResult", "__version__"]

_LAZY = {"Detector": "paadet.detector", "DetectorSpec": "paadet.runtime.spec", "ImageResult": "paadet.detections"}


def __getattr__(name: str):
    # Lazy so that light modules (paadet.model, paadet.data) import without the runtime stack.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'paadet' has no attribute {name!r}")
