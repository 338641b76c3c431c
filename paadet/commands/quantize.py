"""``paadet quantize``: post-training INT8 quantisation of an exported graph, calibrated on the user's images."""

from __future__ import annotations

import argparse

from paadet.commands.options import positive_int
from paadet.export.quantize import DEFAULT_MAX_IMAGES, METHODS


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "quantize",
        help="INT8 post-training quantisation of an exported graph (runs on openvino or onnxruntime)",
        description="Quantise the network of a full fp32 `paadet export` graph to INT8 (ONNX QDQ), calibrated on a "
        "folder of your images; pre- and post-processing (NMS, score voting) stay float32. The output "
        "runs with --backend openvino (int8 kernels) or --backend onnxruntime.",
    )
    p.add_argument("--model", required=True, help="the fp32 .onnx written by `paadet export` (full graph)")
    p.add_argument(
        "--calib",
        required=True,
        metavar="DIR",
        help="folder of calibration images (searched recursively), like the images the model will see",
    )
    p.add_argument("--output", required=True, help="the INT8 .onnx to write")
    p.add_argument(
        "--method",
        choices=METHODS,
        default="nncf",
        help="nncf: NNCF post-training quantisation (default; needs paadet[quantize]); "
        "ort: ONNX Runtime's static quantiser",
    )
    p.add_argument(
        "--max-images",
        type=positive_int,
        default=DEFAULT_MAX_IMAGES,
        help=f"calibrate on at most this many images, evenly spread over the folder (default: {DEFAULT_MAX_IMAGES})",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--verbose", action="store_true", help="show NNCF's own INFO log (a line per node kept in float)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from paadet.export.quantize import quantize_export

    report = quantize_export(
        args.model,
        args.calib,
        args.output,
        method=args.method,
        max_images=args.max_images,
        progress=not args.no_progress,
        verbose=args.verbose,
    )
    print(report)
    print("next:")
    print(f"  paadet predict IMAGES --backend openvino --model {report.output} --output results.json")
    print(f"  paadet eval --backend openvino --model {report.output} --ann ANNOTATIONS.json --images IMAGES")
    print(f"  paadet bench --backend openvino --model {report.output}")
    return 0
