"""Options shared by the commands that run a model, and building a :class:`Detector` from them."""
from __future__ import annotations

import argparse

from typing import TYPE_CHECKING

from ..preprocess import PRESETS, Preset, get_preset

if TYPE_CHECKING:
    from ..detector import Detector


def add_model_options(parser: argparse.ArgumentParser, default_preset: str = "mmdet", default_batch: int = 1) -> None:
    """``--backend --model --providers --checkpoint --preset --device --batch-size --fp16 --precision --no-score-voting --workers``.

    ``--preset`` and ``--batch-size`` are None unless given: :func:`build_detector` then takes the
    command's defaults (recorded here as ``default_preset`` / ``default_batch``) for the torch backend
    and the graph's settings for ONNX Runtime.
    """
    parser.set_defaults(default_preset=default_preset, default_batch=default_batch)
    g = parser.add_argument_group("model")
    g.add_argument("--backend", choices=("torch", "onnxruntime", "openvino"), default="torch",
                   help="runtime (default: torch; openvino needs `pip install \"paadet[openvino]\"`)")
    g.add_argument("--checkpoint", default=None,
                   help="mmdetection checkpoint (.pth) for the torch backend; default: the official file, "
                        "downloaded to the cache folder if missing")
    g.add_argument("--model", default=None,
                   help="ONNX graph from `paadet export` (onnxruntime and openvino backends; openvino also reads an IR .xml)")
    g.add_argument("--providers", default=None,
                   help="comma-separated ONNX Runtime execution providers (default: the best installed)")
    g.add_argument("--preset", choices=tuple(PRESETS), default=None,
                   help=f"pre-processing: mmdet = fit 1333x800, pad to /32; 800 = fit and pad to 800x800 "
                        f"(default: the checkpoint's training scale when it records one, else {default_preset}; "
                        "with --backend onnxruntime, the graph's)")
    g.add_argument("--device", default="cpu", help="cpu or cuda[:N] (torch backend; default: cpu)")
    g.add_argument("--batch-size", type=positive_int, default=None,
                   help=f"images per network call (default: {default_batch}; with --backend onnxruntime, the graph's static batch)")
    g.add_argument("--fp16", action="store_true", help="half precision (CUDA for the torch backend)")
    g.add_argument("--bf16", action="store_true",
                   help="torch backend: bfloat16 autocast (CPUs with AVX512-BF16 or AMX, or CUDA); detections change slightly")
    g.add_argument("--precision", choices=("f32", "bf16"), default=None,
                   help="openvino backend: inference precision (default: f32; bf16 uses AMX / AVX512_BF16 and "
                        "changes detections slightly)")
    g.add_argument("--streams", type=positive_int, default=None,
                   help="openvino backend: batches run at once, each on its share of the threads (OpenVINO's "
                        "NUM_STREAMS; default: 1)")
    g.add_argument("--no-score-voting", action="store_true", help="skip PAA's score voting (torch backend)")
    g.add_argument("--workers", type=nonnegative_int, default=2, help="threads decoding images ahead of the network (default: 2)")
    g.add_argument("--optimize", action="store_true",
                   help="torch backend on CPU: trace and freeze the network (BatchNorm folded, oneDNN), "
                        "up to 25%% faster after a one-off ~15 s; logits differ from the exact path by ~1e-5")


def build_detector(
    backend: str = "torch",
    checkpoint: str | None = None,
    model: str | None = None,
    providers: str | None = None,
    preset: str | Preset | None = None,
    device: str = "cpu",
    batch_size: int | None = None,
    fp16: bool = False,
    score_voting: bool = True,
    workers: int = 2,
    default_preset: str = "mmdet",
    bf16: bool = False,
    default_batch: int = 1,
    optimize: bool = False,
    precision: str | None = None,
    streams: int | None = None,
) -> Detector:
    """The detector the command-line options describe.

    ``preset`` / ``batch_size`` None mean the checkpoint's preset (``meta.preset``, when it records one)
    or ``default_preset`` / ``default_batch`` for the torch backend, and the graph's preset / static
    batch for ONNX Runtime and OpenVINO. For those, ``fp16`` and
    ``score_voting=False`` must agree with how the graph was exported (they are baked into it).
    ``precision`` (``f32`` / ``bf16``, default f32) is OpenVINO's inference precision and ``streams`` (default
    1) its number of concurrent streams, for ``openvino`` only.
    """
    from ..detector import Detector

    if batch_size is not None and batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    if precision is not None and backend != "openvino":
        raise ValueError(f"--precision is for --backend openvino; with --backend {backend} use "
                         + ("--fp16 or --bf16" if backend == "torch" else "an export's precision (`paadet export --fp16`)"))
    if streams is not None and backend != "openvino":
        raise ValueError(f"--streams is for --backend openvino; --backend {backend} runs one batch at a time")
    if backend == "torch":
        if model is not None:
            raise ValueError("--model is for --backend onnxruntime; the torch backend takes --checkpoint")
        # no --preset: the checkpoint's own (a paadet-trained model records its input scale), else the default
        return Detector.from_checkpoint(checkpoint, preset=get_preset(preset) if preset else None,
                                        default_preset=default_preset, device=device, fp16=fp16,
                                        score_voting=score_voting, batch_size=batch_size or default_batch, workers=workers,
                                        optimize=optimize, bf16=bf16)
    if bf16:
        raise ValueError("--bf16 is for --backend torch; " + ("use --precision bf16 with --backend openvino"
                         if backend == "openvino" else "an ONNX graph's precision is set when it is exported"))
    if model is None:
        raise ValueError(f"--backend {backend} needs --model FILE.onnx (make one with `paadet export`)")
    if checkpoint is not None:
        raise ValueError(f"--checkpoint is for --backend torch; --backend {backend} runs the weights inside --model")
    if optimize:
        raise ValueError(f"--optimize is for --backend torch; --backend {backend} optimises the exported graph itself")
    if backend == "openvino":
        if providers is not None:
            raise ValueError("--providers is for --backend onnxruntime; OpenVINO runs on the CPU")
        from ..runtime.openvino_backend import OpenVinoBackend

        ort_backend = OpenVinoBackend.from_file(model, preset=get_preset(preset) if preset is not None else None,
                                                precision=precision or "f32", streams=streams or 1)
    else:
        from ..runtime.onnxruntime_backend import OnnxRuntimeBackend, parse_providers

        ort_backend = OnnxRuntimeBackend.from_file(model, providers=parse_providers(providers),
                                                   preset=get_preset(preset) if preset is not None else None)
    info = ort_backend.info
    if fp16 and info.precision != "fp16":
        raise ValueError(f"--fp16 given but {model} is an {info.precision} graph; re-export it with `paadet export --fp16`")
    if not score_voting and info.graph == "full" and info.score_voting:
        raise ValueError(f"--no-score-voting given but {model} has score voting inside; "
                         "re-export it with `paadet export --no-score-voting`")
    if batch_size is not None and ort_backend.fixed_batch is not None and batch_size > ort_backend.fixed_batch:
        raise ValueError(f"{model}: --batch-size {batch_size} asked, but the graph has a static batch of "
                         f"{ort_backend.fixed_batch}; use --batch-size {ort_backend.fixed_batch} or less, "
                         "or re-export with `paadet export --dynamic-batch`")
    return Detector(ort_backend, batch_size=batch_size or ort_backend.fixed_batch or default_batch, workers=workers)


def detector_from_args(args: argparse.Namespace) -> Detector:
    """Unpack the options of :func:`add_model_options` into :func:`build_detector`."""
    return build_detector(
        backend=args.backend, checkpoint=args.checkpoint, model=args.model, providers=args.providers,
        preset=args.preset, device=args.device, batch_size=args.batch_size, fp16=args.fp16,
        score_voting=not args.no_score_voting, workers=args.workers,
        default_preset=args.default_preset, default_batch=args.default_batch, optimize=args.optimize,
        bf16=args.bf16, precision=getattr(args, "precision", None), streams=getattr(args, "streams", None),
    )


def _number(kind: type, minimum: float, strict: bool):
    """An argparse ``type=`` that parses ``kind`` and requires ``> minimum`` (strict) or ``>= minimum``."""
    relation = ">" if strict else ">="
    bound = minimum
    if kind is int and strict:  # "> 0" for an integer reads better as ">= 1"
        relation, bound = ">=", minimum + 1

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") from None
        if value != value or (value <= minimum if strict else value < minimum):  # NaN fails too
            raise argparse.ArgumentTypeError(f"must be {relation} {bound:g}, got {text}")
        return value

    parse.__name__ = f"{kind.__name__} {relation} {bound:g}"
    return parse


positive_int = _number(int, 0, strict=True)
"""argparse type: an integer >= 1 (argparse names the flag in its message)."""
nonnegative_int = _number(int, 0, strict=False)
"""argparse type: an integer >= 0."""
positive_float = _number(float, 0.0, strict=True)
"""argparse type: a number > 0."""
nonnegative_float = _number(float, 0.0, strict=False)
"""argparse type: a number >= 0."""


def probability(text: str) -> float:
    """argparse type: a number in [0, 1]."""
    value = nonnegative_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value
