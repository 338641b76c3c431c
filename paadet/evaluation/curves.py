"""Precision-recall curves taken from pycocotools' own precision array, as the evaluation pictures draw them.

``COCOeval.accumulate`` leaves ``eval["precision"]``, ``[T, R, K, A, M]``: the interpolated precision at each of
101 recall points (``R``), for each IoU threshold (``T``), category (``K``), area range and detection limit. The
curves here are slices of it at area ``all`` and 100 detections per image, with no other arithmetic than means:

* a category's curve at IoU 0.5 is its row at that threshold; at IoU 0.5:0.95, the mean over the ten thresholds;
* the all-classes curve is the mean over the categories that have ground truth (pycocotools marks the others -1).

The area under a curve, the mean of its 101 points, is therefore pycocotools' AP for that slice: the all-classes
curve at 0.5:0.95 gives ``stats[0]`` (AP), at 0.5 ``stats[1]`` (AP50), a category's curve its per-class AP.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from paadet.evaluation.metrics import PrecisionArrays

__all__ = ["IOU_RANGES", "PRCurves", "pr_curves"]

IOU_RANGES = ("0.50", "0.50:0.95")
"""The IoU selections drawn: the first threshold alone, and all ten averaged (COCO's AP)."""


@dataclass
class PRCurves:
    """The curves drawn, by IoU selection (a key of :data:`IOU_RANGES`).

    Attributes:
        recall: ``[R]`` the recall points (x of every curve).
        cat_ids: ``[K]`` category ids; names: ``[K]`` their names.
        per_class: key -> ``[K, R]`` precision; a row of NaN for a category without ground truth.
        all_classes: key -> ``[R]`` precision, the mean over the categories with ground truth (NaN if none).
    """

    recall: np.ndarray
    cat_ids: list[Any]
    names: list[str]
    per_class: dict[str, np.ndarray]
    all_classes: dict[str, np.ndarray]

    def area(self, key: str) -> float:
        """The area under the all-classes curve as COCO computes AP: the mean of its 101 points (NaN if none)."""
        return float(np.mean(self.all_classes[key]))

    def class_area(self, key: str) -> np.ndarray:
        """``[K]`` the area under each category's curve (NaN for a category without ground truth)."""
        return self.per_class[key].mean(axis=1)

    def to_json(self) -> dict[str, Any]:
        def listed(a: np.ndarray) -> list:
            return np.where(np.isnan(a), None, np.round(a, 6)).tolist()

        return {
            "recall": np.round(self.recall, 6).tolist(),
            "category_ids": self.cat_ids,
            "names": self.names,
            "all_classes": {k: listed(v) for k, v in self.all_classes.items()},
            "per_class": {k: listed(v) for k, v in self.per_class.items()},
            "AP": {k: None if np.isnan(self.area(k)) else round(self.area(k), 6) for k in IOU_RANGES},
        }


def _index(values: list, wanted: Any, what: str) -> int:
    for i, v in enumerate(values):
        if v == wanted:
            return i
    raise ValueError(f"pycocotools' parameters have no {what} {wanted!r} (they have {values})")


def pr_curves(arrays: PrecisionArrays, max_dets: int = 100) -> PRCurves:
    """Slice ``arrays.precision`` at area ``all`` and ``max_dets`` detections per image into :class:`PRCurves`.

    Raises:
        ValueError: the arrays have no area range ``all``, no threshold 0.5, or no ``max_dets`` limit.
    """
    area = _index(arrays.area_labels, "all", "area range")
    limit = _index(arrays.max_dets, max_dets, "detection limit")
    iou50 = _index([float(t) for t in arrays.iou_thrs], 0.5, "IoU threshold")
    p = arrays.precision[:, :, :, area, limit]  # [T, R, K]
    per_class, all_classes = {}, {}
    for key, thresholds in zip(IOU_RANGES, (slice(iou50, iou50 + 1), slice(None)), strict=True):
        q = p[thresholds]  # [t, R, K]
        valid = q > -1
        n = valid.sum(0)  # [R, K]: the thresholds with ground truth (all or none, per category)
        with np.errstate(invalid="ignore", divide="ignore"):
            per_class[key] = (np.where(valid, q, 0).sum(0) / n).T  # [K, R], NaN where n == 0
            all_classes[key] = np.where(valid, q, 0).sum((0, 2)) / valid.sum((0, 2))  # [R]
    return PRCurves(np.array(arrays.rec_thrs), list(arrays.cat_ids), list(arrays.names), per_class, all_classes)
