"""Which backend ``paadet bench`` times: the weights (a checkpoint, or seeded random weights for timing only), the
exported graph that ONNX Runtime and OpenVINO run (made once per run, not timed), and the backend itself, built by
the registry's rules."""

from __future__ import annotations

import sys
from pathlib import Path

from paadet.bench.settings import BenchSettings
from paadet.checkpoint import CheckpointError
from paadet.model import PAANet
from paadet.runtime.base import Backend
from paadet.runtime.registry import build_backend, torch_backend


def resolve_weights(checkpoint: str | None) -> tuple[PAANet, str, bool]:
    """The network to time, a description of its weights, and whether they are random ("timing only").

    ``checkpoint``, else the official file if it is already in the cache (nothing is downloaded), else
    random weights ``seeded_state_dict(0)``.
    """
    from paadet.hub import resolve_checkpoint
    from paadet.model.build import load_network
    from paadet.model.seeded import seeded_net

    try:
        path = resolve_checkpoint(checkpoint, download_if_missing=False, progress=False)
    except CheckpointError:
        if checkpoint is not None:
            raise
        path = None
    if path is not None:
        return load_network(path), str(path), False
    return seeded_net(0), "random: seeded_state_dict(0), no checkpoint found (timing only)", True


def export_for_bench(net: PAANet, settings: BenchSettings, path: Path, runtime: str) -> Path:
    """Export ``net`` to the full graph ``path`` at the benchmark's preset, batch and precision (not timed)."""
    from paadet.export import export_onnx

    print(f"exporting the weights to a temporary ONNX graph for {runtime} (not timed)...", file=sys.stderr, flush=True)
    export_onnx(
        net,
        path,
        settings.preset,
        batch_size=settings.batch_size,
        fp16=settings.fp16,
        score_voting=settings.spec.score_voting,
        verify=False,
    )
    return path


def build_timed_backend(settings: BenchSettings, net: PAANet | None, graph: str | None) -> Backend:
    """The backend to time: the torch backend on ``net``, or a graph backend on ``graph`` (an export of the weights,
    or the user's ``--model``)."""
    spec = settings.spec
    if spec.uses_graph:
        if graph is None:
            raise ValueError(f"--backend {spec.backend} needs a graph to time")
        return build_backend(spec.replace(model=graph))
    if net is None:
        raise ValueError("the torch backend needs weights to time")
    return torch_backend(net, spec, settings.preset)
