"""Running a detector over a COCO-format dataset and scoring it (the scoring is :mod:`paadet.evaluation.metrics`).

A detector run streams each image's detections to an append-only JSON Lines journal in the output
folder (``journal.jsonl``): a header line with the settings, then one line per image. Lines are
flushed as written and fsynced once per batch of images, so a run killed at any point (Ctrl-C, a
crash, SIGKILL) loses at most the image being written; ``resume=True`` reads the journal back, drops
a torn last line, and computes only the images that are not in it. The final ``detections.json``
and ``metrics.json`` are written atomically from the journal, so a resumed run's files equal an
uninterrupted run's; ``metrics.json`` is the mark of a finished run: an earlier run's is removed before
``detections.json`` is written and it is written last, so a write that fails (a full disk) leaves no
``metrics.json`` that describes other detections. The journal itself is :mod:`paadet.evaluation.journal`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from paadet.console import stderr
from paadet.data.coco import CocoDataset, ImageEntry
from paadet.data.pipeline import iter_images
from paadet.detector import Detector
from paadet.evaluation.journal import JOURNAL_NAME, Journal, JournalError, JournalRecord, journal_entries
from paadet.evaluation.metrics import CocoMetrics, coco_evaluate
from paadet.evaluation.plots import PlotOptions, remove_plots, require_matplotlib, write_eval_plots
from paadet.fileio import atomic_write_json, writing
from paadet.runtime.base import StageTimer
from paadet.version import __version__

DETECTIONS_NAME = "detections.json"
METRICS_NAME = "metrics.json"


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
            images=self.images,
            missing_images=self.missing_images,
            detections=self.metrics.num_detections,
            timings=self.timings,
            backend=self.backend,
            settings=self.settings,
            paadet_version=__version__,
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
    log: Callable[[str], None] = stderr,
    on_record: Callable[[JournalRecord], None] | None = None,
    plots: PlotOptions | None = None,
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
        loader: ``threads`` or ``processes`` (see :func:`paadet.data.pipeline.iter_images`).
        workers: decode/resize workers (default: the detector's).
        progress: show a progress bar (stderr).
        log: where warnings go.
        on_record: called with each image's record right after it is journaled (monitoring; tests use it to
            stop a run at a chosen image).
        plots: draw the evaluation pictures into ``output_dir`` (:mod:`paadet.evaluation.plots`) after
            ``detections.json`` and before ``metrics.json``, which lists them; needs ``output_dir``.

    Raises:
        JournalError: see :meth:`Journal.open`, or the journal lists another file for an image id.
    """
    settings = detector_settings(detector, weights)
    if plots is not None:
        if output_dir is None:
            raise ValueError("plots need an output_dir to be written to")
        require_matplotlib()
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
        todo = [
            e for e in dataset.images if e.image_id not in journal.records or journal.records[e.image_id].status != "ok"
        ]
        resumed = len(dataset.images) - len(todo)
        if resume and resumed:
            log(f"resuming: {resumed} of {len(dataset.images)} images are in {journal.path}; computing {len(todo)}")
        timer, wall = _run_images(
            detector, todo, journal, loader, detector.workers if workers is None else workers, progress, log, on_record
        )
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
                "evaluated": len(records),
                "computed": computed,
                "resumed": resumed,
                "missing": sum(r.status == "missing" for r in failed),
                "unreadable": sum(r.status == "unreadable" for r in failed),
            },
            missing_images=[r.file_name for r in failed],
            timings=timings,
            backend=detector.backend.describe(),
            settings=settings,
            output_dir=None if output_dir is None else out,
            extra={"annotations": str(dataset.ann_file), "image_dir": str(dataset.image_dir)},
        )
        if output_dir is not None:
            with writing(out / METRICS_NAME):  # the mark of a finished run: not beside other detections
                (out / METRICS_NAME).unlink(missing_ok=True)
            remove_plots(out)  # nor are an earlier run's pictures
            atomic_write_json(out / DETECTIONS_NAME, detections)
            if plots is not None:
                drawn = write_eval_plots(
                    out, dataset.coco, detections, metrics, dataset.image_ids, dataset.image_dir, plots
                )
                report.extra["plots"] = drawn.summary()
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
    on_record: Callable[[JournalRecord], None] | None = None,
) -> tuple[StageTimer, float]:
    """Detect on ``todo``, appending each image's record to ``journal``; returns the timer and wall seconds."""
    timer = StageTimer(getattr(detector.backend, "device", None))
    start = time.perf_counter()
    if not todo:
        return timer, 0.0
    bar = tqdm(total=len(todo), unit="img", desc="eval", disable=not progress, dynamic_ncols=True, file=sys.stderr)
    try:
        loaded = iter_images([e.source() for e in todo], detector.preset, workers=workers, loader=loader)
        for item, result in detector.run(loaded, timer):
            entry = todo[item.index]
            if item.error is not None:
                log(f"warning: {item.error}; counted as an image with no detections")
            record = _record_for(entry, result, item.error, detector.classes.category_ids)
            with timer.stage("write"):
                journal.append(record)
                if journal.unsynced >= detector.batch_size:
                    journal.sync()
            bar.update(1)
            if on_record is not None:
                on_record(record)
    except KeyboardInterrupt:
        journal.sync()
        log(f"interrupted: {len(journal.records)} images are saved in {journal.path}; rerun with --resume to continue")
        raise
    finally:
        bar.close()
    journal.sync()
    return timer, time.perf_counter() - start
