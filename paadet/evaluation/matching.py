"""Matching detections to ground truth box by box, for the evaluation pictures: the confusion matrix and each
image's found, confused and missed boxes.

One image at a time, at one IoU threshold and one score threshold, in two passes:

1. **Within each category, as pycocotools matches** (``COCOeval.evaluateImg``, area ``all``): the category's
   detections, at most ``max_dets`` per image by descending score (a stable sort, as pycocotools'), each take the
   unmatched ground-truth box of that category with the highest IoU at or above the threshold; a detection that
   finds none but overlaps a crowd box (pycocotools' crowd IoU) is ignored, as pycocotools ignores it. Only
   detections scoring at least the score threshold take part. These pairs are the diagonal: true positives.
2. **Across categories, ultralytics-style**: the detections left over, by descending score, each take the
   left-over ground-truth box of another category with the highest IoU at or above the threshold: a class
   confusion (row: the box's category, column: the detection's).

What remains: ground-truth boxes without a detection are *missed* (the background column), detections without a
box are *false positives* (the background row). Crowd boxes are never counted. Detections of a category the
annotation file lacks are left out, as pycocotools leaves them out.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

__all__ = ["ConfusionMatrix", "ImageMatch", "match_detections"]

FOUND, CONFUSED, MISSED = "found", "confused", "missed"
"""What became of a ground-truth box."""
TP, FP = "tp", "fp"
"""What became of a detection (or :data:`CONFUSED`)."""


@dataclass
class ImageMatch:
    """One image's boxes after matching (crowd boxes and ignored detections left out).

    Attributes:
        image_id: the COCO image id.
        gt_boxes: ``[G, 4]`` ground-truth boxes, ``[x, y, w, h]`` pixels.
        gt_labels: ``[G]`` their category ids.
        gt_status: ``[G]`` :data:`FOUND`, :data:`CONFUSED` (taken by a detection of another category) or
            :data:`MISSED`.
        dt_boxes: ``[D, 4]`` the detections scoring at least the threshold, ``[x, y, w, h]``, by descending score.
        dt_labels: ``[D]`` their category ids.
        dt_scores: ``[D]`` their scores.
        dt_status: ``[D]`` :data:`TP`, :data:`CONFUSED` or :data:`FP`.
    """

    image_id: Any
    gt_boxes: np.ndarray
    gt_labels: list[Any]
    gt_status: list[str]
    dt_boxes: np.ndarray
    dt_labels: list[Any]
    dt_scores: np.ndarray
    dt_status: list[str]

    @property
    def missed(self) -> int:
        """Ground-truth boxes without a detection of their category (:data:`CONFUSED` or :data:`MISSED`)."""
        return sum(s != FOUND for s in self.gt_status)


@dataclass
class ConfusionMatrix:
    """Box counts by ground-truth category (rows) and detected category (columns), plus background.

    Attributes:
        cat_ids: ``[K]`` category ids, ascending; row and column ``k`` are category ``cat_ids[k]``.
        names: ``[K]`` their names.
        counts: ``[K + 1, K + 1]`` integers. ``counts[i, j]``: boxes of category ``i`` taken by a detection of
            category ``j`` (the diagonal: true positives); ``counts[i, K]``: boxes of category ``i`` missed;
            ``counts[K, j]``: false positives of category ``j``; ``counts[K, K]`` is 0.
        iou_thr: the IoU threshold of a match.
        score_thr: the lowest detection score counted.
    """

    cat_ids: list[Any]
    names: list[str]
    counts: np.ndarray
    iou_thr: float
    score_thr: float

    def present(self) -> list[int]:
        """Indices of the categories with any box or detection counted (the others' rows and columns are 0)."""
        k = len(self.cat_ids)
        used = self.counts[:k, :].sum(1) + self.counts[:, :k].sum(0)
        return [i for i in range(k) if used[i] > 0]

    def normalized(self) -> np.ndarray:
        """``counts`` with each row divided by its sum (rows of zeros stay 0): for a category's row, the
        fractions of its boxes found, confused with each other category, and missed; for the background row,
        the false positives' shares by category."""
        totals = self.counts.sum(1, keepdims=True).astype(np.float64)
        return np.divide(self.counts, totals, out=np.zeros(self.counts.shape), where=totals > 0)

    def to_json(self) -> dict[str, Any]:
        return {
            "iou_thr": self.iou_thr,
            "score_thr": self.score_thr,
            "rows": "ground truth (last: background = false positives)",
            "columns": "detections (last: background = missed boxes)",
            "category_ids": self.cat_ids,
            "names": self.names,
            "counts": self.counts.tolist(),
        }


def _coco_greedy(ious: np.ndarray, crowd: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """pycocotools' matching loop at one threshold, for detections by descending score and boxes with the
    non-crowd ones first (``ious`` already compared against the threshold by the caller's ``-1`` fill).

    Returns: ``[D]`` index of the box each detection took (-1: none), ``[G]`` whether each box was taken.
    """
    num_dt, num_gt = ious.shape
    taken = np.zeros(num_gt, dtype=bool)
    matched = np.full(num_dt, -1)
    for d in range(num_dt):
        best, m = -np.inf, -1
        for g in range(num_gt):
            if taken[g] and not crowd[g]:
                continue
            if m > -1 and not crowd[m] and crowd[g]:
                break
            if ious[d, g] < 0 or ious[d, g] < best:
                continue
            best, m = ious[d, g], g
        if m > -1:
            matched[d] = m
            taken[m] = True
    return matched, taken


def _iou(dt: np.ndarray, gt: np.ndarray, crowd: Sequence[bool]) -> np.ndarray:
    """``[D, G]`` pycocotools' box IoU (for a crowd box: the intersection over the detection's area)."""
    if len(dt) == 0 or len(gt) == 0:
        return np.zeros((len(dt), len(gt)))
    return np.asarray(mask_utils.iou(dt.tolist(), gt.tolist(), [int(c) for c in crowd]), dtype=np.float64)


def _match_image(
    image_id: Any,
    anns: list[dict],
    dets: list[dict],
    index: dict[Any, int],
    counts: np.ndarray,
    iou_thr: float,
    score_thr: float,
    max_dets: int,
) -> ImageMatch:
    """Match one image (both passes), add its pairs to ``counts`` and return its boxes' fates."""
    background = len(index)
    by_cat: dict[Any, list[dict]] = defaultdict(list)
    for d in dets:
        by_cat[d["category_id"]].append(d)
    kept: list[dict] = []
    for cat_dets in by_cat.values():
        order = np.argsort([-d["score"] for d in cat_dets], kind="mergesort")[:max_dets]
        kept += [cat_dets[i] for i in order if cat_dets[i]["score"] >= score_thr]
    kept = [kept[i] for i in np.argsort([-d["score"] for d in kept], kind="mergesort")]
    normal = [a for a in anns if not a["iscrowd"]]
    gt_status = [MISSED] * len(normal)
    dt_status: list[str | None] = [None] * len(kept)  # None: not matched yet
    gt_of = {id(a): i for i, a in enumerate(normal)}
    dt_of = {id(d): i for i, d in enumerate(kept)}
    for cat in {d["category_id"] for d in kept} | {a["category_id"] for a in anns}:
        cat_gt = sorted((a for a in anns if a["category_id"] == cat), key=lambda a: bool(a["iscrowd"]))
        cat_dt = [d for d in kept if d["category_id"] == cat]
        if not cat_dt or not cat_gt:
            continue
        crowd = np.array([bool(a["iscrowd"]) for a in cat_gt])
        ious = _iou(np.array([d["bbox"] for d in cat_dt]), np.array([a["bbox"] for a in cat_gt]), crowd)
        ious[ious < min(iou_thr, 1 - 1e-10)] = -1
        matched, _ = _coco_greedy(ious, crowd)
        for d, m in zip(cat_dt, matched, strict=True):
            if m < 0:
                continue
            if crowd[m]:
                dt_status[dt_of[id(d)]] = "ignored"
            else:
                dt_status[dt_of[id(d)]] = TP
                gt_status[gt_of[id(cat_gt[m])]] = FOUND
                counts[index[cat], index[cat]] += 1
    left_dt = [i for i, s in enumerate(dt_status) if s is None]
    left_gt = [i for i, s in enumerate(gt_status) if s == MISSED]
    if left_dt and left_gt:
        ious = _iou(
            np.array([kept[i]["bbox"] for i in left_dt]),
            np.array([normal[i]["bbox"] for i in left_gt]),
            [False] * len(left_gt),
        )
        dt_cats = np.array([index[kept[i]["category_id"]] for i in left_dt])
        gt_cats = np.array([index[normal[j]["category_id"]] for j in left_gt])
        ious[dt_cats[:, None] == gt_cats[None, :]] = -1  # another category's boxes only
        for r, i in enumerate(left_dt):
            c = int(np.argmax(ious[r]))
            if ious[r, c] >= min(iou_thr, 1 - 1e-10):
                j = left_gt[c]
                dt_status[i], gt_status[j] = CONFUSED, CONFUSED
                counts[gt_cats[c], dt_cats[r]] += 1
                ious[:, c] = -1  # taken
    for i, s in enumerate(dt_status):
        if s is None:
            dt_status[i] = FP
            counts[background, index[kept[i]["category_id"]]] += 1
    for j, s in enumerate(gt_status):
        if s == MISSED:
            counts[index[normal[j]["category_id"]], background] += 1
    shown = [i for i, s in enumerate(dt_status) if s != "ignored"]
    return ImageMatch(
        image_id=image_id,
        gt_boxes=np.array([a["bbox"] for a in normal], dtype=np.float64).reshape(-1, 4),
        gt_labels=[a["category_id"] for a in normal],
        gt_status=gt_status,
        dt_boxes=np.array([kept[i]["bbox"] for i in shown], dtype=np.float64).reshape(-1, 4),
        dt_labels=[kept[i]["category_id"] for i in shown],
        dt_scores=np.array([kept[i]["score"] for i in shown], dtype=np.float64),
        dt_status=[str(dt_status[i]) for i in shown],
    )


def match_detections(
    gt: COCO,
    detections: Iterable[dict],
    img_ids: Iterable[Any] | None = None,
    iou_thr: float = 0.5,
    score_thr: float = 0.3,
    max_dets: int = 100,
) -> tuple[ConfusionMatrix, list[ImageMatch]]:
    """Match COCO results entries to ``gt``'s boxes (see the module's docstring) and count the pairs.

    Args:
        gt: the ground truth (``iscrowd`` set on every annotation, as :func:`paadet.data.coco.load_coco` sets it).
        detections: COCO results entries (``image_id``, ``category_id``, ``bbox`` ``[x, y, w, h]``, ``score``).
        img_ids: the images to match (default: all of ``gt``'s), in the order of the returned list.
        iou_thr: the IoU a detection needs with a box to take it.
        score_thr: detections scoring below this take no part.
        max_dets: per image and category, only the highest-scoring ``max_dets`` detections count (pycocotools'
            100 of its AP).

    Returns:
        The confusion matrix over all of ``gt``'s categories, and each image's :class:`ImageMatch`.
    """
    cat_ids = sorted(gt.cats)
    index = {c: k for k, c in enumerate(cat_ids)}
    counts = np.zeros((len(cat_ids) + 1, len(cat_ids) + 1), dtype=np.int64)
    by_image: dict[Any, list[dict]] = defaultdict(list)
    for d in detections:
        if d["category_id"] in index:
            by_image[d["image_id"]].append(d)
    ids = sorted(gt.imgs) if img_ids is None else list(img_ids)
    images = []
    for image_id in ids:
        anns = [a for a in gt.imgToAnns.get(image_id, []) if a["category_id"] in index]
        images.append(
            _match_image(image_id, anns, by_image.get(image_id, []), index, counts, iou_thr, score_thr, max_dets)
        )
    names = [str(gt.cats[c].get("name", c)) for c in cat_ids]
    return ConfusionMatrix(cat_ids, names, counts, float(iou_thr), float(score_thr)), images
