"""``paadet bench``: images per second, ``engine`` (the network alone) and ``e2e`` (JPEG files to detections)."""

from __future__ import annotations

import argparse

from paadet.bench.settings import BACKEND_CHOICES, DECODE_MODES
from paadet.commands.options import add_tta_flags, nonnegative_int, positive_int, spec_from_args
from paadet.fileio import atomic_write_json, check_output_file
from paadet.preprocess import PRESETS
from paadet.runtime.spec import AUTO, COMPILE_MODES


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "bench",
        help="measure speed: engine (network alone) and e2e (JPEG files to detections)",
        description=(
            "Time the detector two ways and say what each includes. engine: the network alone on a "
            "device-resident batch, synchronised timers (the model-zoo entry's definition). e2e: JPEG files "
            "on disk to final detections in host memory (decode, pre-process, copy, network, post-process, "
            "copy back), stage by stage. Without --checkpoint (and no official file in the cache) the weights "
            "are random: timing only."
        ),
    )
    g = p.add_argument_group("model")
    g.add_argument(
        "--backend",
        choices=BACKEND_CHOICES,
        default=AUTO,
        help="runtime (default: auto = torch on CUDA; on a CPU the fastest fp32 one installed, ONNX Runtime "
        "or OpenVINO f32, timed on the first image and named in the report; --precision picks OpenVINO; "
        "the weights are exported to a temporary graph when no --model is given)",
    )
    g.add_argument(
        "--model",
        default=None,
        help="ONNX graph from `paadet export` (onnxruntime / openvino backends; "
        "default: export the weights on the fly)",
    )
    g.add_argument("--providers", default=None, help="comma-separated ONNX Runtime execution providers")
    g.add_argument(
        "--checkpoint",
        metavar="FILE|NAME",
        default=None,
        help="mmdetection checkpoint (.pth), or a model name of `paadet models` (downloaded once); default: "
        "the official file if cached (never downloaded), else random weights (timing only)",
    )
    g.add_argument(
        "--preset",
        choices=tuple(PRESETS),
        default=None,
        help="pre-processing preset (default: the graph's with --model, else 800)",
    )
    g.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda if available, else cpu)")
    g.add_argument(
        "--batch-size",
        type=positive_int,
        default=None,
        help="images per network call (default: the graph's static batch with --model, else 32 on GPU, 1 on CPU)",
    )
    g.add_argument("--fp16", action="store_true", help="half precision (CUDA, torch backend)")
    g.add_argument(
        "--precision",
        choices=("f32", "bf16"),
        default=None,
        help="openvino backend: inference precision (default: f32)",
    )
    g.add_argument("--no-score-voting", action="store_true", help="skip PAA's score voting")
    add_tta_flags(g)
    t = p.add_argument_group("timing")
    t.add_argument(
        "--warmup", type=nonnegative_int, default=None, help="untimed batches first (default: 3 on GPU, 1 on CPU)"
    )
    t.add_argument(
        "--iters",
        type=positive_int,
        default=None,
        help="exactly this many timed batches per figure (default: until each has >= 20 batches and >= 10 s)",
    )
    t.add_argument(
        "--images",
        default=None,
        metavar="DIR",
        help="time these image files (each at least once by e2e, cycled as needed; default: generated JPEGs in a "
        "temporary folder)",
    )
    t.add_argument("--json", default=None, metavar="FILE", help="also write the full report here")
    t.add_argument("--skip-engine", action="store_true", help="time e2e only")
    c = p.add_argument_group("CUDA options (torch backend)")
    c.add_argument(
        "--channels-last",
        dest="channels_last",
        action="store_true",
        default=None,
        help="channels-last memory format (default: on for CUDA)",
    )
    c.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    c.add_argument(
        "--compile",
        dest="compile_mode",
        nargs="?",
        const="default",
        default=None,
        choices=COMPILE_MODES,
        help="torch.compile the network (mode; default mode if none given)",
    )
    c.add_argument("--cuda-graphs", action="store_true", help="replay the network as a CUDA graph")
    c.add_argument("--tf32", action="store_true", help="allow TF32 in FP32 convolutions")
    c.add_argument(
        "--cudnn-benchmark",
        dest="cudnn_benchmark",
        action="store_true",
        default=None,
        help="let cuDNN pick convolution algorithms by timing them (default: on for CUDA)",
    )
    c.add_argument("--no-cudnn-benchmark", dest="cudnn_benchmark", action="store_false")
    c.add_argument("--fold-bn", action="store_true", help="fold the ResNet's BatchNorms into its convolutions")
    c.add_argument(
        "--fp16-weights",
        action="store_true",
        help="with --fp16: keep the network in float16 and run it without autocast (GroupNorm in float16)",
    )
    c.add_argument(
        "--decode",
        choices=DECODE_MODES,
        default="auto",
        help="where e2e decodes JPEGs: gpu = nvJPEG via torchvision (800 preset); auto = gpu when possible",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from paadet.bench import BenchTiming, format_report, run_benchmark

    if args.json:
        check_output_file(args.json, "--json")
    spec = spec_from_args(args, default_preset="800")
    timing = BenchTiming(
        warmup=args.warmup, iters=args.iters, images=args.images, decode=args.decode, skip_engine=args.skip_engine
    )
    report = run_benchmark(spec, timing)
    print(format_report(report))
    if args.json:
        atomic_write_json(args.json, report, indent=2)
        print(f"wrote {args.json}")
    return 0
