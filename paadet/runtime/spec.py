"""What a detector is asked to be: :class:`DetectorSpec`, every option in one frozen dataclass, and the rules on
which options go together.

A command builds one spec from its flags (:mod:`paadet.commands.options`) and hands it down: to
:meth:`paadet.detector.Detector.from_spec`, to the Ray workers of ``paadet batch`` and the replicas of ``paadet
serve --ray`` (pickled as it is), to ``paadet bench``. The backends and how each is built from a spec are
:mod:`paadet.runtime.registry`'s; the rules here need no file and no torch, so a command refuses a bad
combination of flags in one line before it loads anything.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, ClassVar

from paadet.preprocess import Preset, get_preset
from paadet.runtime.tta import TTAOptions

TORCH, ONNXRUNTIME, OPENVINO = "torch", "onnxruntime", "openvino"
BACKEND_NAMES: tuple[str, ...] = (TORCH, ONNXRUNTIME, OPENVINO)
"""Every backend, in the order commands list them (the torch backend first: the default)."""
GRAPH_BACKENDS: tuple[str, ...] = (ONNXRUNTIME, OPENVINO)
"""The backends that run a graph made by ``paadet export`` (``--model``) rather than a checkpoint."""
AUTO = "auto"
"""``--backend auto``: the fastest backend here that keeps fp32 detections, chosen by measuring
(:func:`auto_rule`; the measuring is :mod:`paadet.export.auto`'s, and ``paadet bench``'s own)."""
TITLES: dict[str, str] = {TORCH: "PyTorch", ONNXRUNTIME: "ONNX Runtime", OPENVINO: "OpenVINO"}

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
"""``torch.compile`` modes of the torch backend's ``--compile``."""
OPENVINO_PRECISIONS = ("f32", "bf16")


@dataclass(frozen=True)
class TorchOptions:
    """The torch backend's CUDA-only options (see :class:`~paadet.runtime.torch_backend.TorchBackend`).

    ``channels_last`` and ``cudnn_benchmark`` None mean on for CUDA, off on the CPU.
    """

    channels_last: bool | None = None
    compile_mode: str | None = None
    cuda_graphs: bool = False
    tf32: bool = False
    cudnn_benchmark: bool | None = None
    fold_bn: bool = False
    fp16_weights: bool = False

    FLAGS: ClassVar[dict[str, str]] = {
        "channels_last": "--channels-last",
        "compile_mode": "--compile",
        "cuda_graphs": "--cuda-graphs",
        "tf32": "--tf32",
        "cudnn_benchmark": "--cudnn-benchmark",
        "fold_bn": "--fold-bn",
        "fp16_weights": "--fp16-weights",
    }

    def asked(self) -> list[str]:
        """The command-line flags of the options that are set."""
        return [flag for name, flag in self.FLAGS.items() if getattr(self, name)]

    def backend_kwargs(self, on_gpu: bool) -> dict[str, Any]:
        """Keyword arguments for the torch backend, the None defaults resolved for the device."""
        kwargs = {name: getattr(self, name) for name in self.FLAGS}
        for name in ("channels_last", "cudnn_benchmark"):
            if kwargs[name] is None:
                kwargs[name] = on_gpu
        return kwargs


@dataclass(frozen=True)
class Option:
    """An option that only some backends take.

    Attributes:
        field: the :class:`DetectorSpec` field.
        flag: its command-line flag.
        owners: the backends that take it.
        hints: what to do instead, per backend that refuses it (``{backend}`` is filled in).
        refused_by: the backends that refuse it (default: every backend but the owners).
    """

    field: str
    flag: str
    owners: tuple[str, ...]
    hints: dict[str, str] = dataclasses.field(default_factory=dict)
    refused_by: tuple[str, ...] | None = None

    def refusal(self, backend: str) -> str | None:
        """The one-line refusal of this option on ``backend``, or None if ``backend`` takes it."""
        refused = (
            self.refused_by if self.refused_by is not None else tuple(b for b in BACKEND_NAMES if b not in self.owners)
        )
        if backend not in refused:
            return None
        owners = " or ".join(self.owners)
        hint = self.hints.get(backend, self.hints.get("*", "")).format(backend=backend)
        return f"{self.flag} is for --backend {owners}" + (f"; {hint}" if hint else "")


OPTIONS: tuple[Option, ...] = (
    Option("checkpoint", "--checkpoint", (TORCH,), {"*": "--backend {backend} runs the weights inside --model"}),
    Option("model", "--model", GRAPH_BACKENDS, {TORCH: "the torch backend takes --checkpoint"}),
    Option("providers", "--providers", (ONNXRUNTIME,), {OPENVINO: "OpenVINO runs on the CPU"}, refused_by=(OPENVINO,)),
    Option(
        "bf16",
        "--bf16",
        (TORCH,),
        {
            OPENVINO: "use --precision bf16 with --backend openvino",
            ONNXRUNTIME: "an ONNX graph's precision is set when it is exported",
        },
    ),
    Option("optimize", "--optimize", (TORCH,), {"*": "--backend {backend} optimises the exported graph itself"}),
    Option(
        "precision",
        "--precision",
        (OPENVINO,),
        {
            TORCH: "with --backend torch use --fp16 or --bf16",
            ONNXRUNTIME: "with --backend onnxruntime use an export's precision (`paadet export --fp16`)",
        },
    ),
    Option("streams", "--streams", (OPENVINO,), {"*": "--backend {backend} runs one batch at a time"}),
    Option(
        "tta",
        "--tta",
        (TORCH,),
        {"*": "an exported graph ends in NMS, and TTA merges every view's candidates before it (docs/tta.md)"},
    ),
)
"""The options only some backends take: one table, read by :meth:`DetectorSpec.validate`."""


def auto_rule(spec: DetectorSpec) -> tuple[str | None, str]:
    """What ``--backend auto`` is left to choose from ``spec``'s other options: ``(backend, why)`` when an option
    decides it (``--tta`` and ``--bf16`` are the torch backend's, ``--precision`` OpenVINO's...), else ``(None,
    "")``: the fastest candidate is measured. No file is read.
    """
    model = (spec.model or "").lower()
    if spec.tta is not None:
        return TORCH, "--tta runs on the torch backend"
    if spec.bf16 or spec.optimize or spec.cuda.asked():
        return TORCH, "the options given are the torch backend's"
    if device_type(spec.device or "cpu") != "cpu":
        return TORCH, f"--device {spec.device}: the torch backend (the graph runtimes here run on the CPU)"
    if spec.precision is not None or spec.streams is not None or model.endswith(".xml"):
        return OPENVINO, "--precision, --streams and an IR .xml are OpenVINO's"
    if spec.providers is not None:
        return ONNXRUNTIME, "--providers is ONNX Runtime's"
    if spec.fp16:
        return (ONNXRUNTIME, "an fp16 graph: ONNX Runtime") if spec.model else (TORCH, "--fp16: the torch backend")
    return None, ""


def device_type(device: str) -> str:
    """``cuda`` for ``cuda`` / ``cuda:N``, else the text before any ``:`` (no torch needed)."""
    return str(device).split(":")[0].strip().lower()


def torch_option_error(
    device: str,
    fp16: bool = False,
    bf16: bool = False,
    optimize: bool = False,
    cuda_only: dict[str, Any] | None = None,
    fp16_weights: bool = False,
    compile_mode: str | None = None,
) -> str | None:
    """The first rule of the torch backend that these settings break (one line), or None.

    ``cuda_only``: the CUDA-only options (name -> value); those that are set are named in the message. With
    ``bf16`` on a CPU, ``channels_last`` is not one of them (the CPU's bfloat16 convolutions run channels-last).
    """
    on = device_type(device)
    if bf16 and fp16:
        return "--bf16 and --fp16 exclude each other: choose one reduced precision"
    if bf16 and optimize:
        return "--bf16 runs the eager network under autocast; leave --optimize out"
    if optimize and on != "cpu":
        return "optimize (trace + freeze) is for the CPU; on CUDA use fp16, channels_last, cuda_graphs or compile_mode"
    if fp16 and on != "cuda":
        return "--fp16 needs a CUDA device; on CPU run in fp32"
    cuda_only = dict(cuda_only or {})
    if bf16 and on == "cpu":  # channels-last is the CPU's bfloat16 layout, not a CUDA option there
        cuda_only.pop("channels_last", None)
    asked = [name for name, value in cuda_only.items() if value]
    if asked and on != "cuda":
        return f"{', '.join(asked)} need a CUDA device; the CPU path runs float32 (or bfloat16 with --bf16)"
    if fp16_weights and not fp16:
        return "fp16_weights needs fp16 (half precision)"
    if compile_mode is not None and compile_mode not in COMPILE_MODES:
        return f"unknown compile mode {compile_mode!r}; choose one of {', '.join(COMPILE_MODES)}"
    return None


def normalize_precision(precision: str | None) -> str:
    """OpenVINO's inference precision: ``f32`` (also ``fp32``, None) or ``bf16``; anything else raises
    ``ValueError``."""
    value = (precision or "f32").lower()
    value = {"fp32": "f32", "float32": "f32", "bfloat16": "bf16"}.get(value, value)
    if value not in OPENVINO_PRECISIONS:
        raise ValueError(f"unknown OpenVINO precision {precision!r}; use {' or '.join(OPENVINO_PRECISIONS)}")
    return value


@dataclass(frozen=True)
class DetectorSpec:
    """Every option of a detector.

    Attributes:
        backend: one of :data:`BACKEND_NAMES`, or :data:`AUTO` until a command resolves it
            (:func:`paadet.export.auto.resolve_auto`).
        checkpoint: the torch backend's mmdetection checkpoint (None: the official file, from the cache).
        model: the graph from ``paadet export`` that ONNX Runtime or OpenVINO runs (OpenVINO also reads an IR ``.xml``).
        providers: ONNX Runtime's execution providers, comma-separated (None: the best installed).
        preset: ``mmdet``, ``800`` or a :class:`~paadet.preprocess.Preset`; None: the checkpoint's training scale
            (else ``default_preset``) for the torch backend, the graph's for the others.
        device: ``cpu`` or ``cuda[:N]`` (the torch backend; OpenVINO runs on the CPU). None only for ``paadet bench``,
            which resolves it (CUDA when available) before anything else.
        batch_size: images per network call; None: the graph's static batch, else ``default_batch``.
        fp16: half precision (CUDA for the torch backend; a graph exported with ``--fp16`` for the others).
        bf16: the torch backend's bfloat16 autocast.
        precision: OpenVINO's inference precision, ``f32`` or ``bf16`` (None: f32).
        streams: OpenVINO's concurrent streams (None: 1).
        score_voting: PAA's score voting (for a graph: must match how it was exported).
        workers: threads decoding images ahead of the network.
        optimize: the torch backend on a CPU: trace and freeze the network.
        cuda: the torch backend's CUDA-only options.
        tta: test-time augmentation (the torch backend): the views each image is run at, merged by NMS and score
            voting; None: off.
        default_preset, default_batch: the command's defaults behind ``preset`` / ``batch_size`` None.
    """

    backend: str = TORCH
    checkpoint: str | None = None
    model: str | None = None
    providers: str | None = None
    preset: str | Preset | None = None
    device: str | None = "cpu"
    batch_size: int | None = None
    fp16: bool = False
    bf16: bool = False
    precision: str | None = None
    streams: int | None = None
    score_voting: bool = True
    workers: int = 2
    optimize: bool = False
    cuda: TorchOptions = field(default_factory=TorchOptions)
    tta: TTAOptions | None = None
    default_preset: str = "mmdet"
    default_batch: int = 1

    def replace(self, **changes: Any) -> DetectorSpec:
        return dataclasses.replace(self, **changes)

    @property
    def uses_graph(self) -> bool:
        """Whether the backend runs an exported graph (``--model``) rather than a checkpoint."""
        return self.backend in GRAPH_BACKENDS

    @property
    def title(self) -> str:
        """The backend's name for people: ``PyTorch``, ``ONNX Runtime``, ``OpenVINO``."""
        return TITLES.get(self.backend, self.backend)

    @property
    def weights_file(self) -> str | None:
        """The file that holds the weights: ``checkpoint`` (torch) or ``model`` (the graph backends)."""
        return self.model if self.uses_graph else self.checkpoint

    @property
    def weights_flag(self) -> str:
        return "--model" if self.uses_graph else "--checkpoint"

    def validate(self, need_model: bool = True) -> DetectorSpec:
        """Refuse options that do not go together, in one line, before any file is read; returns ``self``.

        ``need_model``: a graph backend needs ``model`` (``paadet bench`` exports one itself when it is missing).

        Raises:
            ValueError: an unknown backend or value, an option of another backend, a combination the backend
                cannot run.
        """
        if self.backend == AUTO:  # checked as the backend it will be, or the one a checkpoint / graph first gets
            forced, _ = auto_rule(self)
            first = forced or (ONNXRUNTIME if self.model is not None else TORCH)
            self.replace(backend=first).validate(need_model=False)
            return self
        if self.backend not in BACKEND_NAMES:
            raise ValueError(f"unknown backend {self.backend!r}; use {', '.join((*BACKEND_NAMES, AUTO))}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.streams is not None and self.streams < 1:
            raise ValueError(f"--streams must be >= 1, got {self.streams}")
        if self.workers < 0:
            raise ValueError(f"--workers must be >= 0, got {self.workers}")
        if self.preset is not None:
            get_preset(self.preset)
        for option in OPTIONS:
            value = getattr(self, option.field)
            refusal = option.refusal(self.backend) if value not in (None, False) else None
            if refusal:
                raise ValueError(refusal)
        device = self.device or "cpu"
        if self.backend == OPENVINO:
            normalize_precision(self.precision)
            if device_type(device) != "cpu":
                raise ValueError(f"--backend openvino runs on the CPU, not --device {self.device}")
        asked = self.cuda.asked()
        if self.uses_graph:
            if asked:
                raise ValueError(
                    f"{', '.join(asked)} are options of the torch backend on CUDA; this run uses "
                    f"{self.title} (give --backend torch --device cuda)"
                )
            if need_model and self.model is None:
                raise ValueError(f"--backend {self.backend} needs --model FILE.onnx (make one with `paadet export`)")
            return self
        error = torch_option_error(
            device,
            fp16=self.fp16,
            bf16=self.bf16,
            optimize=self.optimize,
            fp16_weights=self.cuda.fp16_weights,
            compile_mode=self.cuda.compile_mode,
            cuda_only=dataclasses.asdict(self.cuda),
        )
        if error:
            raise ValueError(error)
        return self

    def fingerprint(self) -> dict[str, Any]:
        """The settings that decide the detections (JSON-normalised): a resumed batch run must use the same ones.

        The weights file is named here by path; ``paadet batch`` identifies its contents by their SHA-256.
        """
        return json.loads(
            json.dumps(
                {
                    "backend": self.backend,
                    "checkpoint": os.path.abspath(self.checkpoint) if self.checkpoint else None,
                    "model": os.path.abspath(self.model) if self.model else None,
                    "preset": dataclasses.asdict(get_preset(self.preset)) if self.preset is not None else None,
                    "fp16": self.fp16,
                    "score_voting": self.score_voting,
                    "optimize": self.optimize,
                    **({"bf16": True} if self.bf16 else {}),  # absent when off: runs from before the flag resume
                    **({"precision": self.precision} if self.precision not in (None, "f32") else {}),  # OpenVINO bf16
                    **({"tta": self.tta.to_dict()} if self.tta is not None else {}),
                }
            )
        )
