"""Timing paadet, and saying what each figure includes.

Two figures, both in images per second and milliseconds per image:

* ``engine``: the network alone, on an input batch already normalised, padded and resident on the
  device; no decoding, no copies, no post-processing. Timers are synchronised with the device before
  and after each call. This is the model-zoo (ixRT) entry's definition (it timed 10 calls after 3
  warm-ups).
* ``e2e``: JPEG files on disk to final detections in host memory, one batch after another, nothing
  overlapped: read and decode, pre-process (resize, normalise, pad), copy to the device, network,
  post-processing (top-k, decoding, NMS, score voting), copy back and split into per-image results.
  Each stage is timed with device synchronisation, so the stages add up to the total (the small rest
  is reported as ``untimed``).

Latency percentiles are per batch (one network call for ``engine``, one batch of files for ``e2e``).
Without a checkpoint (and no official file in the cache) the weights are random
(``seeded_state_dict(0)``): the timings are real, the detections are not ("timing only").
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from paadet.bench.backends import build_timed_backend, export_for_bench, resolve_weights
from paadet.bench.images import image_files
from paadet.bench.settings import BenchSettings, BenchTiming, resolve_settings, resolve_target
from paadet.bench.system import hardware_info, versions
from paadet.bench.timing import time_e2e, time_engine
from paadet.preprocess import Preset
from paadet.runtime.base import Backend
from paadet.runtime.registry import with_checkpoint_file
from paadet.runtime.spec import AUTO, OPENVINO, TITLES, DetectorSpec, device_type

SCHEMA_VERSION = 1


def _graph_defaults(spec: DetectorSpec) -> DetectorSpec:
    """The preset and batch a benchmark takes from its input when not given: a graph's own (``--model``), or the
    training scale a checkpoint records."""
    if spec.model is not None and (spec.preset is None or spec.batch_size is None):
        from paadet.runtime.registry import graph_info

        info = graph_info(spec)
        return spec.replace(
            preset=spec.preset if spec.preset is not None else info.preset,
            batch_size=spec.batch_size if spec.batch_size is not None else info.batch,
        )
    if spec.preset is None and spec.model is None and spec.checkpoint is not None:
        from paadet.checkpoint import load_checkpoint

        return spec.replace(preset=load_checkpoint(spec.checkpoint).preset)
    return spec


def _auto_candidates(asked: DetectorSpec, settings: BenchSettings) -> list[str]:
    """``--backend auto`` on a CPU at fp32: the other installed fp32 backends to probe beside the first choice."""
    spec = settings.spec
    if (
        asked.backend != AUTO
        or device_type(spec.device) != "cpu"
        or spec.fp16
        or spec.precision is not None
        or spec.providers is not None
        or spec.tta is not None
    ):  # --providers means ONNX Runtime; --tta, the torch backend
        return []
    from paadet.bench.auto import available_cpu_candidates

    return [name for name in available_cpu_candidates(spec.model) if name != spec.backend]


def run_benchmark(
    spec: DetectorSpec = DetectorSpec(backend=AUTO, device=None), timing: BenchTiming = BenchTiming()
) -> dict[str, Any]:
    """Time ``engine`` and ``e2e`` of the detector ``spec`` describes and return the report (every field of the JSON).

    ``spec.backend`` may be ``auto`` (on a CPU: the fastest fp32 backend installed, measured on the first image;
    on CUDA the torch backend), ``spec.device`` None (CUDA when available). ``spec.preset`` / ``spec.batch_size``
    None: the graph's with a ``model`` (as ``paadet predict`` does), else the checkpoint's training scale or
    ``800``, and the device's default batch. Without ``checkpoint`` or ``model`` the official checkpoint is used
    if cached, else seeded random weights (timing only).

    Raises:
        ValueError: a bad option (one line).
    """
    if timing.images is not None and not Path(timing.images).is_dir():
        raise ValueError(f"--images {timing.images}: no such folder")
    settings = resolve_settings(_graph_defaults(with_checkpoint_file(resolve_target(spec))), timing)
    others, auto = _auto_candidates(spec, settings), None
    needed = settings.batch_size * (settings.warmup + settings.iters)
    with tempfile.TemporaryDirectory(prefix="paadet-bench-") as tmp:
        graph, net = settings.spec.model, None
        if graph is not None:
            weights, timing_only = f"from the ONNX graph {graph}", False
        else:
            net, weights, timing_only = resolve_weights(settings.spec.checkpoint)
            if settings.spec.uses_graph:  # the weights exported once, for every candidate
                runtimes = " and ".join(TITLES[b] for b in (settings.backend, *others))
                graph = str(export_for_bench(net, settings, Path(tmp) / "paa.onnx", runtimes))
                net = None
        backend = build_timed_backend(settings, net, graph)
        del net
        paths, source = image_files(timing.images, needed, tmp)
        if others:  # --backend auto on a CPU: the fastest fp32 backend on this machine, measured now
            settings, backend, auto = _fastest(settings, backend, others, graph, paths)
        gpu_decode = _use_gpu_decode(settings, paths)
        engine = None if timing.skip_engine else time_engine(backend, paths, settings)
        e2e = time_e2e(backend, paths, settings, gpu_decode, every_file=timing.images is not None)
    description = backend.describe()
    return {
        "schema": SCHEMA_VERSION,
        "tool": "paadet bench",
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "backend": settings.backend,
        "device": str(getattr(backend, "device", settings.device)),
        "precision": description.get("precision", "fp16" if settings.fp16 else "fp32"),
        "batch_size": settings.batch_size,
        "preset": settings.preset.name,
        "input_size": _input_size(settings.preset),
        "weights": weights,
        "architecture": description.get("architecture"),
        "timing_only": timing_only,
        "auto": auto,
        "images": {"source": source, "timed_files": len(paths)},
        "warmup": settings.warmup,
        "iters": settings.iters,
        "min_seconds": settings.min_seconds,
        "options": {
            key: value
            for key, value in description.items()
            if key not in ("backend", "preset", "device", "precision", "architecture")
        },
        "hardware": hardware_info(settings.device),
        "versions": versions(),
        "engine": engine,
        "e2e": e2e,
    }


def _fastest(
    settings: BenchSettings, first: Backend, others: list[str], graph: str | None, paths: Sequence[Path]
) -> tuple[BenchSettings, Backend, dict[str, Any]]:
    """Build each other candidate on the same graph, probe them all, and keep the fastest (the report names it)."""
    from dataclasses import replace

    from paadet.bench.auto import choose_fastest

    backends = {settings.backend: first}
    candidates = {settings.backend: settings}
    for name in others:
        alt = replace(settings, spec=settings.spec.replace(backend=name, precision="f32" if name == OPENVINO else None))
        candidates[name] = alt
        backends[name] = build_timed_backend(alt, None, graph)
    chosen, auto = choose_fastest(backends, paths, settings.preset)  # the report says which, once
    return candidates[chosen], backends[chosen], auto


def _input_size(preset: Preset) -> str:
    if preset.fixed_size is not None:
        return f"{preset.fixed_size[1]}x{preset.fixed_size[0]} (fixed; images fit {preset.scale[0]}x{preset.scale[1]})"
    return f"fit {preset.scale[0]}x{preset.scale[1]}, padded to a multiple of {preset.size_divisor}"


def _use_gpu_decode(settings: BenchSettings, paths: Sequence[Path]) -> bool:
    """Whether ``e2e`` decodes on the GPU: ``--decode gpu``, or ``auto`` when it can (CUDA, torchvision, JPEGs, a
    fixed size)."""
    if settings.decode == "cpu":
        return False
    from paadet.runtime.torch_backend import gpu_decode_available

    jpegs = all(p.suffix.lower() in (".jpg", ".jpeg") for p in paths)
    possible = (
        not settings.spec.uses_graph
        and settings.spec.tta is None
        and device_type(settings.device) == "cuda"
        and gpu_decode_available()
        and settings.preset.fixed_size is not None
        and jpegs
    )
    if settings.decode == "gpu" and not possible:
        raise ValueError(
            "--decode gpu needs CUDA, torchvision, JPEG files and the 800 preset (one padded size), without --tta"
        )
    return possible
