"""Which backend ``paadet bench`` times: the torch backend's options, the weights, and the exported graph
that ONNX Runtime and OpenVINO run (made once per run, not timed)."""
from __future__ import annotations

import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from .checkpoint import CheckpointError
from .model import PAANet
from .runtime.base import Backend

if TYPE_CHECKING:
    from .bench import BenchSettings

RUNTIME_NAMES = {"onnxruntime": "ONNX Runtime", "openvino": "OpenVINO"}


@dataclass(frozen=True)
class TorchOptions:
    """The torch backend's CUDA options as ``paadet bench`` takes them (see :class:`~paadet.runtime.torch_backend.TorchBackend`);
    ``channels_last`` and ``cudnn_benchmark`` None mean on for CUDA, off on the CPU."""

    channels_last: bool | None = None
    compile_mode: str | None = None
    cuda_graphs: bool = False
    tf32: bool = False
    cudnn_benchmark: bool | None = None
    fold_bn: bool = False
    fp16_weights: bool = False

    FLAGS: ClassVar[dict[str, str]] = {"channels_last": "--channels-last", "compile_mode": "--compile", "cuda_graphs": "--cuda-graphs",
             "tf32": "--tf32", "cudnn_benchmark": "--cudnn-benchmark", "fold_bn": "--fold-bn",
             "fp16_weights": "--fp16-weights"}

    def asked(self) -> list[str]:
        """The command-line flags of the options that are set."""
        return [flag for name, flag in self.FLAGS.items() if getattr(self, name)]

    def backend_kwargs(self, on_gpu: bool) -> dict[str, Any]:
        """Keyword arguments for :class:`~paadet.runtime.torch_backend.TorchBackend`, the None defaults resolved."""
        kwargs = {name: getattr(self, name) for name in self.FLAGS}
        for name in ("channels_last", "cudnn_benchmark"):
            if kwargs[name] is None:
                kwargs[name] = on_gpu
        return kwargs


def build_backend(
    settings: BenchSettings,
    checkpoint: str | None = None,
    model: str | None = None,
    providers: str | None = None,
    score_voting: bool = True,
    torch_options: TorchOptions = TorchOptions(),
) -> tuple[Backend, str, bool]:
    """The backend to time, a description of its weights, and whether the timing is "timing only".

    ONNX Runtime runs ``model``, or, without one, the weights of :func:`resolve_weights` exported to a
    temporary graph. The torch backend runs those weights with ``torch_options``.
    """
    from .postprocess import PostprocessConfig

    if settings.backend in ("onnxruntime", "openvino") and model is not None:
        from .commands.common import build_detector

        detector = build_detector(backend=settings.backend, model=model, providers=providers,
                                  preset=settings.preset, batch_size=settings.batch_size, fp16=settings.fp16,
                                  precision=settings.precision if settings.backend == "openvino" else None)
        return detector.backend, f"from the ONNX graph {model}", False

    net, weights, timing_only = resolve_weights(checkpoint)
    if settings.backend in ("onnxruntime", "openvino"):
        return exported_backend(net, settings, providers, score_voting, weights), weights, timing_only

    from .runtime.torch_backend import TorchBackend

    on_gpu = torch.device(settings.device).type == "cuda"
    options = dict(preset=settings.preset, device=settings.device, fp16=settings.fp16,
                   postprocess=PostprocessConfig(score_voting=score_voting), **torch_options.backend_kwargs(on_gpu))
    return TorchBackend(net, **options), weights, timing_only


def resolve_weights(checkpoint: str | None) -> tuple[PAANet, str, bool]:
    """The network to time, a description of its weights, and whether they are random ("timing only").

    ``checkpoint``, else the official file if it is already in the cache (nothing is downloaded), else
    random weights ``seeded_state_dict(0)``.
    """
    from .hub import resolve_checkpoint
    from .model.loading import load_network
    from .testing import seeded_net

    try:
        path = resolve_checkpoint(checkpoint, download_if_missing=False, progress=False)
    except CheckpointError:
        if checkpoint is not None:
            raise
        path = None
    if path is not None:
        return load_network(path), str(path), False
    return seeded_net(0), "random: seeded_state_dict(0), no checkpoint found (timing only)", True


def export_for_bench(net: PAANet, settings: BenchSettings, score_voting: bool, path: Path, runtime: str) -> Path:
    """Export ``net`` to the full graph ``path`` at the benchmark's preset, batch and precision (not timed)."""
    from .export import export_onnx

    print(f"exporting the weights to a temporary ONNX graph for {runtime} (not timed)...", file=sys.stderr, flush=True)
    export_onnx(net, path, settings.preset, batch_size=settings.batch_size, fp16=settings.fp16,
                score_voting=score_voting, verify=False)
    return path


def exported_backend(net: PAANet, settings: BenchSettings, providers: str | None, score_voting: bool,
                     weights: str) -> Backend:
    """Export ``net`` to a temporary full graph (not timed) and open it with ONNX Runtime (or OpenVINO)."""
    from .runtime.onnxruntime_backend import OnnxRuntimeBackend, parse_providers

    with tempfile.TemporaryDirectory(prefix="paadet-bench-export-") as tmp:
        runtime = "OpenVINO" if settings.backend == "openvino" else "ONNX Runtime"
        graph = export_for_bench(net, settings, score_voting, Path(tmp) / "paa.onnx", runtime)
        if settings.backend == "openvino":  # the model is read into memory: the file may go
            from .runtime.openvino_backend import OpenVinoBackend

            return OpenVinoBackend.from_file(graph, preset=settings.preset, precision=settings.precision or "f32")
        return OnnxRuntimeBackend.from_file(graph, providers=parse_providers(providers), preset=settings.preset)
