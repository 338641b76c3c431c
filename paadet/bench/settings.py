"""What one ``paadet bench`` run times: its timing options, and its settings resolved for the device.

Nothing here imports torch at import time (``paadet bench --help`` reads :data:`DECODE_MODES` and
:data:`BACKEND_CHOICES`); the defaults that depend on the device ask torch when a run resolves them.
"""

from __future__ import annotations

from dataclasses import dataclass

from paadet.preprocess import Preset, get_preset
from paadet.runtime.spec import AUTO, BACKEND_NAMES, ONNXRUNTIME, OPENVINO, TORCH, DetectorSpec, device_type

DECODE_MODES = ("auto", "cpu", "gpu")
BACKEND_CHOICES = (AUTO, *BACKEND_NAMES)
MIN_TIMED_BATCHES = 20
"""Timed batches per figure at least, when ``--iters`` is not given."""
MIN_TIMED_SECONDS = 10.0
"""Timed seconds per figure at least, when ``--iters`` is not given."""
DEFAULT_PRESET = "800"
"""The preset a benchmark uses when neither ``--preset``, the graph nor the checkpoint names one (the seed's)."""


@dataclass(frozen=True)
class BenchTiming:
    """How a benchmark times: ``warmup`` untimed batches (None: 3 on a GPU, 1 on a CPU) then timed ones, exactly
    ``iters`` of them, or with ``iters`` None until each figure has :data:`MIN_TIMED_BATCHES` batches and
    :data:`MIN_TIMED_SECONDS` seconds (whichever comes later), so that its percentiles mean something; on the
    images in ``images`` (a folder, every file of which ``e2e`` times at least once; None: generated JPEGs),
    decoded where ``decode`` says (``auto``: on the GPU when it can), with or without the ``engine`` figure."""

    warmup: int | None = None
    iters: int | None = None
    images: str | None = None
    decode: str = "auto"
    skip_engine: bool = False


@dataclass(frozen=True)
class BenchSettings:
    """One benchmark run's settings, every default resolved.

    Attributes:
        spec: the detector timed (a concrete backend and device, the preset and batch size filled in).
        warmup: untimed batches.
        iters: timed batches at least (``e2e`` runs more when the images given need more to be timed once each).
        min_seconds: timed seconds at least per figure (0 with ``--iters``: exactly ``iters`` batches).
        decode: ``auto``, ``cpu`` or ``gpu``.
    """

    spec: DetectorSpec
    warmup: int
    iters: int
    decode: str
    min_seconds: float = 0.0

    def enough(self, latencies_s: list[float], minimum: int = 0) -> bool:
        """Whether the timed batches so far (their seconds) complete a figure that needs ``minimum`` batches."""
        return len(latencies_s) >= max(self.iters, minimum) and sum(latencies_s) >= self.min_seconds

    @property
    def backend(self) -> str:
        return self.spec.backend

    @property
    def device(self) -> str:
        return str(self.spec.device)

    @property
    def batch_size(self) -> int:
        return int(self.spec.batch_size or 1)

    @property
    def preset(self) -> Preset:
        return get_preset(self.spec.preset or DEFAULT_PRESET)

    @property
    def fp16(self) -> bool:
        return self.spec.fp16

    @property
    def precision(self) -> str | None:
        return self.spec.precision


def default_device() -> str:
    """``cuda`` when PyTorch sees a GPU, else ``cpu``."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def choose_backend(spec: DetectorSpec) -> str:
    """Resolve ``auto`` to a first choice (on a CPU, ``run_benchmark`` then probes the other fp32 backends).

    With ``precision`` (OpenVINO's ``--precision``) or an IR ``.xml``: OpenVINO. With ``--model``: ONNX Runtime.
    On CUDA (or with ``--fp16``), or with ``--tta``: the torch backend, whose FP16 fast path is there (and the only
    one with test-time augmentation). On the CPU: ONNX Runtime
    (with the weights exported to a temporary graph first); the torch backend if onnxruntime is not installed.
    """
    if spec.backend != AUTO:
        return spec.backend
    model = spec.model
    if spec.precision is not None or (model is not None and model.lower().endswith(".xml")):
        return OPENVINO
    if model is not None:
        return ONNXRUNTIME
    if spec.fp16 or spec.tta is not None or device_type(spec.device or default_device()) == "cuda":
        return TORCH
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return TORCH
    return ONNXRUNTIME


def resolve_target(spec: DetectorSpec) -> DetectorSpec:
    """The backend chosen (``auto``) and the device filled in (None: ``cuda`` if available for the torch backend,
    the CPU for the others), then the options checked together, before any file is read.

    Raises:
        ValueError: an unknown backend, or options that do not go together (one line).
    """
    if spec.backend not in BACKEND_CHOICES:
        raise ValueError(f"unknown backend {spec.backend!r}; use {', '.join(BACKEND_CHOICES)}")
    spec = spec.replace(backend=choose_backend(spec))
    if spec.device is None:
        spec = spec.replace(device="cpu" if spec.uses_graph else default_device())
    return spec.validate(need_model=False)


def resolve_settings(spec: DetectorSpec, timing: BenchTiming = BenchTiming()) -> BenchSettings:
    """Fill in the device-dependent defaults and reject bad values with one-line ``ValueError``\\ s.

    See :func:`resolve_target` for the backend and device. ``spec.batch_size`` None: 32 on a GPU, 1 on a CPU.
    ``spec.preset`` None: :data:`DEFAULT_PRESET`.
    """
    spec = resolve_target(spec)
    on_gpu = device_type(spec.device) == "cuda"
    warmup = timing.warmup if timing.warmup is not None else (3 if on_gpu else 1)
    iters = timing.iters if timing.iters is not None else MIN_TIMED_BATCHES
    if iters < 1:
        raise ValueError(f"--iters must be >= 1, got {iters}")
    if warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {warmup}")
    spec = spec.replace(
        batch_size=spec.batch_size if spec.batch_size is not None else (32 if on_gpu else 1),
        preset=get_preset(spec.preset if spec.preset is not None else DEFAULT_PRESET),
    ).validate(need_model=False)
    if not spec.uses_graph:  # the torch backend: its device must exist
        from paadet.runtime.torch_backend import resolve_device

        resolve_device(spec.device)
    if timing.decode not in DECODE_MODES:
        raise ValueError(f"unknown --decode {timing.decode!r}; choose one of {', '.join(DECODE_MODES)}")
    if timing.decode == "gpu" and (spec.uses_graph or not on_gpu):
        raise ValueError("--decode gpu needs the torch backend on a CUDA device")
    min_seconds = MIN_TIMED_SECONDS if timing.iters is None else 0.0
    return BenchSettings(spec=spec, warmup=warmup, iters=iters, decode=timing.decode, min_seconds=min_seconds)
