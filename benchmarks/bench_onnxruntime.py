"""ONNX Runtime (CPU) vs the torch backend (CPU) on the same generated images and preset, in one run.

Both backends get the same resized ``uint8`` images (decoding and resizing are not timed) and
produce the same fixed-shape detections; each is timed over ``--iters`` passes after one warm-up
pass, the two interleaved round by round (fair on a shared machine). The ONNX graph is exported to
a temporary file unless ``--model`` is given.

    python benchmarks/bench_onnxruntime.py --preset 800 --images 4 --iters 2
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import onnxruntime as ort
import torch

from paadet.compare import MatchReport, match_detections
from paadet.data.synthetic import synthetic_image
from paadet.export import export_onnx
from paadet.model import PAANet
from paadet.model.seeded import seeded_state_dict
from paadet.preprocess import PRESETS, get_preset, resize
from paadet.runtime.base import Backend, StageTimer
from paadet.runtime.onnxruntime_backend import OnnxRuntimeBackend
from paadet.runtime.torch_backend import TorchBackend


def load_net(checkpoint: str | None) -> PAANet:
    """The official (or given) checkpoint, or seeded random weights when ``checkpoint`` is ``seeded``."""
    net = PAANet()
    if checkpoint == "seeded":
        net.load_state_dict(seeded_state_dict(0))
    else:
        from paadet.checkpoint import load_weights
        from paadet.hub import resolve_checkpoint

        load_weights(net, resolve_checkpoint(checkpoint))
    return net.eval()


def time_backends(
    backends: list[Backend], batches: list[tuple[list, list]], iters: int
) -> list[tuple[float, StageTimer, list]]:
    """Images per second of each backend, its stage timer and its last outputs.

    One warm-up pass each, then ``iters`` rounds in which every backend makes one timed pass in
    turn: interleaving exposes all backends to the same load on a shared machine.
    """
    for backend in backends:
        for images, metas in batches:
            backend.infer(images, metas)
    timers = [StageTimer() for _ in backends]
    elapsed = [0.0] * len(backends)
    outputs: list[list] = [[] for _ in backends]
    for _ in range(iters):
        for i, backend in enumerate(backends):
            start = time.perf_counter()
            outputs[i] = [backend.infer(images, metas, timers[i]) for images, metas in batches]
            elapsed[i] += time.perf_counter() - start
    count = iters * sum(len(images) for images, _ in batches)
    return [(count / elapsed[i], timers[i], outputs[i]) for i in range(len(backends))]


def parity(ref_outputs: list, outputs: list) -> MatchReport:
    total = MatchReport()
    for ref, ours in zip(ref_outputs, outputs, strict=False):
        for i in range(len(ref.num_dets)):
            n, m = int(ref.num_dets[i]), int(ours.num_dets[i])
            total += match_detections(
                ref.boxes[i, :n],
                ref.scores[i, :n],
                ref.labels[i, :n],
                ours.boxes[i, :m],
                ours.scores[i, :m],
                ours.labels[i, :m],
            )
    return total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=tuple(PRESETS), default="800")
    parser.add_argument("--images", type=int, default=4, help="generated images (default: 4)")
    parser.add_argument("--iters", type=int, default=2, help="timed passes over the images (default: 2)")
    parser.add_argument("--batch-size", type=int, default=1, help="images per call (default: 1)")
    parser.add_argument("--height", type=int, default=480, help="generated image height (default: 480)")
    parser.add_argument("--width", type=int, default=640, help="generated image width (default: 640)")
    parser.add_argument(
        "--checkpoint",
        default="seeded",
        help="checkpoint .pth, 'official' for the official file, or 'seeded' random weights (default)",
    )
    parser.add_argument("--model", default=None, help="existing ONNX export to time (default: export one now)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads for both runtimes")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    preset = get_preset(args.preset)
    net = load_net(None if args.checkpoint == "official" else args.checkpoint)
    resized = [resize(synthetic_image(args.height, args.width, seed=i), preset) for i in range(args.images)]
    batches = [
        ([r[0] for r in resized[s : s + args.batch_size]], [r[1] for r in resized[s : s + args.batch_size]])
        for s in range(0, len(resized), args.batch_size)
    ]

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            model = str(Path(tmp) / "paa.onnx")
            start = time.perf_counter()
            export_onnx(net, model, preset, batch_size=args.batch_size, verify=False)
            print(f"exported {model} in {time.perf_counter() - start:.1f} s")
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        ort_backend = OnnxRuntimeBackend.from_file(
            model, providers=["CPUExecutionProvider"], preset=preset, session_options=options
        )
        torch_backend = TorchBackend(net, preset)
        (torch_ips, torch_timer, torch_out), (ort_ips, ort_timer, ort_out) = time_backends(
            [torch_backend, ort_backend], batches, args.iters
        )

    n = args.iters * args.images
    print(
        f"preset {preset.name}, {args.images} images {args.height}x{args.width} -> {batches[0][1][0].pad_shape}, "
        f"batch {args.batch_size}, {args.iters} iters, {args.threads} threads, torch {torch.__version__}, "
        f"onnxruntime {ort.__version__} (CPUExecutionProvider)"
    )
    print(f"torch CPU        : {torch_ips:7.3f} images/s  ({torch_timer.summary(n)})")
    print(f"onnxruntime CPU  : {ort_ips:7.3f} images/s  ({ort_timer.summary(n)}; graph includes post-processing)")
    print(f"ratio onnxruntime / torch: {ort_ips / torch_ips:.2f}x")
    print(f"parity: {parity(torch_out, ort_out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
