"""Runtime backends: PyTorch (CPU, CUDA), ONNX Runtime and OpenVINO (``openvino_backend``, optional extra)."""
from .base import Backend, StageTimer
from .torch_backend import TorchBackend

__all__ = ["Backend", "StageTimer", "TorchBackend"]
