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
uninterrupted run's.
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

JOURNAL_NAME = "journal.jsonl"
DETECTIONS_NAME = "detections.json"
METRICS_NAME = "metrics.json"
JOURNAL_FORMAT = "paadet-eval-journal"
JOURNAL_VERSION = 1

FAULT_ENV = "PAADET_EVAL_FAULT_AFTER"
"""Testing hook: with this set to K, a detector run kills its own process (SIGKILL) right after
journaling its K-th image, to exercise ``--resume`` on a hard stop."""

_MAX_LISTED = 5


class ResultsError(PaadetError):
    """A detections (results) file that cannot be scored; the message names the file."""


class JournalError(PaadetError):
    """An evaluation journal that cannot be resumed (other settings, other dataset, corrupt)."""


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


def _entries(image_id: int, dets: list[list[float]]) -> list[dict]:
    """Journal detections ``[category_id, x, y, w, h, score]`` -> COCO results entries."""
    return [{"image_id": image_id, "category_id": int(d[0]), "bbox": [d[1], d[2], d[3], d[4]], "score": d[5]} for d in dets]


@dataclass
class JournalRecord:
    """One image's line of the journal.

    Attributes:
        image_id: COCO image id.
        file_name: the image's file name in the annotation file (checked on resume).
        status: ``ok``, ``missing`` (no such file) or ``unreadable`` (cannot be decoded).
        dets: detections as ``[category_id, x, y, w, h, score]`` (COCO results values).
        error: the reason, when not ``ok``.
    """

    image_id: int
    file_name: str
    status: str
    dets: list[list[float]]
    error: str | None = None

    def to_line(self) -> bytes:
        obj: dict[str, Any] = {"image_id": self.image_id, "file_name": self.file_name, "status": self.status, "dets": self.dets}
        if self.error is not None:
            obj["error"] = self.error
        return (json.dumps(obj, separators=(",", ":")) + "\n").encode("utf-8")

    @classmethod
    def from_obj(cls, obj: Any) -> "JournalRecord":
        if not isinstance(obj, dict) or not is_coco_id(obj.get("image_id")) or not isinstance(obj.get("dets"), list):
            raise ValueError("not an image record")
        return cls(obj["image_id"], str(obj.get("file_name")), str(obj.get("status")), obj["dets"], obj.get("error"))


class Journal:
    """The append-only JSON Lines file of an evaluation run (header line, then one line per image).

    Use :meth:`open`; :meth:`append` writes and flushes one record, :meth:`sync` fsyncs.
    """

    def __init__(self, path: Path, stream: io.BufferedWriter, records: dict[int, JournalRecord]) -> None:
        self.path = path
        self._stream = stream
        self.records = records
        self._unsynced = 0

    @classmethod
    def open(cls, path: str | os.PathLike, settings: dict[str, Any], resume: bool, log: Callable[[str], None] = _stderr) -> "Journal":
        """Create a journal, or with ``resume`` continue an existing one made with the same ``settings``.

        Raises:
            JournalError: a journal exists and ``resume`` is false; or its settings differ; or it is corrupt.
        """
        path = Path(path)
        header = {"format": JOURNAL_FORMAT, "version": JOURNAL_VERSION, "settings": settings}
        records: dict[int, JournalRecord] = {}
        if path.exists() and not resume:
            raise JournalError(
                f"{path}: a journal from an earlier run is here; pass --resume to continue it, "
                f"or choose another --output-dir (or delete the folder) to start over"
            )
        if resume and path.exists():
            good_bytes, stored, records = cls._read(path)
            if stored is not None:
                if stored.get("settings") != settings:
                    raise JournalError(f"{path}: cannot resume, the journal was made with other settings ({_diff(stored.get('settings'), settings)})")
                if good_bytes < path.stat().st_size:
                    log(f"warning: {path}: dropping a torn last line (the earlier run stopped while writing it)")
                stream = open(path, "r+b")
                stream.truncate(good_bytes)
                stream.seek(good_bytes)
                return cls(path, stream, records)
            log(f"warning: {path}: no complete header line; starting a new journal")
        elif resume:
            log(f"note: {path} does not exist; nothing to resume, starting from the first image")
        path.parent.mkdir(parents=True, exist_ok=True)
        stream = open(path, "wb")
        stream.write((json.dumps(header, separators=(",", ":")) + "\n").encode("utf-8"))
        stream.flush()
        os.fsync(stream.fileno())
        return cls(path, stream, records)

    @staticmethod
    def _read(path: Path) -> tuple[int, dict | None, dict[int, JournalRecord]]:
        """Parse a journal: (bytes of the good prefix, header or None, records by image id; last wins).

        A final line that is incomplete or does not parse is a torn write and is left out; a bad line
        followed by good ones means the file was damaged otherwise.
        """
        data = path.read_bytes()
        lines = data.split(b"\n")
        header: dict | None = None
        records: dict[int, JournalRecord] = {}
        offset = 0
        good = 0
        bad_line: int | None = None
        for number, raw in enumerate(lines, start=1):
            complete = number < len(lines)  # the piece after the last newline has none
            end = offset + len(raw) + (1 if complete else 0)
            if raw.strip():
                try:
                    if not complete:
                        raise ValueError("no newline")
                    obj = json.loads(raw)
                    if header is None:
                        if not (isinstance(obj, dict) and obj.get("format") == JOURNAL_FORMAT):
                            raise JournalError(f"{path}: not a paadet evaluation journal (line 1)")
                        if obj.get("version") != JOURNAL_VERSION:
                            raise JournalError(f"{path}: journal version {obj.get('version')} is not {JOURNAL_VERSION}")
                        header = obj
                    else:
                        record = JournalRecord.from_obj(obj)
                        records[record.image_id] = record
                except (ValueError, UnicodeDecodeError):
                    if bad_line is None:
                        bad_line = number
                else:
                    if bad_line is not None:
                        raise JournalError(f"{path}: line {bad_line} is damaged but later lines are not; delete the journal to start over")
                    good = end
            elif bad_line is None:
                good = end
            offset = end
        return good, header, records

    def append(self, record: JournalRecord) -> None:
        self._stream.write(record.to_line())
        self._stream.flush()
        self.records[record.image_id] = record
        self._unsynced += 1

    def sync(self) -> None:
        """fsync what was appended since the last call."""
        if self._unsynced:
            self._stream.flush()
            os.fsync(self._stream.fileno())
            self._unsynced = 0

    @property
    def unsynced(self) -> int:
        return self._unsynced

    def close(self) -> None:
        if not self._stream.closed:
            self.sync()
            self._stream.close()


def _diff(stored: Any, current: dict[str, Any]) -> str:
    """``key: X in the journal, Y now`` for the settings that differ."""
    if not isinstance(stored, dict):
        return "the journal has no settings"
    keys = sorted(set(stored) | set(current))
    parts = [f"{k}: {stored.get(k)!r} in the journal, {current.get(k)!r} now" for k in keys if stored.get(k) != current.get(k)]
    return "; ".join(parts)


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
        detections = [d for r in records for d in _entries(r.image_id, r.dets)]
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

