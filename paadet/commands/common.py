"""Options shared by the commands that run a model, and building a :class:`Detector` from them."""
from __future__ import annotations

import argparse

from ..detector import Detector
from ..postprocess import PostprocessConfig
from ..preprocess import PRESETS, get_preset


def add_model_options(parser: argparse.ArgumentParser, default_preset: str = "mmdet", default_batch: int = 1) -> None:
    """``--backend --model --providers --checkpoint --preset --device --batch-size --fp16 --no-score-voting --workers``."""
    g = parser.add_argument_group("model")
    g.add_argument("--backend", choices=("torch", "onnxruntime"), default="torch",
                   help="runtime (default: torch)")
    g.add_argument("--checkpoint", default=None,
                   help="mmdetection checkpoint (.pth) for the torch backend; default: the official file, "
                        "downloaded to the cache folder if missing")
    g.add_argument("--model", default=None, help="ONNX graph from `paadet export` (onnxruntime backend)")
    g.add_argument("--providers", default=None,
                   help="comma-separated ONNX Runtime execution providers (default: the best installed)")
    g.add_argument("--preset", choices=tuple(PRESETS), default=default_preset,
                   help=f"pre-processing: mmdet = fit 1333x800, pad to /32; 800 = fit and pad to 800x800 (default: {default_preset})")
    g.add_argument("--device", default="cpu", help="cpu or cuda[:N] (torch backend; default: cpu)")
    g.add_argument("--batch-size", type=int, default=default_batch, help=f"images per network call (default: {default_batch})")
    g.add_argument("--fp16", action="store_true", help="half precision (CUDA for the torch backend)")
    g.add_argument("--no-score-voting", action="store_true", help="skip PAA's score voting (torch backend)")
    g.add_argument("--workers", type=int, default=2, help="threads decoding images ahead of the network (default: 2)")


def build_detector(
    backend: str = "torch",
    checkpoint: str | None = None,
    model: str | None = None,
    providers: str | None = None,
    preset: str = "mmdet",
    device: str = "cpu",
    batch_size: int = 1,
    fp16: bool = False,
    score_voting: bool = True,
    workers: int = 2,
) -> Detector:
    """The detector the command-line options describe."""
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    if backend == "torch":
        if model is not None:
            raise ValueError("--model is for --backend onnxruntime; the torch backend takes --checkpoint")
        return Detector.from_checkpoint(checkpoint, preset=preset, device=device, fp16=fp16,
                                        score_voting=score_voting, batch_size=batch_size, workers=workers)
    if model is None:
        raise ValueError("--backend onnxruntime needs --model FILE.onnx (make one with `paadet export`)")
    from ..runtime.onnxruntime_backend import OnnxRuntimeBackend

    provider_list = [p.strip() for p in providers.split(",") if p.strip()] if providers else None
    ort_backend = OnnxRuntimeBackend.from_file(model, providers=provider_list, preset=get_preset(preset))
    return Detector(ort_backend, batch_size=batch_size, workers=workers)


def detector_from_args(args: argparse.Namespace) -> Detector:
    """Unpack the options of :func:`add_model_options` into :func:`build_detector`."""
    return build_detector(
        backend=args.backend, checkpoint=args.checkpoint, model=args.model, providers=args.providers,
        preset=args.preset, device=args.device, batch_size=args.batch_size, fp16=args.fp16,
        score_voting=not args.no_score_voting, workers=args.workers,
    )
