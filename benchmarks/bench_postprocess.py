"""Post-processing alone (top-k, decoding, NMS, score voting) on the CPU or a GPU: time, operator calls,
GPU kernels and host syncs, for a whole batch in one call against the same images one call each.

The head outputs are real network outputs: the seeded random weights (``dense``: about 4,000 NMS
candidates and 100 detections per image, more than the trained model usually gives; ``sparse``: tens)
on ``--images`` distinct generated images at the ``800`` preset, repeated to ``--batch-size``. Only
the post-processing is timed (outputs already on the device; no copy back), with the device
synchronised before and after each call; the figure is the median over ``--iters`` calls after
``--warmup``. The baseline, in the same process on the same tensors, is the same batch
post-processed image by image (``per_image``). Operator calls, kernels and syncs are counted by
:func:`paadet.bench.profiling.count_device_work` on one batched call.

    python benchmarks/bench_postprocess.py --batch-size 32 --device cpu --iters 3
    python benchmarks/bench_postprocess.py --batch-size 32 --device cuda --iters 20 --json post.json
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable
from typing import Any

import torch

from paadet.bench.profiling import count_device_work
from paadet.bench.run import hardware_info, versions
from paadet.data.synthetic import synthetic_image
from paadet.fileio import atomic_write_json
from paadet.model import PAANet
from paadet.model.seeded import SEEDED_WEIGHTS, seeded_state_dict
from paadet.postprocess import PAAPostprocess, PostprocessConfig
from paadet.preprocess import normalize_pad, resize
from paadet.runtime.base import StageTimer

WEIGHTS = SEEDED_WEIGHTS
SIZES = [(480, 640), (427, 640), (640, 480), (375, 500), (300, 400), (200, 1000), (512, 512), (600, 800)]

HeadInputs = tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor], torch.Tensor, torch.Tensor]


@torch.inference_mode()
def head_outputs(weights: str, images: int, batch_size: int, device: str) -> HeadInputs:
    """Network outputs for ``images`` generated images (preset 800), repeated to ``batch_size``, on ``device``."""
    seed, cls_bias = WEIGHTS[weights]
    net = PAANet()
    net.load_state_dict(seeded_state_dict(seed, cls_bias=cls_bias))
    net = net.to(device).eval()
    tensors, metas = [], []
    for i in range(images):
        h, w = SIZES[i % len(SIZES)]
        resized, meta = resize(synthetic_image(h, w, seed=i + 1), "800")
        tensors.append(normalize_pad(torch.from_numpy(resized), meta.pad_shape))
        metas.append(meta)
    cls, deltas, ious = net(torch.stack(tensors).to(device))
    reps = -(-batch_size // images)

    def tile(t: torch.Tensor) -> torch.Tensor:
        return t.repeat(reps, *([1] * (t.dim() - 1)))[:batch_size].contiguous()

    img_shapes = torch.tensor([m.img_shape for m in metas], dtype=torch.float32, device=device)
    scale_factors = torch.tensor([m.scale_factor for m in metas], dtype=torch.float32, device=device)
    return (
        [tile(c) for c in cls],
        [tile(d) for d in deltas],
        [tile(i) for i in ious],
        tile(img_shapes),
        tile(scale_factors),
    )


def median_ms(fn: Callable[[], Any], device: str, warmup: int, iters: int) -> float:
    """Median wall time of ``fn()`` in ms, the device synchronised before and after each call (:class:`StageTimer`)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        timer = StageTimer(device)
        with timer.stage("call"):
            fn()
        times.append(timer.totals["call"] * 1e3)
    return statistics.median(times)


@torch.inference_mode()
def measure(
    batch_size: int = 32,
    device: str = "cpu",
    weights: str = "dense",
    images: int = 4,
    warmup: int = 2,
    iters: int = 10,
    config: PostprocessConfig = PostprocessConfig(),
) -> dict[str, Any]:
    """Time and count the post-processing of one batch, batched and image by image; returns a JSON-able dict."""
    cls, deltas, ious, img_shapes, scale_factors = head_outputs(weights, min(images, batch_size), batch_size, device)
    post = PAAPostprocess(config)

    def batched() -> None:
        post(cls, deltas, ious, img_shapes, scale_factors)

    def per_image() -> None:
        for i in range(batch_size):
            post(
                [c[i : i + 1] for c in cls],
                [d[i : i + 1] for d in deltas],
                [u[i : i + 1] for u in ious],
                img_shapes[i : i + 1],
                scale_factors[i : i + 1],
            )

    dets = post(cls, deltas, ious, img_shapes, scale_factors)
    batched_ms = median_ms(batched, device, warmup, iters)
    per_image_ms = median_ms(per_image, device, min(warmup, 1), max(1, iters // 4))
    work = count_device_work(batched, device)
    return {
        "what": "post-processing only (top-k, decode, NMS, score voting) of network outputs already on the device; "
        "no copy back; device synchronised before and after each call",
        "device": device,
        "batch_size": batch_size,
        "weights": weights,
        "distinct_images": min(images, batch_size),
        "detections_per_image": float(dets.num_dets.float().mean()),
        "batched_ms_per_batch": batched_ms,
        "batched_ms_per_image": batched_ms / batch_size,
        "per_image_ms_per_batch": per_image_ms,
        "batched_speedup": per_image_ms / batched_ms,
        "batched_call": work.as_dict(),
        "warmup": warmup,
        "iters": iters,
        "hardware": hardware_info(device),
        "versions": versions(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--weights", choices=sorted(WEIGHTS), default="dense")
    parser.add_argument("--images", type=int, default=4, help="distinct generated images (repeated to the batch size)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    if args.batch_size < 1 or args.images < 1 or args.iters < 1 or args.warmup < 0:
        parser.error("--batch-size, --images and --iters must be >= 1, --warmup >= 0")
    result = measure(args.batch_size, args.device, args.weights, args.images, args.warmup, args.iters)
    work = result["batched_call"]
    print(
        f"post-processing, batch {args.batch_size}, {args.device}, {args.weights} weights "
        f"({result['detections_per_image']:.0f} detections/image)"
    )
    print(
        f"  batched:      {result['batched_ms_per_batch']:9.2f} ms/batch  "
        f"{result['batched_ms_per_image']:8.3f} ms/image"
    )
    print(
        f"  image by image: {result['per_image_ms_per_batch']:7.2f} ms/batch  "
        f"-> batched is {result['batched_speedup']:.2f}x"
    )
    kernels = "" if work["kernels"] is None else f", {work['kernels']} GPU kernels"
    print(f"  one batched call: {work['ops']} operator calls{kernels}, {work['syncs']} host syncs {work['sync_ops']}")
    if args.json:
        atomic_write_json(args.json, result, indent=2)
        print(f"  wrote {args.json}")


if __name__ == "__main__":
    main()
