"""How a detector runs: what it is asked to be, and the backends that run it.

* :mod:`.spec`: :class:`DetectorSpec` (every option of a detector, one frozen dataclass) and the rules on which
  options go together;
* :mod:`.registry`: the backends by name, how each opens its weights file and is built from a spec;
* :mod:`.base`: what every backend provides (:class:`Backend`) and the stage timer;
* the backends: :mod:`.torch_backend` (PyTorch on a CPU or CUDA), :mod:`.onnxruntime_backend` and
  :mod:`.openvino_backend` (a ``paadet export`` graph, sharing :mod:`.exported_graph`);
* :mod:`.graph_info`: what an exported graph says about itself (its metadata, written by :mod:`paadet.export`).

``TorchBackend`` is imported on first use, so that the exported-graph backends load without torch.
"""

from paadet.runtime.base import Backend, StageTimer
from paadet.runtime.spec import BACKEND_NAMES, DetectorSpec, TorchOptions

__all__ = ["BACKEND_NAMES", "Backend", "DetectorSpec", "StageTimer", "TorchBackend", "TorchOptions"]


def __getattr__(name: str):
    if name == "TorchBackend":
        from paadet.runtime.torch_backend import TorchBackend

        return TorchBackend
    raise AttributeError(f"module 'paadet.runtime' has no attribute {name!r}")
