"""``paadet eval``: COCO box AP of the detector on a COCO-format dataset, or of an existing results file."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from paadet.classes import COCO_CLASSES
from paadet.commands.options import ModelOptions, positive_int, probability, resolve_backend
from paadet.data.coco import LOADERS, VAL2017_ANNOTATIONS, CocoDataset, DatasetError, resolve_layout
from paadet.errors import PaadetError
from paadet.fileio import OutputPathError, atomic_write_json, check_output_dir
from paadet.runtime.spec import AUTO

if TYPE_CHECKING:
    from collections.abc import Callable

    from paadet.evaluation.journal import JournalRecord
    from paadet.evaluation.metrics import CocoMetrics
    from paadet.evaluation.plots import PlotOptions
    from paadet.evaluation.run import EvalReport
    from paadet.runtime.spec import DetectorSpec

MODEL = ModelOptions()

DESCRIPTION = """\
Evaluate the detector on a COCO-format dataset (such as COCO val2017) with pycocotools,
or score an existing COCO results file (--results) without running a model.

Data: --data ROOT (ROOT/annotations/instances_val2017.json, images in ROOT/images/val2017/ or
ROOT/val2017/), or --ann FILE --images DIR. With --output-dir the run writes journal.jsonl as it
goes (resume an interrupted run with --resume), then detections.json and metrics.json; with --plots
also precision-recall curves, confusion matrices and example images (docs/eval.md, "Pictures").
"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "eval",
        help="COCO AP on a COCO-format dataset, or of a results file",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    MODEL.add_to(p)
    g = p.add_argument_group("data")
    g.add_argument(
        "--data",
        metavar="ROOT",
        default=None,
        help="dataset root: ROOT/annotations/instances_val2017.json, images in ROOT/images/val2017/ or ROOT/val2017/",
    )
    g.add_argument("--ann", metavar="FILE", default=None, help="COCO annotation file (instead of --data)")
    g.add_argument(
        "--images", metavar="DIR", default=None, help="folder the annotation file's file_name entries are relative to"
    )
    g.add_argument(
        "--limit", metavar="N", type=positive_int, default=None, help="evaluate only the first N images by image id"
    )
    g.add_argument(
        "--results",
        metavar="FILE",
        default=None,
        help="score this COCO results file (e.g. detections.json) against --ann/--data; no model is run",
    )
    g.add_argument(
        "--loader",
        choices=LOADERS,
        default="threads",
        help="run the --workers decoders as threads (default; fastest measured) or DataLoader processes",
    )
    o = p.add_argument_group("output")
    o.add_argument(
        "--output-dir",
        metavar="DIR",
        default=None,
        help="write journal.jsonl, detections.json and metrics.json here (needed for --resume)",
    )
    o.add_argument(
        "--resume",
        action="store_true",
        help="continue the interrupted run in --output-dir (same model settings), computing only the images it lacks",
    )
    o.add_argument("--per-class", action="store_true", help="also report AP per category")
    o.add_argument(
        "--plots",
        action="store_true",
        help="also draw precision-recall curves, confusion matrices and example images into --output-dir "
        "(needs matplotlib: pip install 'paadet[plots]')",
    )
    o.add_argument(
        "--plot-score-thr",
        metavar="T",
        type=probability,
        default=0.3,
        help="lowest score counted by --plots' confusion matrix and drawn on its examples (default 0.3; IoU 0.5)",
    )
    o.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def dataset_files(
    data: str | None, ann: str | None, images: str | None, need_images: bool = True
) -> tuple[Path, Path | None]:
    """The annotation file and image folder named by ``--data`` or ``--ann``/``--images``."""
    if data is not None:
        if ann is not None or images is not None:
            raise DatasetError("give the dataset as --data ROOT or as --ann FILE --images DIR, not both")
        if not need_images:
            return Path(data) / VAL2017_ANNOTATIONS, None
        return resolve_layout(data)
    if ann is None:
        raise DatasetError("no dataset: give --data ROOT, or --ann FILE --images DIR")
    if need_images and images is None:
        raise DatasetError(f"--ann {ann} needs --images DIR (the folder its file_name entries are relative to)")
    return Path(ann), None if images is None else Path(images)


def _print_metrics(metrics: CocoMetrics) -> None:
    from paadet.evaluation.metrics import format_metrics

    print(format_metrics(metrics))


def plot_options(args: argparse.Namespace) -> PlotOptions | None:
    """``--plots``' settings (None without it), after checking that they can be drawn: an output folder is named
    and matplotlib is installed (one-line errors, before any work)."""
    if not args.plots:
        return None
    if args.output_dir is None:
        raise OutputPathError("--plots needs --output-dir DIR (the pictures are written beside metrics.json)")
    from paadet.evaluation.plots import PlotOptions, require_matplotlib

    require_matplotlib()
    return PlotOptions(score_thr=args.plot_score_thr)


def _print_plots(files: list[str], folder: str | Path, examples: bool) -> None:
    print(f"wrote {', '.join(files)} in {folder}")
    if not examples:
        print("note: no image folder (--images DIR, or --data ROOT with its images): no examples.jpg", file=sys.stderr)


def run_results(
    results: str,
    ann_file: Path,
    limit: int | None,
    per_class: bool,
    output_dir: str | None,
    image_dir: Path | None = None,
    plots: PlotOptions | None = None,
) -> CocoMetrics:
    """Score a results file; print the table; write ``metrics.json`` (and with ``plots`` the pictures, drawn on
    the images in ``image_dir`` where given) when ``output_dir`` is given."""
    if output_dir is not None:
        check_output_dir(output_dir, "--output-dir", inputs=[results, ann_file])
        from paadet.evaluation.plots import PLOT_FILES

        for name in PLOT_FILES:  # replaced, or removed as an earlier run's
            if any(os.path.realpath(Path(output_dir) / name) == os.path.realpath(p) for p in (results, ann_file)):
                raise OutputPathError(f"{Path(output_dir) / name}: --output-dir would overwrite this input")
    if plots is not None and image_dir is not None and not image_dir.is_dir():
        raise DatasetError(f"{image_dir}: image folder not found")
    from paadet.evaluation.metrics import coco_evaluate, load_results_file
    from paadet.evaluation.run import METRICS_NAME

    gt, detections, img_ids = load_results_file(results, ann_file, limit=limit)
    metrics = coco_evaluate(gt, detections, img_ids=img_ids, per_class=per_class)
    _print_metrics(metrics)
    print(f"images: {metrics.num_images} evaluated; {metrics.num_detections} detections from {results}")
    if output_dir is not None:
        out = metrics.to_json()
        out.update(
            images={"evaluated": metrics.num_images},
            detections=metrics.num_detections,
            results=str(results),
            annotations=str(ann_file),
        )
        from paadet.evaluation.plots import remove_plots, write_eval_plots

        remove_plots(output_dir)  # an earlier run's pictures describe other detections
        if plots is not None:
            drawn = write_eval_plots(output_dir, gt, detections, metrics, img_ids, image_dir, plots)
            out["plots"] = drawn.summary()
            _print_plots(out["plots"]["files"], output_dir, image_dir is not None)
        atomic_write_json(Path(output_dir) / METRICS_NAME, out, indent=2)
    return metrics


def run_model(
    ann_file: Path,
    image_dir: Path,
    spec: DetectorSpec,
    limit: int | None = None,
    output_dir: str | None = None,
    per_class: bool = False,
    resume: bool = False,
    loader: str = "threads",
    progress: bool = True,
    on_record: Callable[[JournalRecord], None] | None = None,
    plots: PlotOptions | None = None,
) -> EvalReport:
    """Load the dataset, open the model, evaluate; print warnings, the table and the summary.

    The dataset's own problems (annotations, categories the model cannot predict, an image folder that holds
    none of its images) are reported before the model's, and before any image is run. ``on_record``: see
    :func:`~paadet.evaluation.run.evaluate_detector`.
    """
    if output_dir is not None:
        check_output_dir(output_dir, "--output-dir", inputs=[ann_file])
    from paadet.detector import Detector
    from paadet.evaluation.run import METRICS_NAME, evaluate_detector
    from paadet.runtime.registry import open_model

    dataset = CocoDataset.load(ann_file, image_dir, limit=limit, check_model_categories=False)
    images_checked = spec.backend == AUTO
    if images_checked:  # the dataset's own problems first: the first auto run exports and measures
        dataset.check_images_present()
        spec = resolve_backend(spec)
    opened, unusable = None, None
    if spec.weights_file is not None:  # read the file once, now; the official checkpoint (COCO's 80) is read later
        try:
            opened = open_model(spec)
        except PaadetError as exc:  # reported after the dataset's own problems, as the model is built
            unusable = exc
    dataset.check_model_categories(opened.classes if opened is not None else COCO_CLASSES)
    if not images_checked:
        dataset.check_images_present()
    if unusable is not None:
        raise unusable
    if opened is None:
        opened = open_model(spec)
    for warning in dataset.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    detector = Detector.from_spec(spec, opened)
    described = ", ".join(f"{k} {v}" for k, v in detector.backend.describe().items())
    print(f"evaluating {dataset.annotation_summary()} from {ann_file} ({described})", file=sys.stderr)
    report = evaluate_detector(
        detector,
        dataset,
        output_dir=output_dir,
        per_class=per_class,
        resume=resume,
        weights=f"sha256:{opened.sha256()}",
        loader=loader,
        workers=spec.workers,
        progress=progress,
        on_record=on_record,
        plots=plots,
    )
    _print_metrics(report.metrics)
    print(report.summary())
    if report.missing_images:
        print(
            f"warning: {len(report.missing_images)} images missing or unreadable (no detections): "
            f"{', '.join(report.missing_images[:5])}{' ...' if len(report.missing_images) > 5 else ''}",
            file=sys.stderr,
        )
    if report.output_dir is not None:
        print(f"wrote {report.output_dir / 'detections.json'} and {report.output_dir / METRICS_NAME}")
    if "plots" in report.extra:
        _print_plots(report.extra["plots"]["files"], report.output_dir, True)
    if report.missing_images and len(report.missing_images) == report.images["evaluated"]:
        raise DatasetError(
            f"{image_dir}: all {len(report.missing_images)} images were missing or unreadable; "
            "the metrics are meaningless"
        )
    return report


def run(args: argparse.Namespace) -> int:
    plots = plot_options(args)
    if args.results is not None:
        ann_file, image_dir = dataset_files(args.data, args.ann, args.images, need_images=False)
        if plots is not None and args.data is not None:  # the images are only needed for the examples
            try:
                image_dir = resolve_layout(args.data)[1]
            except DatasetError:
                image_dir = None
        run_results(
            args.results,
            ann_file,
            limit=args.limit,
            per_class=args.per_class,
            output_dir=args.output_dir,
            image_dir=image_dir,
            plots=plots,
        )
        return 0
    spec = MODEL.spec(args)
    ann_file, image_dir = dataset_files(args.data, args.ann, args.images)
    run_model(
        ann_file,
        image_dir,
        spec,
        limit=args.limit,
        output_dir=args.output_dir,
        per_class=args.per_class,
        resume=args.resume,
        loader=args.loader,
        progress=not args.no_progress,
        plots=plots,
    )
    return 0
