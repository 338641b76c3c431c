"""Runtime backends: PyTorch (CPU, CUDA), ONNX Runtime and OpenVINO (``openvino_backend``, optional extra).

``TorchBackend`` is imported on first use, so that the exported-graph backends (ONNX Runtime, OpenVINO)
load without torch.
"""
from .base import Backend, StageTimer

__all__ = ["Backend", "StageTimer", "TorchBackend"]


def __getattr__(name: str):
    if name == "TorchBackend":
        from .torch_backend import TorchBackend

        return TorchBackend
    raise AttributeError(f"module 'paadet.runtime' has no attribute {name!r}")
