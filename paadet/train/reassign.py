"""PAA's probabilistic anchor reassignment (mmdetection 3.3 ``PAAHead.get_pos_loss`` + ``paa_reassign``), batched.

The pre-assigned positives of the whole batch (every image, every GT) are handled at once:

1. :func:`paa_anchor_scores`: each positive's score is the focal loss of its class logits against
   its GT's class, summed over the classes, plus ``1.3 * (1 - GIoU)`` of its decoded box (no
   clipping) with the GT box, exactly as ``get_pos_loss`` computes it.
2. :func:`paa_reassign`: for every GT, per level the ``min(count, topk)`` candidates of smallest
   score, concatenated over the levels and sorted ascending; a GT with fewer than 2 candidates gets no
   positive; the others get the 2-component GMM of :func:`paadet.train.gmm.fit_gmm_1d` on their
   candidates and keep as positives what :func:`paadet.train.gmm.gmm_positives` selects. Every other
   pre-assigned positive becomes a negative (background label, label weight still 1).

mmdetection loops over GT indices ``0..max(pos_gt_inds)``; a GT without pre-assigned anchor has no
candidate and is skipped, and each anchor belongs to one GT, so handling every GT of the batch at once
gives the same positives. No Python loop over GTs, anchors or samples, and no host sync here (the
GMM's few syncs are bounded independently of the number of GTs).

Ties. mmdetection's ``torch.topk(largest=False)`` and ``torch.sort()`` (not stable) order equal scores
in an implementation-defined way (on the CPU: libstdc++'s nth_element / partial_sort for topk,
introsort above 16 elements for sort). Here equal scores are ordered by anchor index (the order of
the inputs, which the caller gives ascending), in the per-level top-k and in the final sort: the
candidates of a GT are sorted by ``(score, anchor index)``. When the scores are distinct (always,
in practice: they mix a GIoU and 80 focal terms) this is exactly mmdetection's result; with exact
ties the same *values* are kept and sorted (so the GMM sees the same data), only which of the tied
anchors fills a slot may differ.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from paadet.boxes import aligned_giou
from paadet.errors import PaadetError
from paadet.model.box_coder import DeltaXYWHBoxCoder
from paadet.train import gmm


def sigmoid_focal_loss(logits: Tensor, labels: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Element-wise sigmoid focal loss ``[N, C]`` of logits ``[N, C]`` against labels ``[N]`` in ``0..C``.

    Label ``C`` is background (every class negative). mmdetection's ``py_sigmoid_focal_loss`` (the CPU
    path, used here on every device): ``BCE-with-logits * focal weight`` with ``pt = (1 - p) t + p (1 - t)``
    and weight ``(alpha t + (1 - alpha)(1 - t)) * pt^gamma`` (no ``FLT_MIN`` saturation of the log,
    unlike mmcv's CUDA kernel; the two differ only where ``log p`` underflows).
    """
    num_classes = logits.shape[-1]
    # mmdetection's one_hot(labels, C + 1)[:, :C], without one_hot's range checks (host syncs on the CPU)
    classes = torch.arange(num_classes, device=labels.device)
    target = (labels[:, None] == classes[None, :]).type_as(logits)
    prob = logits.sigmoid()
    pt = (1 - prob) * target + prob * (1 - target)
    focal_weight = (alpha * target + (1 - alpha) * (1 - target)) * pt.pow(gamma)
    return F.binary_cross_entropy_with_logits(logits, target, reduction="none") * focal_weight


def sigmoid_focal_row_sums(logits: Tensor, labels: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """``sigmoid_focal_loss(logits, labels, alpha, gamma).sum(-1)`` bit for bit, in 6 passes instead of ~20: ``[N]``.

    Args:
        logits: ``[N, C]`` float logits.
        labels: ``[N]`` int64 in ``0..C-1``: every row has one positive class (PAA's pre-assigned positives).

    The one-hot target is 0 or 1, so each of mmdetection's operations with it is exact: against 0 an
    element is ``(x - log_sigmoid(x)) * ((1 - alpha) * p^2)``, against 1 it is
    ``(-log_sigmoid(x)) * (alpha * (1 - p)^2)``, with ``p`` and ``log_sigmoid(x)`` from the same kernels on
    the same ``[N, C]`` tensor as in :func:`sigmoid_focal_loss`. Every element is first computed as a
    negative, each row's positive element is then overwritten (squares, products and differences are
    correctly rounded however they are vectorised), and the rows are summed as there.
    ``tests/test_reassign.py`` checks the equality with ``torch.equal``. For ``gamma != 2`` (``pow``'s
    vector and scalar paths may round differently) this is :func:`sigmoid_focal_loss`'s own sum.
    """
    if gamma != 2.0:
        return sigmoid_focal_loss(logits, labels, alpha, gamma).sum(-1)
    prob = logits.sigmoid()
    log_prob = F.logsigmoid(logits)
    terms = (logits - log_prob).mul_(prob.pow(gamma).mul_(1 - alpha))
    rows = torch.arange(labels.shape[0], device=labels.device)
    p, lp = prob[rows, labels], log_prob[rows, labels]
    terms[rows, labels] = (-lp) * ((1 - p).pow(gamma) * alpha)
    return terms.sum(-1)


def paa_anchor_scores(
    cls_logits: Tensor,
    labels: Tensor,
    anchors: Tensor,
    box_deltas: Tensor,
    gt_boxes: Tensor,
    *,
    box_coder: DeltaXYWHBoxCoder | None = None,
    focal_alpha: float = 0.25,
    focal_gamma: float = 2.0,
    cls_weight: float = 1.0,
    bbox_weight: float = 1.3,
    giou_eps: float = 1e-6,
) -> Tensor:
    """PAA's score of pre-assigned positive anchors (lower is better): ``[P]``.

    ``cls_weight * sum_c focal(logits, label) + bbox_weight * (1 - GIoU(decode(anchor, delta), gt))``,
    mmdetection's ``get_pos_loss`` with reduction ``'none'`` (the loss weight 1.3 of ``GIoULoss``
    applies there too; the decoded box is not clipped).

    Args:
        cls_logits: ``[P, C]`` class logits of the anchors.
        labels: ``[P]`` int64 class of each anchor's GT, in ``0..C-1``.
        anchors: ``[P, 4]`` xyxy.
        box_deltas: ``[P, 4]`` regressions (already scaled by the level's ``Scale``).
        gt_boxes: ``[P, 4]`` xyxy box of each anchor's GT.
    """
    coder = box_coder or DeltaXYWHBoxCoder()
    if cls_weight == 1.0:
        focal = sigmoid_focal_row_sums(cls_logits, labels, focal_alpha, focal_gamma)
    else:  # mmdetection scales the [P, C] terms before summing them
        focal = (cls_weight * sigmoid_focal_loss(cls_logits, labels, focal_alpha, focal_gamma)).sum(-1)
    boxes = coder.decode(anchors, box_deltas)
    giou_term = bbox_weight * (1 - aligned_giou(boxes, gt_boxes, giou_eps))
    return giou_term + focal


def rank_in_runs(sorted_keys: Tensor) -> Tensor:
    """Position of each element within its run of equal values of a sorted ``[P]`` tensor: ``[P]`` int64.

    Example: ``[3, 3, 5, 7, 7, 7] -> [0, 1, 0, 0, 1, 2]``.
    """
    num = sorted_keys.shape[0]
    pos = torch.arange(num, device=sorted_keys.device)
    starts = torch.ones(num, dtype=torch.bool, device=sorted_keys.device)
    starts[1:] = sorted_keys[1:] != sorted_keys[:-1]
    run_start = torch.where(starts, pos, 0).cummax(0).values
    return pos - run_start


@dataclass
class CandidateTable:
    """Each GT's candidates in a padded table, ascending by score (ties by input order).

    Attributes:
        scores: ``[G, W]`` scores (0 in padding), ``W = topk * num_levels``.
        mask: ``[G, W]`` bool, True on real candidates (a row's first ``count`` slots).
        slot: ``[P]`` int64 flat slot ``g * W + j`` of each input entry in the table, ``G * W`` for an
            entry that is not a candidate (outside its level's top-k).
    """

    scores: Tensor
    mask: Tensor
    slot: Tensor


def candidate_table(
    scores: Tensor, gt_rows: Tensor, levels: Tensor, num_gts: int, num_levels: int, topk: int = 9
) -> CandidateTable:
    """Per GT and level the ``min(count, topk)`` smallest scores, concatenated and sorted ascending.

    Args:
        scores: ``[P]`` scores of the pre-assigned positives of the batch.
        gt_rows: ``[P]`` int64 each one's GT in ``0..num_gts-1`` (a batch-wide GT index).
        levels: ``[P]`` int64 each one's pyramid level in ``0..num_levels-1``.
        num_gts: ``G``, the number of table rows.
        num_levels: ``L``.
        topk: candidates per GT and level.

    Equal scores are ordered by position in the inputs (see the module docstring), with three stable
    sorts: by score, then by (GT, level) to rank within each level, then by (GT, is-candidate).
    """
    width = topk * num_levels
    device = scores.device
    by_score = torch.sort(scores, stable=True).indices
    group = (gt_rows * num_levels + levels)[by_score]
    by_group = torch.sort(group, stable=True).indices  # (GT, level, score, input order)
    candidate_sorted = rank_in_runs(group[by_group]) < topk
    is_candidate = torch.zeros_like(candidate_sorted).scatter_(0, by_score[by_group], candidate_sorted)

    gt_key = (gt_rows * 2 + (~is_candidate).long())[by_score]
    by_gt = torch.sort(gt_key, stable=True).indices  # (GT, candidates first, score, input order)
    order = by_score[by_gt]
    rank = rank_in_runs(gt_rows[order])
    flat = torch.where(is_candidate[order], gt_rows[order] * width + rank, num_gts * width)
    slot = torch.empty_like(flat).scatter_(0, order, flat)

    table = scores.new_zeros(num_gts * width + 1).scatter_(0, slot, scores)
    mask = torch.zeros(num_gts * width + 1, dtype=torch.bool, device=device).scatter_(0, slot, is_candidate)
    return CandidateTable(table[:-1].reshape(num_gts, width), mask[:-1].reshape(num_gts, width), slot)


@dataclass
class ReassignResult:
    """The outcome of :func:`paa_reassign` for a batch's ``P`` pre-assigned positives and ``G`` GTs.

    Attributes:
        positive: ``[P]`` bool, the anchors that stay positive.
        num_candidates: ``[G]`` int64 candidates of each GT (the GMM ran where this is >= 2).
        ill_defined: ``[G]`` bool, GTs whose GMM scikit-learn would reject with "ill-defined empirical
            covariance" (mmdetection's training step would crash there, mmdetection#4152; here the
            GMM's centred-variance result is used, see :mod:`paadet.train.gmm`).
    """

    positive: Tensor
    num_candidates: Tensor
    ill_defined: Tensor


def paa_reassign(
    scores: Tensor,
    gt_rows: Tensor,
    levels: Tensor,
    num_gts: int,
    num_levels: int,
    *,
    topk: int = 9,
    reg_covar: float = 1e-6,
    tol: float = 1e-3,
    max_iter: int = 100,
) -> ReassignResult:
    """Which pre-assigned positives PAA keeps, for every GT of the batch at once.

    Args:
        scores: ``[P]`` :func:`paa_anchor_scores` of the pre-assigned positives, in ascending anchor
            order within each image (that order breaks exact ties).
        gt_rows: ``[P]`` int64 their GT in ``0..num_gts-1``, unique across the batch
            (e.g. ``image * M + gt``).
        levels: ``[P]`` int64 their pyramid level.
        num_gts: rows of the GT table (``B * M``).
        num_levels: pyramid levels.
        topk: candidates per GT and level (mmdetection: 9).
        reg_covar, tol, max_iter: the GMM's settings (scikit-learn's defaults).
    """
    if not (scores.shape == gt_rows.shape == levels.shape and scores.dim() == 1):
        raise PaadetError(
            f"scores, gt_rows and levels must be [P], got {list(scores.shape)}, "
            f"{list(gt_rows.shape)}, {list(levels.shape)}"
        )
    if topk < 1:
        raise PaadetError(f"topk must be >= 1, got {topk}")
    device = scores.device
    if scores.shape[0] == 0 or num_gts == 0:
        return ReassignResult(
            torch.zeros(scores.shape[0], dtype=torch.bool, device=device),
            torch.zeros(num_gts, dtype=torch.long, device=device),
            torch.zeros(num_gts, dtype=torch.bool, device=device),
        )
    with torch.inference_mode():  # many small operations: inference mode trims torch's per-call cost
        table = candidate_table(scores.detach().float(), gt_rows, levels, num_gts, num_levels, topk)
        fit = gmm.fit_gmm_1d(table.scores, table.mask, reg_covar=reg_covar, tol=tol, max_iter=max_iter)
        positives = gmm.gmm_positives(fit, table.mask)  # no positive for rows with < 2 candidates
        flat = torch.cat([positives.reshape(-1), positives.new_zeros(1)])
        num_candidates = table.mask.sum(1)
        result = (flat[table.slot], num_candidates, fit.ill_defined & (num_candidates >= 2))
    return ReassignResult(*(t.clone() for t in result))  # ordinary tensors for the caller
