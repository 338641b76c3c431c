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

import os
import platform
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import cv2
import numpy as np
import torch

from . import __version__
from .bench_backends import RUNTIME_NAMES, TorchOptions, build_backend, export_for_bench, resolve_weights
from .data.images import list_images, read_image
from .detector import split_detections
from .preprocess import ImageMeta, Preset, get_preset, resize
from .runtime.base import Backend, StageTimer

SCHEMA_VERSION = 1
E2E_STAGES = ("decode", "preprocess", "copy", "network", "postprocess", "copy_back")
ENGINE_DEFINITION = (
    "network forward only, on a normalised, padded input batch already on the device; no decoding, copies "
    "or post-processing; device-synchronised timer around each call (the model-zoo entry's definition)"
)
E2E_DEFINITION = (
    "JPEG files on disk -> final detections in host memory, batches run one after another without overlap: "
    "read+decode (on the GPU, or on the CPU with decode_threads threads), pre-process (resize, normalise, pad), host->device copy, network, post-processing "
    "(top-k, decode, NMS, score voting), device->host copy and per-image results; device-synchronised "
    "timer around each stage"
)
GENERATED_SIZES = ((480, 640), (427, 640), (640, 480), (480, 640))  # (height, width): COCO's usual shapes
MAX_GENERATED = 64
DECODE_MODES = ("auto", "cpu", "gpu")
BACKENDS = ("auto", "torch", "onnxruntime", "openvino")


@dataclass(frozen=True)
class BenchSettings:
    """Resolved settings of one benchmark run (defaults filled in for the device)."""

    backend: str
    device: str
    batch_size: int
    warmup: int
    iters: int
    preset: Preset
    fp16: bool
    decode: str
    precision: str | None = None  # OpenVINO's inference precision (f32 / bf16); None = f32


def default_device() -> str:
    """``cuda`` when PyTorch sees a GPU, else ``cpu``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def choose_backend(backend: str, device: str | None = None, model: str | None = None, fp16: bool = False,
                   precision: str | None = None) -> str:
    """Resolve ``auto`` to a first choice (on a CPU, ``run_benchmark`` then probes the other fp32 backends).

    With ``precision`` (OpenVINO's ``--precision``): OpenVINO. With ``--model``: ONNX Runtime. On CUDA
    (or with ``--fp16``): the torch backend, whose FP16 fast path is there. On the CPU: ONNX Runtime (1.3-1.7x
    the torch backend, docs/benchmarks.md), with the weights exported to a temporary graph first; the torch
    backend if onnxruntime is not installed.
    """
    if backend != "auto":
        return backend
    if precision is not None or (model is not None and model.lower().endswith(".xml")):  # an IR: OpenVINO's
        return "openvino"
    if model is not None:
        return "onnxruntime"
    if fp16 or torch.device(device or default_device()).type == "cuda":
        return "torch"
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return "torch"
    return "onnxruntime"


def resolve_settings(
    backend: str = "torch",
    device: str | None = None,
    batch_size: int | None = None,
    warmup: int | None = None,
    iters: int | None = None,
    preset: str | Preset = "800",
    fp16: bool = False,
    decode: str = "auto",
    model: str | None = None,
    precision: str | None = None,
) -> BenchSettings:
    """Fill in the device-dependent defaults and reject bad values with one-line ``ValueError``s.

    Defaults: device ``cuda`` if available else ``cpu``; on CUDA batch 32, 3 warm-up and 10 timed
    iterations (the seed's protocol); on the CPU batch 1, 1 warm-up and 2 timed iterations.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; use {', '.join(BACKENDS)}")
    backend = choose_backend(backend, device, model, fp16, precision)
    if backend == "torch" and model is not None:
        raise ValueError("--model is for --backend onnxruntime; the torch backend takes --checkpoint")
    if precision is not None and backend != "openvino":
        raise ValueError(f"--precision is for --backend openvino (this run uses {backend})")
    if backend == "openvino":
        from .runtime.openvino_backend import normalize_precision

        precision = normalize_precision(precision)
        if device is not None and torch.device(device).type != "cpu":
            raise ValueError(f"--backend openvino runs on the CPU, not --device {device}")
    device = device or ("cpu" if backend in ("onnxruntime", "openvino") else default_device())
    on_gpu = torch.device(device).type == "cuda"
    batch_size = batch_size if batch_size is not None else (32 if on_gpu else 1)
    warmup = warmup if warmup is not None else (3 if on_gpu else 1)
    iters = iters if iters is not None else (10 if on_gpu else 2)
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    if iters < 1:
        raise ValueError(f"--iters must be >= 1, got {iters}")
    if warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {warmup}")
    if backend == "torch":
        from .runtime.torch_backend import resolve_device

        resolve_device(device)
        if fp16 and not on_gpu:
            raise ValueError("--fp16 needs a CUDA device for the torch backend; on CPU run in fp32")
    if decode not in DECODE_MODES:
        raise ValueError(f"unknown --decode {decode!r}; choose one of {', '.join(DECODE_MODES)}")
    if decode == "gpu" and (backend != "torch" or not on_gpu):
        raise ValueError("--decode gpu needs the torch backend on a CUDA device")
    return BenchSettings(backend=backend, device=device, batch_size=batch_size, warmup=warmup, iters=iters,
                         preset=get_preset(preset), fp16=fp16, decode=decode, precision=precision)


def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (Linux), else :func:`platform.processor`."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def hardware_info(device: str) -> dict[str, Any]:
    """CPU model and cores, PyTorch's thread count, and the GPU's name when the device is CUDA."""
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count()
    info: dict[str, Any] = {
        "cpu": cpu_model(), "cpu_cores": os.cpu_count(), "cpu_cores_usable": usable,
        "torch_threads": torch.get_num_threads(), "platform": platform.platform(), "gpu": None,
    }
    dev = torch.device(device)
    if dev.type == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(dev)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    gpu_multiprocessors=props.multi_processor_count, cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version())
    return info


def _version_of(module: str) -> str | None:
    try:
        return getattr(__import__(module), "__version__", "unknown")
    except ImportError:
        return None


def versions() -> dict[str, str | None]:
    """Versions of paadet and what it runs on (None for what is not installed)."""
    return {
        "paadet": __version__, "torch": torch.__version__, "onnxruntime": _version_of("onnxruntime"),
        "openvino": _version_of("openvino"),
        "torchvision": _version_of("torchvision"), "numpy": np.__version__, "opencv": cv2.__version__,
        "python": platform.python_version(),
    }


def percentiles(values_ms: Sequence[float]) -> dict[str, float]:
    """p50, p90, p99, mean, min and max of per-batch latencies in milliseconds."""
    arr = np.asarray(values_ms, dtype=np.float64)
    p50, p90, p99 = np.percentile(arr, [50, 90, 99])
    return {"p50": float(p50), "p90": float(p90), "p99": float(p99), "mean": float(arr.mean()),
            "min": float(arr.min()), "max": float(arr.max())}


def write_generated_images(folder: str | os.PathLike, count: int, quality: int = 90) -> list[Path]:
    """Write ``count`` reproducible synthetic JPEGs in COCO's usual sizes; returns their paths."""
    from .testing import synthetic_image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        h, w = GENERATED_SIZES[i % len(GENERATED_SIZES)]
        path = folder / f"bench_{i:04d}.jpg"
        if not cv2.imwrite(str(path), synthetic_image(h, w, seed=i), [cv2.IMWRITE_JPEG_QUALITY, quality]):
            raise OSError(f"cannot write the generated image {path}")
        paths.append(path)
    return paths


def image_files(images: str | os.PathLike | None, needed: int, tmp: str) -> tuple[list[Path], str]:
    """The files to time (cycled up to ``needed``) and a description of their source.

    Raises:
        ValueError: ``images`` is not a folder or holds no image files.
    """
    if images is None:
        unique = write_generated_images(tmp, min(needed, MAX_GENERATED))
        source = f"generated: {len(unique)} synthetic JPEGs ({', '.join(f'{w}x{h}' for h, w in sorted(set(GENERATED_SIZES)))})"
    else:
        folder = Path(images)
        if not folder.is_dir():
            raise ValueError(f"--images {images}: no such folder")
        unique = [s.path for s in list_images(folder)]
        if not unique:
            raise ValueError(f"--images {images}: no image files in this folder")
        source = f"{folder}: {len(unique)} files"
    return [unique[i % len(unique)] for i in range(needed)], source


def default_decode_threads() -> int:
    """Host threads that decode and resize a batch's images in ``e2e`` (OpenCV releases the GIL): up to 8."""
    return max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


def load_batch(paths: Sequence[Path], preset: Preset, timer: StageTimer,
               pool: ThreadPoolExecutor | None = None) -> tuple[list[np.ndarray], list[ImageMeta]]:
    """Decode and resize a batch on the host (OpenCV, as ``paadet predict``), on ``pool``'s threads if given,
    timing each step."""
    run = pool.map if pool is not None else map
    with timer.stage("decode"):
        decoded = list(run(read_image, paths))
    with timer.stage("preprocess"):
        pairs = list(run(lambda img: resize(img, preset), decoded))
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _groups_by_pad_shape(metas: Sequence[ImageMeta]) -> list[list[int]]:
    """Indices of a batch grouped by padded size (a network call takes one size), in first-seen order."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, meta in enumerate(metas):
        groups.setdefault(meta.pad_shape, []).append(i)
    return list(groups.values())


def run_e2e_batch(backend: Backend, paths: Sequence[Path], preset: Preset, gpu_decode: bool, timer: StageTimer,
                  pool: ThreadPoolExecutor | None = None) -> int:
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
    resized, meta = resize(read_image(paths[0]), settings.preset)
    images, metas = [resized] * settings.batch_size, [meta] * settings.batch_size
    device = getattr(backend, "device", None)
    latencies = []
    if hasattr(backend, "network") and hasattr(backend, "prepare"):
        batch = backend.prepare(images, metas)  # type: ignore[attr-defined]
        input_shape = list(batch.shape)
        for i in range(settings.warmup + settings.iters):
            timer = StageTimer(device)
            with timer.stage("network"):
                backend.network(batch)  # type: ignore[attr-defined]
            if i >= settings.warmup:
                latencies.append(timer.totals["network"])
        definition = ENGINE_DEFINITION
    else:  # any other backend: its own "network" stage inside infer (input prepared by the runtime)
        input_shape = [settings.batch_size, 3, *meta.pad_shape]
        for i in range(settings.warmup + settings.iters):
            timer = StageTimer(device)
            backend.infer(images, metas, timer)
            if i >= settings.warmup:
                latencies.append(timer.totals["network"])
        definition = (f"the {backend.name} backend's 'network' stage (the runtime's session call; for a full "
                      "paadet ONNX graph it also holds normalisation, NMS and score voting), input prepared on the host")
    return _summary(definition, latencies, settings.batch_size, extra={"input_shape": input_shape})


def time_e2e(backend: Backend, paths: Sequence[Path], settings: BenchSettings, gpu_decode: bool) -> dict[str, Any]:
    """``e2e``: ``settings.iters`` batches of files after ``settings.warmup`` warm-up batches."""
    device = getattr(backend, "device", None)
    b = settings.batch_size
    batches = [paths[i * b:(i + 1) * b] for i in range(settings.warmup + settings.iters)]
    total_timer = StageTimer(device)
    latencies, detections = [], 0
    threads = 1 if gpu_decode else default_decode_threads()
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="paadet-decode") as pool:
        for i, batch in enumerate(batches):
            timer, wall = StageTimer(device), StageTimer(device)
            with wall.stage("batch"):
                found = run_e2e_batch(backend, batch, settings.preset, gpu_decode, timer, pool if threads > 1 else None)
            if i >= settings.warmup:
                latencies.append(wall.totals["batch"])
                total_timer.merge(timer)
                detections += found
    images = b * settings.iters
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


def _summary(definition: str, latencies_s: Sequence[float], batch_size: int, extra: dict | None = None) -> dict[str, Any]:
    seconds = float(sum(latencies_s))
    images = batch_size * len(latencies_s)
    out = {
        "definition": definition, "iterations": len(latencies_s), "batch_size": batch_size, "images": images,
        "seconds": seconds, "images_per_s": images / seconds if seconds > 0 else float("inf"),
        "ms_per_image": 1000.0 * seconds / images,
        "latency_ms_per_batch": percentiles([1000.0 * s for s in latencies_s]),
    }
    out.update(extra or {})
    return out


def run_benchmark(
    backend: str = "torch",
    model: str | None = None,
    checkpoint: str | None = None,
    providers: str | None = None,
    preset: str | Preset | None = None,
    batch_size: int | None = None,
    fp16: bool = False,
    device: str | None = None,
    warmup: int | None = None,
    iters: int | None = None,
    images: str | os.PathLike | None = None,
    score_voting: bool = True,
    channels_last: bool | None = None,
    compile_mode: str | None = None,
    cuda_graphs: bool = False,
    tf32: bool = False,
    cudnn_benchmark: bool | None = None,
    decode: str = "auto",
    skip_engine: bool = False,
    fold_bn: bool = False,
    fp16_weights: bool = False,
    precision: str | None = None,
) -> dict[str, Any]:
    """Time ``engine`` and ``e2e`` and return the report (every field of the JSON).

    Args are ``paadet bench``'s options. ``decode``: ``cpu`` (OpenCV, as ``paadet predict``), ``gpu``
    (nvJPEG through torchvision, torch backend on CUDA, ``800`` preset) or ``auto`` (GPU when possible).
    ``preset`` / ``batch_size`` None: the graph's with an ONNX ``model`` (as ``paadet predict`` does), else
    ``800`` and the device's default batch.

    Raises:
        ValueError: a bad option (one line).
    """
    if model is not None and backend != "torch" and (preset is None or batch_size is None):
        from .export.metadata import read_export_info

        if backend == "openvino" or model.lower().endswith(".xml"):  # an OpenVINO IR .xml too
            from .runtime.openvino_backend import read_export_info_any as read_export_info
        graph = read_export_info(model)
        preset = preset if preset is not None else graph.preset
        batch_size = batch_size if batch_size is not None else graph.batch
    if preset is None and model is None and checkpoint is not None:  # a trained checkpoint's own scale
        from .checkpoint import load_checkpoint

        preset = load_checkpoint(checkpoint).preset
    settings = resolve_settings(backend, device, batch_size, warmup, iters, preset if preset is not None else "800",
                                fp16, decode, model, precision)
    torch_options = TorchOptions(channels_last, compile_mode, cuda_graphs, tf32, cudnn_benchmark, fold_bn, fp16_weights)
    asked = torch_options.asked()
    if settings.backend in ("onnxruntime", "openvino") and asked:
        runtime = "OpenVINO" if settings.backend == "openvino" else "ONNX Runtime"
        raise ValueError(f"{', '.join(asked)} are options of the torch backend on CUDA; this run uses {runtime} "
                         "(give --backend torch --device cuda)")
    if images is not None and not Path(images).is_dir():
        raise ValueError(f"--images {images}: no such folder")
    others, auto = [], None
    if (backend == "auto" and torch.device(settings.device).type == "cpu" and not settings.fp16
            and settings.precision is None and providers is None):  # --providers means ONNX Runtime
        from .bench_auto import available_cpu_candidates  # the other fp32 CPU backends, probed below

        others = [name for name in available_cpu_candidates(model) if name != settings.backend]
    needed = settings.batch_size * (settings.warmup + settings.iters)
    with ExitStack() as stack:
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="paadet-bench-"))
        graph = model
        if others and model is None and settings.backend in RUNTIME_NAMES:  # the weights exported once, for every candidate
            net, weights, timing_only = resolve_weights(checkpoint)
            graph = str(export_for_bench(net, settings, score_voting, Path(tmp) / "paa.onnx",
                                         " and ".join(RUNTIME_NAMES[b] for b in (settings.backend, *others))))
            del net
        be, described, is_timing_only = build_backend(settings, checkpoint, graph, providers, score_voting, torch_options)
        if graph is model:
            weights, timing_only = described, is_timing_only
        paths, source = image_files(images, needed, tmp)
        if others:  # --backend auto on a CPU: the fastest fp32 backend on this machine, measured now
            from .bench_auto import choose_fastest

            backends = {settings.backend: be}
            for name in others:
                alt = replace(settings, backend=name, precision="f32" if name == "openvino" else None)
                backends[name] = build_backend(alt, checkpoint, graph, providers, score_voting, torch_options)[0]
            chosen, auto = choose_fastest(backends, paths, settings.preset)
            settings, be = replace(settings, backend=chosen, precision="f32" if chosen == "openvino" else None), backends[chosen]
            print(f"--backend auto: {chosen}, the fastest backend here for this graph's precision (probe: "
                  + ", ".join(f"{k} {v:.0f} ms" for k, v in auto["candidates_ms"].items()) + ")", file=sys.stderr, flush=True)
        gpu_decode = _use_gpu_decode(settings, be, paths)
        engine = None if skip_engine else time_engine(be, paths, settings)
        e2e = time_e2e(be, paths, settings, gpu_decode)
    description = be.describe()
    return {
        "schema": SCHEMA_VERSION,
        "tool": "paadet bench",
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "backend": settings.backend,
        "device": str(getattr(be, "device", settings.device)),
        "precision": description.get("precision", "fp16" if settings.fp16 else "fp32"),
        "batch_size": settings.batch_size,
        "preset": settings.preset.name,
        "input_size": _input_size(settings.preset),
        "weights": weights,
        "timing_only": timing_only,
        "auto": auto,
        "images": {"source": source, "timed_files": len(paths)},
        "warmup": settings.warmup,
        "iters": settings.iters,
        "options": {key: value for key, value in description.items() if key not in ("backend", "preset", "device", "precision")},
        "hardware": hardware_info(settings.device),
        "versions": versions(),
        "engine": engine,
        "e2e": e2e,
    }


def _input_size(preset: Preset) -> str:
    if preset.fixed_size is not None:
        return f"{preset.fixed_size[1]}x{preset.fixed_size[0]} (fixed; images fit {preset.scale[0]}x{preset.scale[1]})"
    return f"fit {preset.scale[0]}x{preset.scale[1]}, padded to a multiple of {preset.size_divisor}"


def _use_gpu_decode(settings: BenchSettings, backend: Backend, paths: Sequence[Path]) -> bool:
    """Whether ``e2e`` decodes on the GPU: ``--decode gpu``, or ``auto`` when it can (CUDA, torchvision, JPEGs, fixed size)."""
    if settings.decode == "cpu":
        return False
    from .runtime.torch_backend import gpu_decode_available

    jpegs = all(p.suffix.lower() in (".jpg", ".jpeg") for p in paths)
    possible = (settings.backend == "torch" and torch.device(settings.device).type == "cuda"
                and gpu_decode_available() and settings.preset.fixed_size is not None and jpegs)
    if settings.decode == "gpu" and not possible:
        raise ValueError("--decode gpu needs CUDA, torchvision, JPEG files and the 800 preset (one padded size)")
    return possible
