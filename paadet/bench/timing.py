"""The two figures of a benchmark, ``engine`` (the network alone) and ``e2e`` (files to detections), and their
latency percentiles."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from paadet.bench.images import default_decode_threads, load_batch
from paadet.bench.settings import BenchSettings
from paadet.data.images import read_image
from paadet.detector import split_detections
from paadet.preprocess import ImageMeta, Preset, resize
from paadet.runtime.base import Backend, StageTimer

E2E_STAGES = ("decode", "preprocess", "copy", "network", "postprocess", "copy_back")
ENGINE_DEFINITION = (
    "network forward only, on a normalised, padded input batch already on the device; no decoding, copies "
    "or post-processing; device-synchronised timer around each call (the model-zoo entry's definition)"
)
E2E_DEFINITION = (
    "JPEG files on disk -> final detections in host memory, batches run one after another without overlap: "
    "read+decode (on the GPU, or on the CPU with decode_threads threads), pre-process (resize, normalise, pad), "
    "host->device copy, network, post-processing (top-k, decode, NMS, score voting), device->host copy and "
    "per-image results; device-synchronised timer around each stage"
)


def percentiles(values_ms: Sequence[float]) -> dict[str, float]:
    """p50, p90, p99, mean, min and max of per-batch latencies in milliseconds."""
    arr = np.asarray(values_ms, dtype=np.float64)
    p50, p90, p99 = np.percentile(arr, [50, 90, 99])
    return {
        "p50": float(p50),
        "p90": float(p90),
        "p99": float(p99),
        "mean": float(arr.mean()),
        "min": float(arr.min()),
        "max": float(arr.max()),
    }


def _groups_by_pad_shape(metas: Sequence[ImageMeta]) -> list[list[int]]:
    """Indices of a batch grouped by padded size (a network call takes one size), in first-seen order."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, meta in enumerate(metas):
        groups.setdefault(meta.pad_shape, []).append(i)
    return list(groups.values())


def run_e2e_batch(
    backend: Backend,
    paths: Sequence[Path],
    preset: Preset,
    gpu_decode: bool,
    timer: StageTimer,
    pool: ThreadPoolExecutor | None = None,
) -> int:
    """JPEG files -> per-image results in host memory for one batch; returns the number of detections."""
    if gpu_decode:
        with timer.stage("decode"):
            encoded = [Path(p).read_bytes() for p in paths]
        dets, metas = backend.infer_encoded(encoded, [str(p) for p in paths], timer)  # type: ignore[attr-defined]
        with timer.stage("postprocess"):
            results = split_detections(dets, metas, [str(p) for p in paths])
        return sum(len(r.scores) for r in results)
    resized, metas = load_batch(paths, preset, timer, pool)
    found = 0
    for group in _groups_by_pad_shape(metas):
        dets = backend.infer([resized[i] for i in group], [metas[i] for i in group], timer)
        with timer.stage("postprocess"):
            results = split_detections(dets, [metas[i] for i in group], [str(paths[i]) for i in group])
        found += sum(len(r.scores) for r in results)
    return found


def time_engine(backend: Backend, paths: Sequence[Path], settings: BenchSettings) -> dict[str, Any]:
    """``engine``: the network alone on a device-resident batch (the first image, repeated ``batch_size`` times)."""
    resized, meta = resize(read_image(paths[0]), backend.preset)  # the settings' preset (native under --tta)
    images, metas = [resized] * settings.batch_size, [meta] * settings.batch_size
    device = getattr(backend, "device", None)
    latencies = []
    if hasattr(backend, "network") and hasattr(backend, "prepare"):
        batch = backend.prepare(images, metas)  # type: ignore[attr-defined]
        input_shape = list(batch.shape)
        for i in itertools.count():
            timer = StageTimer(device)
            with timer.stage("network"):
                backend.network(batch)  # type: ignore[attr-defined]
            if i >= settings.warmup:
                latencies.append(timer.totals["network"])
                if settings.enough(latencies):
                    break
        definition = ENGINE_DEFINITION
    else:  # any other backend: its own "network" stage inside infer (input prepared by the runtime)
        input_shape = [settings.batch_size, 3, *meta.pad_shape]
        for i in itertools.count():
            timer = StageTimer(device)
            backend.infer(images, metas, timer)
            if i >= settings.warmup:
                latencies.append(timer.totals["network"])
                if settings.enough(latencies):
                    break
        definition = (
            f"the {backend.name} backend's 'network' stage (the runtime's session call; for a full "
            "paadet ONNX graph it also holds normalisation, NMS and score voting), input prepared on the host"
        )
    return _summary(definition, latencies, settings.batch_size, extra={"input_shape": input_shape})


def time_e2e(
    backend: Backend, paths: Sequence[Path], settings: BenchSettings, gpu_decode: bool, every_file: bool = False
) -> dict[str, Any]:
    """``e2e``: batches of files (``paths`` in turn, cycled) after ``settings.warmup`` warm-up batches, until the
    figure is complete (:meth:`BenchSettings.enough`) and, with ``every_file`` (the user's own images), every
    file has been timed once."""
    device = getattr(backend, "device", None)
    b = settings.batch_size
    covering = -(-len(paths) // b) if every_file else 0  # timed batches that go through every file once
    total_timer = StageTimer(device)
    latencies: list[float] = []
    detections = 0
    threads = 1 if gpu_decode else default_decode_threads()
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="paadet-decode") as pool:
        for i in itertools.count():
            batch = [paths[(i * b + k) % len(paths)] for k in range(b)]
            timer, wall = StageTimer(device), StageTimer(device)
            with wall.stage("batch"):
                found = run_e2e_batch(backend, batch, backend.preset, gpu_decode, timer, pool if threads > 1 else None)
            if i >= settings.warmup:
                latencies.append(wall.totals["batch"])
                total_timer.merge(timer)
                detections += found
                if settings.enough(latencies, covering):
                    break
    images = b * len(latencies)
    summary = _summary(E2E_DEFINITION, latencies, b)
    stages = {name: 1000.0 * total_timer.totals.get(name, 0.0) / images for name in E2E_STAGES}
    stages.update({name: 1000.0 * s / images for name, s in total_timer.totals.items() if name not in E2E_STAGES})
    summary.update(
        decode_on="gpu" if gpu_decode else "cpu",
        decode_threads=None if gpu_decode else threads,
        stages_ms_per_image=stages,
        untimed_ms_per_image=summary["ms_per_image"] - sum(stages.values()),
        detections_per_image=detections / images,
    )
    return summary


def _summary(
    definition: str, latencies_s: Sequence[float], batch_size: int, extra: dict | None = None
) -> dict[str, Any]:
    seconds = float(sum(latencies_s))
    images = batch_size * len(latencies_s)
    out = {
        "definition": definition,
        "iterations": len(latencies_s),
        "batch_size": batch_size,
        "images": images,
        "seconds": seconds,
        "images_per_s": images / seconds if seconds > 0 else float("inf"),
        "ms_per_image": 1000.0 * seconds / images,
        "latency_ms_per_batch": percentiles([1000.0 * s for s in latencies_s]),
    }
    out.update(extra or {})
    return out
