"""COCO box metrics: score COCO results entries, or a results file, with pycocotools.

The metrics are pycocotools' ``COCOeval`` (``iouType="bbox"``), run exactly as one would run it by
hand (``loadRes`` on the results list, ``evaluate``, ``accumulate``, ``summarize``), so the twelve
numbers are pycocotools' own. Only the images evaluated count: ``params.imgIds`` is set to them.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from paadet.console import listed, stderr
from paadet.data.coco import (
    DatasetError,
    coco_from_dict,
    is_coco_id,
    is_finite_number,
    is_number,
    load_coco,
    read_json,
    shown,
)
from paadet.errors import PaadetError

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


class ResultsError(PaadetError):
    """A detections (results) file that cannot be scored; the message names the file."""


# --------------------------------------------------------------------------------------------
# Scoring


@dataclass
class PrecisionArrays:
    """pycocotools' own precision array of one evaluation, with the axes it is indexed by.

    Attributes:
        precision: ``COCOeval.eval["precision"]``, ``[T, R, K, A, M]``: IoU thresholds, recall points,
            categories, area ranges, max detections; -1 where a category has no ground truth.
        iou_thrs: ``[T]`` IoU thresholds (0.5, 0.55 ... 0.95).
        rec_thrs: ``[R]`` recall points (0, 0.01 ... 1: the 101-point interpolation).
        cat_ids: ``[K]`` category ids, in the array's order.
        names: ``[K]`` category names (the id as text where the file gives none).
        area_labels: ``[A]`` area range names (``all``, ``small``, ``medium``, ``large``).
        max_dets: ``[M]`` detections per image (1, 10, 100).
    """

    precision: np.ndarray
    iou_thrs: np.ndarray
    rec_thrs: np.ndarray
    cat_ids: list[Any]
    names: list[str]
    area_labels: list[str]
    max_dets: list[int]

    @classmethod
    def of(cls, evaluator: COCOeval, gt: COCO) -> PrecisionArrays:
        """The arrays of an accumulated ``evaluator`` (copied; the evaluator may be dropped)."""
        p = evaluator.params
        return cls(
            precision=np.array(evaluator.eval["precision"], dtype=np.float64),
            iou_thrs=np.array(p.iouThrs, dtype=np.float64),
            rec_thrs=np.array(p.recThrs, dtype=np.float64),
            cat_ids=[c.item() if isinstance(c, np.generic) else c for c in p.catIds],  # np.unique made them numpy
            names=[str(gt.cats[c].get("name", c)) for c in p.catIds],
            area_labels=list(p.areaRngLbl),
            max_dets=[int(m) for m in p.maxDets],
        )


@dataclass
class CocoMetrics:
    """The result of one COCO evaluation.

    Attributes:
        stats: the twelve :data:`METRIC_KEYS` as pycocotools' fractions (-1 where undefined).
        per_class: category name -> AP@[0.5:0.95] (None for a category with no ground truth), when asked.
        num_images: images evaluated (``params.imgIds``).
        num_detections: detections given for those images.
        arrays: pycocotools' precision array and its axes (what the evaluation pictures draw); not in the JSON.
    """

    stats: dict[str, float]
    per_class: dict[str, float | None] | None
    num_images: int
    num_detections: int
    arrays: PrecisionArrays | None = field(default=None, repr=False, compare=False)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.stats)
        if self.per_class is not None:
            out["per_class_AP"] = self.per_class
        return out


def _results_coco(gt: COCO, detections: list[dict]) -> COCO:
    """``gt.loadRes(detections)`` (on copies: it adds keys); an empty list gives an empty index
    (pycocotools' ``loadRes`` fails on one).

    ``loadRes`` is called on a stand-in holding only ``gt``'s images: it deep-copies the ground truth's ``info``
    and ``categories``, which ``COCOeval`` never reads from the results, and a deep copy of a deeply nested
    ``info`` would fail after the detector has run.
    """
    if detections:
        images_only = COCO()
        images_only.dataset = {"images": gt.dataset["images"], "categories": []}
        images_only.imgs = gt.imgs
        with contextlib.redirect_stdout(io.StringIO()):
            return images_only.loadRes([dict(d) for d in detections])
    return coco_from_dict(
        {"images": list(gt.dataset["images"]), "categories": list(gt.dataset["categories"]), "annotations": []}
    )


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
    stats = {key: float(value) for key, value in zip(METRIC_KEYS, evaluator.stats, strict=False)}
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
    return CocoMetrics(stats, classes, len(evaluator.params.imgIds), num_dets, PrecisionArrays.of(evaluator, gt))


def validate_results(data: Any, path: str | os.PathLike, gt: COCO, ann_file: str | os.PathLike) -> list[dict]:
    """Check a parsed COCO results file: a list of ``{image_id, category_id, bbox, score}`` on ``gt``'s images,
    every score and box value finite (pycocotools would sort a NaN score and match a NaN box, and report an AP).

    Raises:
        ResultsError: the first malformed entry, naming ``path``; or the non-finite values, counted, with the
            first one named; or image ids that ``gt`` lacks.
    """
    if not isinstance(data, list):
        raise ResultsError(
            f"{path}: not a COCO results file (expected a JSON list of detections, got a {type(data).__name__})"
        )
    for i, d in enumerate(data):
        ok = (
            isinstance(d, dict)
            and is_coco_id(d.get("image_id"))
            and is_coco_id(d.get("category_id"))
            and isinstance(d.get("bbox"), list)
            and len(d["bbox"]) == 4
            and all(is_number(v) for v in d["bbox"])
            and is_number(d.get("score"))
        )
        if not ok:
            raise ResultsError(
                f"{path}: entry {i} is not a box detection {{image_id, category_id, bbox: [x, y, w, h], score}}: "
                f"{shown(d)}"
            )
    _refuse_non_finite(data, path)
    unknown = sorted({d["image_id"] for d in data} - set(gt.imgs))
    if unknown:
        raise ResultsError(f"{path}: {len(unknown)} image ids are not in {ann_file}: {listed(unknown)}")
    return data


def _refuse_non_finite(detections: list[dict], path: str | os.PathLike) -> None:
    """Raise :class:`ResultsError` counting the NaN and infinite scores and box values, naming the first."""
    count = entries = 0
    first = ""
    for i, d in enumerate(detections):
        bad = [f"bbox[{k}]" for k, v in enumerate(d["bbox"]) if not is_finite_number(v)]
        bad += ["score"] if not is_finite_number(d["score"]) else []
        if bad:
            if not first:
                value = d["score"] if bad[0] == "score" else d["bbox"][int(bad[0][5])]
                first = f"entry {i}'s {bad[0]} is {shown(value)}"
            count += len(bad)
            entries += 1
    if count:
        raise ResultsError(
            f"{path}: {count} non-finite values (NaN or infinite) in the scores and boxes of {entries} of its "
            f"{len(detections)} detections; the first: {first}. Every score and box value must be a finite number"
        )


def evaluate_results_file(
    results: str | os.PathLike,
    ann_file: str | os.PathLike,
    limit: int | None = None,
    per_class: bool = False,
    log: Callable[[str], None] = stderr,
) -> CocoMetrics:
    """Score an existing COCO results file against an annotation file, without a model.

    With ``limit``, only the first ``limit`` images by id are evaluated; otherwise all of the
    annotation file's images, exactly as ``COCOeval`` does by default.

    Raises:
        DatasetError: the annotation file is missing or malformed.
        ResultsError: the results file is missing, malformed or names images the annotations lack.
    """
    gt, detections, img_ids = load_results_file(results, ann_file, limit, log)
    return coco_evaluate(gt, detections, img_ids=img_ids, per_class=per_class)


def load_results_file(
    results: str | os.PathLike,
    ann_file: str | os.PathLike,
    limit: int | None = None,
    log: Callable[[str], None] = stderr,
) -> tuple[COCO, list[dict], list[Any] | None]:
    """Read and check a results file and its annotation file (see :func:`evaluate_results_file`).

    Returns:
        The ground truth, the results entries, and the images to evaluate (None: all, pycocotools' default).
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
        raise ResultsError(
            f"{results}: none of its category ids ({listed(found)}) is one of the categories of "
            f"{ann_file} ({listed(sorted(gt.cats))}); were the results made with another class list?"
        )
    if foreign:
        log(
            f"warning: {results}: {len(foreign)} of its {len(found)} category ids are not in {ann_file} "
            f"({listed(foreign)}); their detections cannot match"
        )
    img_ids = sorted(gt.imgs)[:limit] if limit is not None else None
    return gt, detections, img_ids


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
