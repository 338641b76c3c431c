"""``paadet predict``: detections for image files and folders, as a COCO results JSON."""

from __future__ import annotations

import argparse
import time

from paadet.commands.options import ModelOptions, probability
from paadet.data.images import list_images

MODEL = ModelOptions()


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "predict",
        help="detect objects in images",
        description="Detect objects in image files and folders (searched recursively); write COCO-format results.",
    )
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files and/or folders")
    p.add_argument("--output", "-o", required=True, help="results JSON (COCO results format plus file_name)")
    p.add_argument(
        "--save-vis",
        metavar="DIR",
        default=None,
        help="also write a copy of each image with labelled boxes under this folder (never over an input)",
    )
    p.add_argument(
        "--vis-score-thr", type=probability, default=0.3, help="minimum score drawn by --save-vis (default 0.3)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    MODEL.add_to(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from paadet.data.images import IMAGE_EXTENSIONS
    from paadet.detector import Detector

    sources = list_images(args.paths)
    if not sources:
        raise FileNotFoundError(
            f"no images in {', '.join(args.paths)} (searched recursively for {', '.join(sorted(IMAGE_EXTENSIONS))})"
        )
    from paadet.predict import check_outputs, predict_sources

    spec = MODEL.spec(args)
    targets = check_outputs(sources, args.output, args.save_vis)
    detector = Detector.from_spec(spec)
    start = time.perf_counter()
    done, skipped, drawn, timer = predict_sources(
        sources,
        args.output,
        detector,
        vis_targets=targets,
        vis_score_thr=args.vis_score_thr,
        progress=not args.no_progress,
    )
    seconds = time.perf_counter() - start
    total = done + skipped
    overlap = " (stages summed over the concurrent streams)" if getattr(detector.backend, "concurrency", 1) > 1 else ""
    print(
        f"{done}/{total} images, {skipped} skipped in {seconds:.1f} s ({done / max(seconds, 1e-9):.2f} img/s); "
        f"{timer.summary(done)}{overlap}; wrote {args.output}"
    )
    if targets is not None:
        print(f"drew {drawn} boxes (score >= {args.vis_score_thr:g}) on {done} images under {args.save_vis}")
    return 1 if skipped else 0
