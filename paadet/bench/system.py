"""What a benchmark ran on: the CPU, its cores, the GPU, and the versions of paadet and its runtimes."""

from __future__ import annotations

import os
import platform
from typing import Any

from paadet.cpu import cpu_model, usable_cores
from paadet.version import __version__


def hardware_info(device: str) -> dict[str, Any]:
    """CPU model and cores, PyTorch's thread count, and the GPU's name when the device is CUDA."""
    import torch

    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "cpu_cores_usable": usable_cores(),
        "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY") or "OpenMP's default (spin, then sleep)",
        "platform": platform.platform(),
        "gpu": None,
    }
    dev = torch.device(device)
    if dev.type == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(dev)
        info.update(
            gpu=props.name,
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            gpu_multiprocessors=props.multi_processor_count,
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
        )
    return info


def _version_of(module: str) -> str | None:
    try:
        return getattr(__import__(module), "__version__", "unknown")
    except ImportError:
        return None


def versions() -> dict[str, str | None]:
    """Versions of paadet and what it runs on (None for what is not installed)."""
    return {
        "paadet": __version__,
        "torch": _version_of("torch"),
        "onnxruntime": _version_of("onnxruntime"),
        "openvino": _version_of("openvino"),
        "torchvision": _version_of("torchvision"),
        "numpy": _version_of("numpy"),
        "opencv": _version_of("cv2"),
        "python": platform.python_version(),
    }
