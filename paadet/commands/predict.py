"""``paadet predict``: detections for images (a COCO results JSON) and for videos, webcams and streams (JSON Lines)."""

from __future__ import annotations

import argparse
import time

from paadet.commands.options import ModelOptions, positive_int, probability, resolve_backend

MODEL = ModelOptions()


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "predict",
        help="detect objects in images and videos",
        description="Detect objects in image and video files, folders (searched recursively) and globs, a webcam "
        "or a stream URL; write COCO-format results for images, or JSON Lines (one line per frame) to a .jsonl "
        "--output, which videos need.",
    )
    p.add_argument(
        "paths",
        nargs="+",
        metavar="PATH",
        help="image or video files, folders, globs; a webcam (0 or /dev/video0); a stream URL (rtsp://, rtmp://, "
        "http(s)://)",
    )
    p.add_argument(
        "--output",
        "-o",
        required=True,
        help="results: a .json file gets the COCO results list (images only); a .jsonl file one JSON line per "
        "image and per video frame",
    )
    p.add_argument(
        "--save-vis",
        metavar="DIR",
        default=None,
        help="also write a copy of each image with labelled boxes, and an annotated MP4 of each video, under this "
        "folder (never over an input)",
    )
    p.add_argument(
        "--vid-stride", type=positive_int, default=1, metavar="N", help="videos: keep frames 0, N, 2N ... (default 1)"
    )
    p.add_argument(
        "--max-frames",
        type=positive_int,
        default=None,
        metavar="K",
        help="videos: stop each video, webcam or stream after K processed frames",
    )
    p.add_argument(
        "--vis-score-thr", type=probability, default=0.3, help="minimum score drawn by --save-vis (default 0.3)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    MODEL.add_to(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from paadet.detector import Detector
    from paadet.predict import plan_inputs, predict_sources

    spec = MODEL.spec(args)
    plan = plan_inputs(args.paths, args.output, args.save_vis)
    spec = resolve_backend(spec)  # --backend auto: after the inputs and outputs are checked
    if plan.jsonl:
        return _run_jsonl(args, plan, Detector.from_spec(spec))
    sources, targets = plan.images, plan.image_targets
    detector = Detector.from_spec(spec)
    start = time.perf_counter()
    done, skipped, drawn, below, timer = predict_sources(
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
        print(
            f"drew {drawn} boxes (score >= {args.vis_score_thr:g}; {below} below it not drawn) on {done} images "
            f"under {args.save_vis}"
        )
    return 1 if skipped else 0


def _run_jsonl(args: argparse.Namespace, plan, detector) -> int:
    """Videos, webcams and streams (and images) to JSON Lines; the summary line; exit 1 if anything was skipped."""
    from paadet.console import stderr
    from paadet.predict import predict_jsonl

    for reason in plan.skipped:
        stderr(f"skipped {reason}")
    start = time.perf_counter()
    tally = predict_jsonl(
        plan,
        args.output,
        detector,
        vid_stride=args.vid_stride,
        max_frames=args.max_frames,
        vis_score_thr=args.vis_score_thr,
        progress=not args.no_progress,
    )
    seconds = time.perf_counter() - start
    videos = len(plan.videos) + len(plan.skipped)
    skipped = tally.images_skipped + tally.videos_failed + len(plan.skipped)
    print(
        f"{tally.frames} frames from {tally.videos_done}/{videos} videos, {tally.images_done}/{len(plan.images)} "
        f"images; {skipped} skipped or stopped early, in {seconds:.1f} s "
        f"({tally.processed / max(seconds, 1e-9):.2f} frames/s); {tally.timer.summary(max(tally.processed, 1))}; "
        f"wrote {tally.processed} lines to {args.output}"
    )
    if args.save_vis is not None:
        print(
            f"drew {tally.drawn} boxes (score >= {args.vis_score_thr:g}; {tally.below} below it not drawn) "
            f"under {args.save_vis}"
        )
    return 1 if skipped else 0
