"""Images per second of ``paadet batch`` with 1 and 2 Ray CPU workers, and of single-process ``predict``,
on the same images, in one run.

Example (the figures in docs/benchmarks.md)::

    python benchmarks/bench_ray.py --images 24 --preset mmdet

The images are synthetic (``paadet.data.synthetic.synthetic_image``) and, unless ``--checkpoint`` is given, the
weights are seeded random ones: the network does the same work as with the official weights, so the
timings hold (post-processing sees more candidates than with real weights, which is the harder case).
Each Ray worker gets 1 CPU (1 torch thread); ``predict`` gets every CPU of the machine as torch threads.
Ray runs its workers at niceness 15 by default; here they run at 0, as ``predict`` does, so that other
load on a shared machine slows every mode alike. The load average is printed before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import cv2
import torch

from paadet import DetectorSpec
from paadet.batch import require_ray, run_batch
from paadet.data.synthetic import synthetic_image
from paadet.detector import Detector
from paadet.model.seeded import seeded_state_dict
from paadet.predict import predict_files


def make_images(folder: Path, count: int, height: int, width: int) -> None:
    """``count`` synthetic JPEG images of ``height x width`` in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        cv2.imwrite(str(folder / f"{i:06d}.jpg"), synthetic_image(height, width, seed=i))


def bench_predict(folder: Path, checkpoint: str, preset: str, threads: int, output: Path) -> dict:
    """Single-process ``predict`` on ``folder``: model load and image loop timed apart."""
    torch.set_num_threads(threads)
    start = time.perf_counter()
    detector = Detector.from_spec(DetectorSpec(checkpoint=checkpoint, preset=preset, workers=2))
    loaded = time.perf_counter()
    done, skipped, _ = predict_files([str(folder)], str(output), detector, progress=False)
    end = time.perf_counter()
    if skipped:
        raise RuntimeError(f"predict skipped {skipped} images")
    return {
        "mode": f"predict (1 process, {threads} threads)",
        "images": done,
        "wall_s": end - start,
        "startup_s": loaded - start,
        "img_per_s": done / (end - start),
        "steady_img_per_s": done / (end - loaded),
    }


def bench_ray(folder: Path, checkpoint: str, preset: str, workers: int, shard_size: int, output: Path) -> dict:
    """``paadet batch`` with ``workers`` actors of 1 CPU each on the running local Ray instance."""
    spec = DetectorSpec(checkpoint=checkpoint, preset=preset, workers=1)
    summary = run_batch(
        [folder], output, spec, num_workers=workers, cpus_per_worker=1, shard_size=shard_size, progress=False
    )
    if summary.processed != summary.total or summary.errors:
        raise RuntimeError(f"ray run incomplete: {summary.lines()}")
    return {
        "mode": f"batch, {workers} Ray worker(s) x 1 CPU",
        "images": summary.processed,
        "wall_s": summary.wall_s,
        "startup_s": summary.startup_s,
        "img_per_s": summary.images_per_s,
        "steady_img_per_s": summary.steady_images_per_s,
        "per_worker_busy_img_per_s": [round(w.images / w.busy_s, 3) for w in summary.workers if w.busy_s],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=24, help="number of images (default: 24)")
    parser.add_argument(
        "--size", type=int, nargs=2, default=(480, 640), metavar=("H", "W"), help="image size (default: 480 640)"
    )
    parser.add_argument("--preset", default="mmdet", help="pre-processing preset (default: mmdet)")
    parser.add_argument("--checkpoint", default=None, help="checkpoint (default: seeded random weights)")
    parser.add_argument("--shard-size", type=int, default=4, help="images per shard (default: 4)")
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args()

    ray = require_ray()
    cpus = os.cpu_count() or 1
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench_ray_") as tmp:
        root = Path(tmp)
        checkpoint = args.checkpoint
        if checkpoint is None:
            checkpoint = str(root / "seeded.pth")
            torch.save({"state_dict": seeded_state_dict(0)}, checkpoint)
        folder = root / "images"
        make_images(folder, args.images, *args.size)
        rows = [bench_predict(folder, checkpoint, args.preset, cpus, root / "predict.json")]
        os.environ.setdefault("RAY_worker_niceness", "0")
        ray.init(num_cpus=cpus, include_dashboard=False, logging_level="ERROR")
        try:
            for workers in (1, 2):
                rows.append(
                    bench_ray(folder, checkpoint, args.preset, workers, args.shard_size, root / f"ray{workers}")
                )
        finally:
            ray.shutdown()
    print(
        f"{args.images} images {args.size[0]}x{args.size[1]}, preset {args.preset}, {cpus} CPUs, "
        f"torch {torch.__version__}, ray {ray.__version__}; "
        f"1-min load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after"
    )
    print(f"{'mode':40s} {'wall s':>8s} {'start s':>8s} {'img/s':>8s} {'img/s after start':>18s}")
    for row in rows:
        print(
            f"{row['mode']:40s} {row['wall_s']:8.1f} {row['startup_s']:8.1f} {row['img_per_s']:8.3f} "
            f"{row['steady_img_per_s']:18.3f}"
        )
    for row in rows[1:]:
        print(f"{row['mode']}: per-worker img/s while busy {row['per_worker_busy_img_per_s']}")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {"images": args.images, "size": args.size, "preset": args.preset, "cpus": cpus, "rows": rows}, indent=1
            )
        )


if __name__ == "__main__":
    main()
