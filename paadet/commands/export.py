"""``paadet export``: write the ONNX graph (pixels to detections, or the raw network) and check it."""

from __future__ import annotations

import argparse

from paadet.commands.options import positive_int
from paadet.fileio import check_output_file
from paadet.preprocess import PRESETS


def _size(text: str) -> tuple[int, int]:
    """``800x1344`` (height x width) -> ``(800, 1344)``."""
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HEIGHTxWIDTH such as 800x1344, got {text!r}") from None
    if h < 1 or w < 1:
        raise argparse.ArgumentTypeError(f"height and width must be >= 1, got {text!r}")
    return h, w


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "export",
        help="export PAA to ONNX (one graph: uint8 pixels in, detections out)",
        description="Export PAA to ONNX: normalisation, network, decoding, NMS and score voting in one graph "
        "(or --raw: the network's 15 maps only), check it and compare it with PyTorch once.",
    )
    p.add_argument("--output", default="paa.onnx", help="ONNX file to write (default: paa.onnx)")
    p.add_argument(
        "--checkpoint",
        metavar="FILE|NAME",
        default=None,
        help="mmdetection checkpoint (.pth), or a model name of `paadet models` (downloaded once); "
        "default: paa_r50_fpn_1x_coco, downloaded if missing",
    )
    p.add_argument(
        "--preset",
        choices=tuple(PRESETS),
        default=None,
        help="pre-processing the graph expects: mmdet = dynamic height/width (each image padded to /32), "
        "800 = static 800x800 (default: the checkpoint's training scale when it records one, "
        "else mmdet)",
    )
    batch = p.add_mutually_exclusive_group()
    batch.add_argument("--batch-size", type=positive_int, default=1, help="static batch size (default: 1)")
    batch.add_argument("--dynamic-batch", action="store_true", help="dynamic batch dimension")
    p.add_argument(
        "--input-size",
        type=_size,
        default=None,
        metavar="HxW",
        help="fix the input height and width (multiples of 32) of an mmdet-preset graph, e.g. 800x1344; "
        "padding images up to it changes detections slightly (GroupNorm sees the padding)",
    )
    p.add_argument(
        "--fp16",
        action="store_true",
        help="half-precision network; GroupNorm, normalisation and post-processing stay fp32",
    )
    p.add_argument(
        "--raw",
        action="store_true",
        help="export only the network: normalised float32 [N, 3, H, W] in, 15 raw maps out",
    )
    p.add_argument("--opset", type=positive_int, default=None, help="ONNX opset (default: 20)")
    p.add_argument("--no-score-voting", action="store_true", help="leave PAA's score voting out of the graph")
    p.add_argument("--no-simplify", action="store_true", help="skip onnxslim")
    p.add_argument("--no-verify", action="store_true", help="skip the ONNX Runtime vs PyTorch check")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    check_output_file(args.output, "--output", inputs=[args.checkpoint] if args.checkpoint else [])
    from paadet.export import export_onnx

    report = export_onnx(
        args.checkpoint,
        args.output,
        preset=args.preset,
        batch_size=args.batch_size,
        dynamic_batch=args.dynamic_batch,
        fp16=args.fp16,
        raw=args.raw,
        opset=args.opset,
        score_voting=not args.no_score_voting,
        simplify=not args.no_simplify,
        verify=not args.no_verify,
        input_size=args.input_size,
    )
    print(report)
    return 0 if report.parity_ok is not False else 1
