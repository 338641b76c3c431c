"""``paadet predict``: detections for image files and folders, as a COCO results JSON."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cv2
from tqdm import tqdm

from ..data.images import ImageSource, list_images, read_image
from ..detector import ImageResult, iter_loaded
from ..fileio import atomic_write_bytes, atomic_write_json
from ..runtime.base import StageTimer
from ..visualize import draw_detections
from .common import add_model_options, detector_from_args


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "predict", help="detect objects in images",
        description="Detect objects in image files and folders (searched recursively); write COCO-format results.",
    )
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files and/or folders")
    p.add_argument("--output", "-o", required=True, help="results JSON (COCO results format plus file_name)")
    p.add_argument("--save-vis", metavar="DIR", default=None, help="also write images with labelled boxes here")
    p.add_argument("--vis-score-thr", type=float, default=0.3, help="minimum score drawn by --save-vis (default 0.3)")
    add_model_options(p)
    p.set_defaults(func=run)


def image_ids(sources: list[ImageSource]) -> list[int]:
    """COCO ``image_id`` per input: the file stem when every stem is a distinct integer (COCO's
    ``000000397133.jpg`` -> 397133), otherwise the position in the sorted input list (0, 1, ...)."""
    stems = [s.path.stem for s in sources]
    if stems and all(st.isdigit() for st in stems) and len({int(st) for st in stems}) == len(stems):
        return [int(st) for st in stems]
    return list(range(len(sources)))


def predict_files(
    paths: list[str],
    output: str,
    detector,
    save_vis: str | None = None,
    vis_score_thr: float = 0.3,
    progress: bool = True,
) -> tuple[int, int, StageTimer]:
    """Run ``detector`` over every image under ``paths`` and write the results JSON atomically.

    Returns ``(images done, images skipped, timer)``. Unreadable files are reported on stderr and
    skipped; the others' results are still written.
    """
    sources = list_images(paths)
    timer = StageTimer(getattr(detector.backend, "device", None))
    results: dict[int, ImageResult] = {}
    skipped = 0
    loaded = iter_loaded(sources, detector.preset, detector.workers)
    bar = tqdm(total=len(sources), unit="img", disable=not progress, desc="predict")
    for item, result in detector.run(loaded, timer):
        bar.update(1)
        if result is None:
            skipped += 1
            tqdm.write(f"skipped {item.name}: {item.error}", file=sys.stderr)
            continue
        results[item.index] = result
        if save_vis:
            write_visualisation(sources[item.index], result, Path(save_vis), vis_score_thr)
    bar.close()
    atomic_write_json(output, coco_entries(results, sources))
    return len(results), skipped, timer


def coco_entries(results: dict[int, ImageResult], sources: list[ImageSource]) -> list[dict]:
    """COCO results entries for ``results`` keyed by input position, ids from :func:`image_ids` over
    ``sources``, in input order; inputs without a result contribute nothing."""
    ids = image_ids(sources)
    entries: list[dict] = []
    for index in sorted(results):
        entries.extend(results[index].to_coco(ids[index]))
    return entries


def write_visualisation(source: ImageSource, result: ImageResult, folder: Path, score_thr: float) -> None:
    image = read_image(source.path)
    drawn = draw_detections(image, result.boxes, result.scores, result.labels, score_thr)
    target = folder / Path(source.file_name).with_suffix(".jpg")
    ok, encoded = cv2.imencode(".jpg", drawn)
    if not ok:
        raise RuntimeError(f"could not encode the visualisation of {source.file_name}")
    atomic_write_bytes(target, encoded.tobytes())


def run(args: argparse.Namespace) -> int:
    detector = detector_from_args(args)
    done, skipped, timer = predict_files(
        args.paths, args.output, detector, save_vis=args.save_vis, vis_score_thr=args.vis_score_thr,
    )
    total = done + skipped
    print(f"{done}/{total} images, {skipped} skipped; {timer.summary(done)}; wrote {args.output}")
    return 1 if skipped else 0
