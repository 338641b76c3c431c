"""Detection-set parity: do two sets of detections of one image agree, detection by detection?

The rule used across paadet's parity checks: a reference detection is matched by one of ours with
the same label, box IoU >= ``iou_thr`` and ``|score difference| <= score_tol``; each of ours matches
at most one reference detection. Extra detections are ours that match nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class MatchReport:
    """Counts over one or more images."""

    reference: int = 0
    ours: int = 0
    matched: int = 0

    @property
    def missed(self) -> int:
        return self.reference - self.matched

    @property
    def extra(self) -> int:
        return self.ours - self.matched

    @property
    def matched_fraction(self) -> float:
        return self.matched / self.reference if self.reference else 1.0

    def __iadd__(self, other: MatchReport) -> MatchReport:
        self.reference += other.reference
        self.ours += other.ours
        self.matched += other.matched
        return self

    def __str__(self) -> str:
        return (
            f"matched {self.matched}/{self.reference} reference detections "
            f"({100 * self.matched_fraction:.2f}%), {self.extra} extra"
        )


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix of ``[M, 4]`` and ``[N, 4]`` xyxy boxes, float64."""
    a = np.asarray(a, np.float64).reshape(-1, 4)
    b = np.asarray(b, np.float64).reshape(-1, 4)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = np.clip(rb - lt, 0, None)
    inter = wh[..., 0] * wh[..., 1]
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
    identical = np.all(a[:, None, :] == b[None, :, :], axis=-1)  # also degenerate boxes equal to themselves
    return np.where(identical, 1.0, iou)


def match_detections(
    ref_boxes,
    ref_scores,
    ref_labels,
    boxes,
    scores,
    labels,
    iou_thr: float = 0.99,
    score_tol: float = 1e-4,
) -> MatchReport:
    """Match one image's detections against the reference's (greedy, best reference score first)."""
    ref_boxes = np.asarray(ref_boxes, np.float64).reshape(-1, 4)
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    ref_scores, scores = np.asarray(ref_scores, np.float64), np.asarray(scores, np.float64)
    ref_labels, labels = np.asarray(ref_labels), np.asarray(labels)
    ious = box_iou(ref_boxes, boxes)
    ok = (
        (ref_labels[:, None] == labels[None, :])
        & (ious >= iou_thr)
        & (np.abs(ref_scores[:, None] - scores[None, :]) <= score_tol)
    )
    used = np.zeros(len(boxes), bool)
    matched = 0
    for i in np.argsort(-ref_scores, kind="stable"):
        cand = np.flatnonzero(ok[i] & ~used)
        if cand.size:
            used[cand[np.argmax(ious[i, cand])]] = True
            matched += 1
    return MatchReport(reference=len(ref_boxes), ours=len(boxes), matched=matched)
