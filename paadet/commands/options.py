"""The flags shared by the commands that run a model, read back as one :class:`~paadet.runtime.spec.DetectorSpec`,
and the argparse types of every command's numbers.

Each command that runs a model holds one :class:`ModelOptions` with its own defaults: it adds the flags to the
command's parser and turns the parsed flags into the spec that is handed down (nothing below ``commands``
sees an ``argparse.Namespace``).

Every number type here refuses NaN and infinities (``nan``, ``inf``, ``1e999``) at parse time, with the range it
takes, so that no command starts work on a value it cannot use.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from paadet.preprocess import PRESETS
from paadet.runtime.spec import AUTO, BACKEND_NAMES, TORCH, DetectorSpec, TorchOptions
from paadet.runtime.tta import DEFAULT_SCALES, TTAOptions, format_scales, parse_scales


@dataclass(frozen=True)
class ModelOptions:
    """The model flags of one command and that command's defaults.

    Attributes:
        default_preset: the preset when neither ``--preset`` nor the checkpoint names one (torch backend).
        default_batch: ``--batch-size`` when not given and the graph has no static batch.
    """

    default_preset: str = "mmdet"
    default_batch: int = 1

    def add_to(self, parser: argparse.ArgumentParser) -> None:
        """``--backend --checkpoint --model --providers --preset --device --batch-size --fp16 --bf16 --precision
        --streams --no-score-voting --workers --optimize --tta --tta-scales --no-tta-flip``."""
        g = parser.add_argument_group("model")
        g.add_argument(
            "--backend",
            choices=(*BACKEND_NAMES, AUTO),
            default=TORCH,
            help="runtime (default: torch, the one that matches mmdetection exactly; openvino needs `pip install "
            '"paadet[openvino]"`); auto: the fastest here at fp32, measured once: the checkpoint is exported to the '
            "cache folder (keyed by its SHA-256) and checked, the choice remembered (docs/predict.md)",
        )
        g.add_argument(
            "--checkpoint",
            metavar="FILE|NAME",
            default=None,
            help="checkpoint for the torch backend: a .pth file, or a model name of `paadet models` "
            "(e.g. paa_r101_fpn_ms-3x_coco: its file in the cache folder, downloaded once; an existing file "
            "of that name wins); default: paa_r50_fpn_1x_coco",
        )
        g.add_argument(
            "--model",
            default=None,
            help="ONNX graph from `paadet export` (onnxruntime and openvino backends; openvino also reads an IR .xml)",
        )
        g.add_argument(
            "--providers",
            default=None,
            help="comma-separated ONNX Runtime execution providers (default: the best installed)",
        )
        g.add_argument(
            "--preset",
            choices=tuple(PRESETS),
            default=None,
            help=f"pre-processing: mmdet = fit 1333x800, pad to /32; 800 = fit and pad to 800x800 "
            f"(default: the checkpoint's training scale when it records one, else {self.default_preset}; "
            "with --backend onnxruntime, the graph's)",
        )
        g.add_argument("--device", default="cpu", help="cpu or cuda[:N] (torch backend; default: cpu)")
        g.add_argument(
            "--batch-size",
            type=positive_int,
            default=None,
            help=f"images per network call (default: {self.default_batch}; "
            "with --backend onnxruntime, the graph's static batch)",
        )
        g.add_argument("--fp16", action="store_true", help="half precision (CUDA for the torch backend)")
        g.add_argument(
            "--bf16",
            action="store_true",
            help="torch backend: bfloat16 autocast (CPUs with AVX512-BF16 or AMX, or CUDA); detections change slightly",
        )
        g.add_argument(
            "--precision",
            choices=("f32", "bf16"),
            default=None,
            help="openvino backend: inference precision (default: f32; bf16 uses AMX / AVX512_BF16 and "
            "changes detections slightly)",
        )
        g.add_argument(
            "--streams",
            type=positive_int,
            default=None,
            help="openvino backend: batches run at once, each on its share of the threads (OpenVINO's "
            "NUM_STREAMS; default: 1)",
        )
        g.add_argument("--no-score-voting", action="store_true", help="skip PAA's score voting (torch backend)")
        g.add_argument(
            "--workers",
            type=nonnegative_int,
            default=2,
            help="threads decoding images ahead of the network (default: 2)",
        )
        g.add_argument(
            "--optimize",
            action="store_true",
            help="torch backend on CPU: trace and freeze the network (BatchNorm folded, oneDNN), "
            "2-32%% more images/s in docs/benchmarks.md after a one-off ~15 s; "
            "logits differ from the exact path by ~1e-5",
        )
        add_tta_flags(g)

    def spec(self, args: argparse.Namespace, **overrides: Any) -> DetectorSpec:
        """The validated spec of the parsed flags (``overrides`` replace fields)."""
        return spec_from_args(
            args, default_preset=self.default_preset, default_batch=self.default_batch, **overrides
        ).validate()


def resolve_backend(spec: DetectorSpec) -> DetectorSpec:
    """``--backend auto`` resolved to a backend (:func:`paadet.export.auto.resolve_auto`: the first run exports and
    measures), its one line printed on stderr; any other spec unchanged."""
    if spec.backend != AUTO:
        return spec
    from paadet.console import stderr
    from paadet.export.auto import resolve_auto

    choice = resolve_auto(spec)
    stderr(choice.line())
    return choice.spec


_SPEC_FIELDS = tuple(f.name for f in dataclasses.fields(DetectorSpec) if f.name not in ("cuda", "score_voting", "tta"))


def _tta_scales(text: str):
    try:
        return parse_scales(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("--tta-scales: ")) from None


def add_tta_flags(group: argparse._ArgumentGroup) -> None:
    """``--tta --tta-scales --no-tta-flip`` (test-time augmentation, torch backend; docs/tta.md)."""
    default = format_scales(DEFAULT_SCALES)
    group.add_argument(
        "--tta",
        action="store_true",
        help=f"test-time augmentation (torch backend): run each image at several scales, as is and flipped, "
        f"and merge all views by NMS and score voting (default views: scales {default} of the preset, "
        "each flipped too; about 6x the time)",
    )
    group.add_argument(
        "--tta-scales",
        type=_tta_scales,
        default=None,
        metavar="LIST",
        help=f"the views' scales, comma-separated: factors of the preset's scale (0.8) or sizes LONGxSHORT "
        f"(1333x640); implies --tta (default: {default})",
    )
    group.add_argument(
        "--no-tta-flip", action="store_true", help="with --tta: leave out the flipped views (half the time)"
    )


def tta_from_args(args: argparse.Namespace) -> TTAOptions | None:
    """The :class:`TTAOptions` of ``--tta`` / ``--tta-scales`` / ``--no-tta-flip``, or None (off).

    Raises:
        ValueError: ``--no-tta-flip`` without ``--tta`` or ``--tta-scales``.
    """
    scales = getattr(args, "tta_scales", None)
    no_flip = getattr(args, "no_tta_flip", False)
    if not (getattr(args, "tta", False) or scales is not None):
        if no_flip:
            raise ValueError("--no-tta-flip needs --tta (or --tta-scales)")
        return None
    return TTAOptions(scales if scales is not None else DEFAULT_SCALES, flip=not no_flip)


_CUDA_FIELDS = tuple(f.name for f in dataclasses.fields(TorchOptions))


def spec_from_args(args: argparse.Namespace, **overrides: Any) -> DetectorSpec:
    """A :class:`DetectorSpec` from the flags ``args`` has (each flag's ``dest`` is the spec field it sets;
    ``--no-score-voting`` sets ``score_voting``), then ``overrides``. Not validated."""
    values: dict[str, Any] = {name: getattr(args, name) for name in _SPEC_FIELDS if hasattr(args, name)}
    if hasattr(args, "no_score_voting"):
        values["score_voting"] = not args.no_score_voting
    cuda = {name: getattr(args, name) for name in _CUDA_FIELDS if hasattr(args, name)}
    if cuda:
        values["cuda"] = TorchOptions(**cuda)
    if hasattr(args, "tta"):
        values["tta"] = tta_from_args(args)
    values.update(overrides)
    return DetectorSpec(**values)


def _parse(kind: type, text: str, expected: str):
    """``kind(text)``, refusing what is not a number of that kind and (for floats) NaN and infinities; the
    message says the range ``expected`` (``>= 0``)."""
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected {'an integer' if kind is int else 'a number'}, got {text!r}"
        ) from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number {expected}, got {text!r}")
    return value


def _number(kind: type, minimum: float, strict: bool):
    """An argparse ``type=`` that parses ``kind`` (a finite one) and requires ``> minimum`` (strict) or
    ``>= minimum``."""
    relation = ">" if strict else ">="
    bound = minimum
    if kind is int and strict:  # "> 0" for an integer reads better as ">= 1"
        relation, bound = ">=", minimum + 1

    def parse(text: str):
        value = _parse(kind, text, f"{relation} {bound:g}")
        if value <= minimum if strict else value < minimum:
            raise argparse.ArgumentTypeError(f"must be {relation} {bound:g}, got {text}")
        return value

    parse.__name__ = f"{kind.__name__} {relation} {bound:g}"
    return parse


def bounded_float(low: float, high: float, lower_open: bool = False, upper_open: bool = False):
    """An argparse ``type=``: a finite number from ``low`` to ``high`` (each end excluded when ``*_open``)."""

    def show(v: float) -> str:
        return str(int(v)) if v == int(v) else f"{v:g}"

    interval = f"{'(' if lower_open else '['}{show(low)}, {show(high)}{')' if upper_open else ']'}"

    def parse(text: str) -> float:
        value = _parse(float, text, f"in {interval}")
        too_low = value <= low if lower_open else value < low
        too_high = value >= high if upper_open else value > high
        if too_low or too_high:
            raise argparse.ArgumentTypeError(f"must be in {interval}, got {text}")
        return value

    parse.__name__ = f"float in {interval}"
    return parse


positive_int = _number(int, 0, strict=True)
"""argparse type: an integer >= 1 (argparse names the flag in its message)."""
nonnegative_int = _number(int, 0, strict=False)
"""argparse type: an integer >= 0."""
positive_float = _number(float, 0.0, strict=True)
"""argparse type: a finite number > 0."""
nonnegative_float = _number(float, 0.0, strict=False)
"""argparse type: a finite number >= 0."""


def probability(text: str) -> float:
    """argparse type: a number in [0, 1]."""
    value = nonnegative_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value
