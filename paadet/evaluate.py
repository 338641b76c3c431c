"""COCO box evaluation: score a results file, or run a detector over a dataset and score it.

The metrics are pycocotools' ``COCOeval`` (``iouType="bbox"``), run exactly as one would run it by
hand (``loadRes`` on the results list, ``evaluate``, ``accumulate``, ``summarize``), so the twelve
numbers are pycocotools' own. Only the images evaluated count: ``params.imgIds`` is set to them.

A detector run streams each image's detections to an append-only JSON Lines journal in the output
folder (``journal.jsonl``): a header line with the settings, then one line per image. Lines are
flushed as written and fsynced once per batch of images, so a run killed at any point (Ctrl-C, a
crash, SIGKILL) loses at most the image being written; ``resume=True`` reads the journal back, drops
a torn last line, and computes only the images that are not in it. The final ``detections.json``
and ``metrics.json`` are written atomically from the journal, so a resumed run's files equal an
uninterrupted run's. The journal itself is :mod:`paadet.eval_journal`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from tqdm import tqdm

from . import __version__
from .data.coco import CocoDataset, DatasetError, ImageEntry, is_coco_id, is_number, coco_from_dict, load_coco, read_json
from .data.loading import iter_images
from .detector import Detector
from .errors import PaadetError
from .eval_journal import JOURNAL_NAME, Journal, JournalError, JournalRecord, journal_entries
from .fileio import atomic_write_json
from .runtime.base import StageTimer

METRIC_KEYS: tuple[str, ...] = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
"""The twelve numbers of ``COCOeval.stats``, in its order (AP and AP50 first: the seed's columns)."""

METRIC_DESCRIPTIONS: dict[str, str] = {
    "AP": "AP @ IoU 0.50:0.95, all areas, 100 dets",
    "AP50": "AP @ IoU 0.50",
    "AP75": "AP @ IoU 0.75",
    "APs": "AP, small objects (area < 32^2)",
    "APm": "AP, medium objects (32^2 .. 96^2)",
    "APl": "AP, large objects (area > 96^2)",
    "AR1": "AR, 1 detection per image",
    "AR10": "AR, 10 detections per image",
    "AR100": "AR, 100 detections per image",
    "ARs": "AR, small objects",
    "ARm": "AR, medium objects",
    "ARl": "AR, large objects",
}

DETECTIONS_NAME = "detections.json"
METRICS_NAME = "metrics.json"

FAULT_ENV = "PAADET_EVAL_FAULT_AFTER"
"""Testing hook: with this set to K, a detector run kills its own process (SIGKILL) right after
journaling its K-th image, to exercise ``--resume`` on a hard stop."""

_MAX_LISTED = 5


class ResultsError(PaadetError):
    """A detections (results) file that cannot be scored; the message names the file."""


def _listed(values: Sequence[Any]) -> str:
    head = ", ".join(str(v) for v in values[:_MAX_LISTED])
    return head + (f" and {len(values) - _MAX_LISTED} more" if len(values) > _MAX_LISTED else "")


def _stderr(message: str) -> None:
    tqdm.write(message, file=sys.stderr)


# --------------------------------------------------------------------------------------------
# Scoring


@dataclass
class CocoMetrics:
    """The result of one COCO evaluation.

    Attributes:
        stats: the twelve :data:`METRIC_KEYS` as pycocotools' fractions (-1 where undefined).
        per_class: category name -> AP@[0.5:0.95] (None for a category with no ground truth), when asked.
        num_images: images evaluated (``params.imgIds``).
        num_detections: detections given for those images.
    """

    stats: dict[str, float]
    per_class: dict[str, float | None] | None
    num_images: int
    num_detections: int

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.stats)
        if self.per_class is not None:
            out["per_class_AP"] = self.per_class
        return out


def _results_coco(gt: COCO, detections: list[dict]) -> COCO:
    """``gt.loadRes(detections)`` (on copies: it adds keys); an empty list gives an empty index
    (pycocotools' ``loadRes`` fails on one)."""
    if detections:
        with contextlib.redirect_stdout(io.StringIO()):
            return gt.loadRes([dict(d) for d in detections])
    return coco_from_dict({"images": list(gt.dataset["images"]), "categories": list(gt.dataset["categories"]), "annotations": []})


def coco_evaluate(
    gt: COCO,
    detections: list[dict],
    img_ids: Iterable[int] | None = None,
    per_class: bool = False,
) -> CocoMetrics:
    """Score COCO results entries against ``gt`` with pycocotools' ``COCOeval`` (bbox).

    Args:
        gt: the ground truth.
        detections: COCO results entries (``image_id``, ``category_id``, ``bbox`` xywh, ``score``),
            all on images of ``gt``.
        img_ids: the images to evaluate (default: all of ``gt``'s, as pycocotools does).
        per_class: also compute AP@[0.5:0.95] per category (area all, 100 detections).
    """
    dt = _results_coco(gt, detections)
    evaluator = COCOeval(gt, dt, iouType="bbox")
    if img_ids is not None:
        evaluator.params.imgIds = sorted(set(img_ids))
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = {key: float(value) for key, value in zip(METRIC_KEYS, evaluator.stats)}
    classes = None
    if per_class:
        precision = evaluator.eval["precision"]  # [iou, recall, category, area, max dets]
        classes = {}
        for k, cat_id in enumerate(evaluator.params.catIds):
            p = precision[:, :, k, 0, -1]
            p = p[p > -1]
            name = str(gt.cats[cat_id].get("name", cat_id))
            classes[name] = float(np.mean(p)) if p.size else None
    wanted = set(evaluator.params.imgIds)
    num_dets = sum(1 for d in detections if d["image_id"] in wanted)
    return CocoMetrics(stats, classes, len(evaluator.params.imgIds), num_dets)


def validate_results(data: Any, path: str | os.PathLike, gt: COCO, ann_file: str | os.PathLike) -> list[dict]:
    """Check a parsed COCO results file: a list of ``{image_id, category_id, bbox, score}`` on ``gt``'s images.

    Raises:
        ResultsError: the first problem found, naming ``path``.
    """
    if not isinstance(data, list):
        raise ResultsError(f"{path}: not a COCO results file (expected a JSON list of detections, got a {type(data).__name__})")
    for i, d in enumerate(data):
        ok = (
            isinstance(d, dict)
            and is_coco_id(d.get("image_id"))
            and is_coco_id(d.get("category_id"))
            and isinstance(d.get("bbox"), list) and len(d["bbox"]) == 4
            and all(is_number(v) for v in d["bbox"])
            and is_number(d.get("score"))
        )
        if not ok:
            raise ResultsError(
                f"{path}: entry {i} is not a box detection {{image_id, category_id, bbox: [x, y, w, h], score}}: "
                f"{json.dumps(d)[:120]}"
            )
    unknown = sorted({d["image_id"] for d in data} - set(gt.imgs))
    if unknown:
        raise ResultsError(f"{path}: {len(unknown)} image ids are not in {ann_file}: {_listed(unknown)}")
    return data


def evaluate_results_file(
    results: str | os.PathLike,
    ann_file: str | os.PathLike,
    limit: int | None = None,
    per_class: bool = False,
    log: Callable[[str], None] = _stderr,
) -> CocoMetrics:
    """Score an existing COCO results file against an annotation file, without a model.

    With ``limit``, only the first ``limit`` images by id are evaluated; otherwise all of the
    annotation file's images, exactly as ``COCOeval`` does by default.

    Raises:
        DatasetError: the annotation file is missing or malformed.
        ResultsError: the results file is missing, malformed or names images the annotations lack.
    """
    if limit is not None and limit < 1:
        raise DatasetError(f"--limit must be at least 1, got {limit}")
    gt, warnings = load_coco(ann_file, need_file_names=False)
    for warning in warnings:
        log(f"warning: {warning}")
    if not gt.imgs:
        raise DatasetError(f"{ann_file}: the dataset is empty (no images listed)")
    try:
        data = read_json(results, "results file")
    except DatasetError as exc:
        raise ResultsError(str(exc)) from None
    detections = validate_results(data, results, gt, ann_file)
    found = sorted({d["category_id"] for d in detections})
    foreign = [c for c in found if c not in gt.cats]
    if found and len(foreign) == len(found):
        raise ResultsError(f"{results}: none of its category ids ({_listed(found)}) is one of the categories of "
                           f"{ann_file} ({_listed(sorted(gt.cats))}); were the results made with another class list?")
    if foreign:
        log(f"warning: {results}: {len(foreign)} of its {len(found)} category ids are not in {ann_file} "
            f"({_listed(foreign)}); their detections cannot match")
    img_ids = sorted(gt.imgs)[:limit] if limit is not None else None
    return coco_evaluate(gt, detections, img_ids=img_ids, per_class=per_class)


def format_metrics(metrics: CocoMetrics) -> str:
    """The twelve metrics as a table, AP and AP50 first, then per-class AP if computed."""
    lines = [f"{'metric':<7} {'value':>7}  meaning"]
    for key in METRIC_KEYS:
        lines.append(f"{key:<7} {metrics.stats[key]:>7.4f}  {METRIC_DESCRIPTIONS[key]}")
    if metrics.per_class is not None:
        width = max([len(name) for name in metrics.per_class] + [8])
        lines.append("")
        lines.append(f"{'category':<{width}} {'AP':>7}")
        for name, ap in metrics.per_class.items():
            lines.append(f"{name:<{width}} {'-' if ap is None else f'{ap:.4f}':>7}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# The journal


# --------------------------------------------------------------------------------------------
# Running a detector over a dataset


@dataclass
class EvalReport:
    """What a detector evaluation produced.

    Attributes:
        metrics: the COCO metrics over the dataset's selected images.
        images: counts: ``evaluated``, ``computed`` (this run), ``resumed`` (from the journal),
            ``missing`` and ``unreadable`` (counted as having no detections).
        missing_images: file names of the missing or unreadable images.
        timings: ``ms_per_image`` by stage, ``images_per_second`` and ``wall_seconds`` of this run's images.
        backend: the backend's description.
        settings: what the journal was checked against.
        output_dir: where the files went (None: nothing was kept).
    """

    metrics: CocoMetrics
    images: dict[str, int]
    missing_images: list[str]
    timings: dict[str, Any]
    backend: dict[str, Any]
    settings: dict[str, Any]
    output_dir: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out = self.metrics.to_json()
        out.update(
            images=self.images, missing_images=self.missing_images, detections=self.metrics.num_detections,
            timings=self.timings, backend=self.backend, settings=self.settings, paadet_version=__version__,
        )
        out.update(self.extra)
        return out

    def summary(self) -> str:
        """Lines for the end of a run: image counts, throughput, ms/image by stage."""
        im = self.images
        lines = [
            f"images: {im['evaluated']} evaluated ({im['computed']} computed now, {im['resumed']} from the journal), "
            f"{im['missing']} missing, {im['unreadable']} unreadable; {self.metrics.num_detections} detections"
        ]
        if self.timings.get("ms_per_image"):
            stages = ", ".join(f"{k} {v:.1f}" for k, v in self.timings["ms_per_image"].items())
            lines.append(f"{self.timings['images_per_second']:.2f} images/s; ms/image by stage: {stages}")
        return "\n".join(lines)


def detector_settings(detector: Detector, weights: str | None = None) -> dict[str, Any]:
    """The settings a journal is tied to: what changes the detections.

    The backend's description (backend, device, precision, score voting...) without the GPU's
    name, the full preset definition, and ``weights`` (e.g. the checkpoint's sha256).
    """
    settings = {k: v for k, v in detector.backend.describe().items() if k != "gpu"}
    settings["preset"] = dataclasses.asdict(detector.preset)
    settings["weights"] = weights
    return json.loads(json.dumps(settings))  # tuples -> lists, as they come back from the journal


def _record_for(entry: ImageEntry, result: Any, error: str | None, category_ids: Sequence[int]) -> JournalRecord:
    if error is not None:
        status = "missing" if not entry.path.exists() else "unreadable"
        return JournalRecord(entry.image_id, entry.file_name, status, [], error)
    entries = dataclasses.replace(result, file_name=None).to_coco(entry.image_id, category_ids=category_ids)
    dets = [[e["category_id"], *e["bbox"], e["score"]] for e in entries]
    return JournalRecord(entry.image_id, entry.file_name, "ok", dets)


def evaluate_detector(
    detector: Detector,
    dataset: CocoDataset,
    output_dir: str | os.PathLike | None = None,
    per_class: bool = False,
    resume: bool = False,
    weights: str | None = None,
    loader: str = "threads",
    workers: int | None = None,
    progress: bool = True,
    log: Callable[[str], None] = _stderr,
) -> EvalReport:
    """Run ``detector`` over ``dataset``'s images and score the detections.

    Detections stream to ``output_dir/journal.jsonl`` as batches complete; at the end
    ``detections.json`` (COCO results, by image id) and ``metrics.json`` are written atomically.
    Missing or unreadable images are warned about and count as images with no detections.

    Args:
        detector: the detector.
        dataset: the dataset and its selected images.
        output_dir: where to write; None keeps nothing (a temporary journal; no resume).
        per_class: also compute per-category AP.
        resume: continue ``output_dir``'s journal (same settings required), computing only the
            images it lacks (and retrying those it recorded as missing or unreadable).
        weights: identity of the weights (e.g. sha256) for the journal's settings.
        loader: ``threads`` or ``processes`` (see :func:`paadet.data.loading.iter_images`).
        workers: decode/resize workers (default: the detector's).
        progress: show a progress bar (stderr).
        log: where warnings go.

    Raises:
        JournalError: see :meth:`Journal.open`, or the journal lists another file for an image id.
    """
    settings = detector_settings(detector, weights)
    with contextlib.ExitStack() as stack:
        if output_dir is None:
            if resume:
                raise JournalError("--resume needs --output-dir (the folder of the run to continue)")
            out = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="paadet-eval-")))
        else:
            out = Path(output_dir)
            if out.exists() and not out.is_dir():
                raise JournalError(f"{out}: --output-dir is a file, not a folder")
        journal = Journal.open(out / JOURNAL_NAME, settings, resume, log)
        stack.callback(journal.close)
        for entry in dataset.images:
            done = journal.records.get(entry.image_id)
            if done is not None and done.file_name != entry.file_name:
                raise JournalError(
                    f"{journal.path}: image id {entry.image_id} is {done.file_name!r} in the journal but "
                    f"{entry.file_name!r} in {dataset.ann_file}; the journal is for another dataset"
                )
        todo = [e for e in dataset.images if e.image_id not in journal.records or journal.records[e.image_id].status != "ok"]
        resumed = len(dataset.images) - len(todo)
        if resume and resumed:
            log(f"resuming: {resumed} of {len(dataset.images)} images are in {journal.path}; computing {len(todo)}")
        timer, wall = _run_images(detector, todo, journal, loader, detector.workers if workers is None else workers, progress, log)
        records = [journal.records[e.image_id] for e in dataset.images]
        detections = [d for r in records for d in journal_entries(r.image_id, r.dets)]
        metrics = coco_evaluate(dataset.coco, detections, img_ids=dataset.image_ids, per_class=per_class)
        failed = [r for r in records if r.status != "ok"]
        computed = len(todo)
        timings: dict[str, Any] = {"wall_seconds": wall, "images_per_second": computed / wall if wall > 0 else 0.0}
        if computed:
            timings["ms_per_image"] = timer.ms_per_image(computed)
        report = EvalReport(
            metrics=metrics,
            images={
                "evaluated": len(records), "computed": computed, "resumed": resumed,
                "missing": sum(r.status == "missing" for r in failed), "unreadable": sum(r.status == "unreadable" for r in failed),
            },
            missing_images=[r.file_name for r in failed],
            timings=timings,
            backend=detector.backend.describe(),
            settings=settings,
            output_dir=None if output_dir is None else out,
            extra={"annotations": str(dataset.ann_file), "image_dir": str(dataset.image_dir)},
        )
        if output_dir is not None:
            atomic_write_json(out / DETECTIONS_NAME, detections)
            atomic_write_json(out / METRICS_NAME, report.to_json(), indent=2)
        return report


def _run_images(
    detector: Detector,
    todo: list[ImageEntry],
    journal: Journal,
    loader: str,
    workers: int,
    progress: bool,
    log: Callable[[str], None],
) -> tuple[StageTimer, float]:
    """Detect on ``todo``, appending each image's record to ``journal``; returns the timer and wall seconds."""
    timer = StageTimer(getattr(detector.backend, "device", None))
    fault_after = int(os.environ.get(FAULT_ENV, "0") or 0)
    start = time.perf_counter()
    if not todo:
        return timer, 0.0
    bar = tqdm(total=len(todo), unit="img", desc="eval", disable=not progress, dynamic_ncols=True, file=sys.stderr)
    written = 0
    try:
        loaded = iter_images([e.source() for e in todo], detector.preset, workers=workers, loader=loader)
        for item, result in detector.run(loaded, timer):
            entry = todo[item.index]
            if item.error is not None:
                log(f"warning: {item.error}; counted as an image with no detections")
            with timer.stage("write"):
                journal.append(_record_for(entry, result, item.error, detector.classes.category_ids))
                if journal.unsynced >= detector.batch_size:
                    journal.sync()
            written += 1
            bar.update(1)
            if fault_after and written >= fault_after:
                os.kill(os.getpid(), signal.SIGKILL)
    except KeyboardInterrupt:
        journal.sync()
        log(f"interrupted: {len(journal.records)} images are saved in {journal.path}; rerun with --resume to continue")
        raise
    finally:
        bar.close()
    journal.sync()
    return timer, time.perf_counter() - start

