"""Runtime backends: PyTorch (CPU, CUDA) and ONNX Runtime."""
from .base import Backend, StageTimer
from .torch_backend import TorchBackend

__all__ = ["Backend", "StageTimer", "TorchBackend"]
