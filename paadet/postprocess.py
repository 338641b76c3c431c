"""PAA post-processing as batched tensor code: per-level top-k, decoding, multi-class NMS, score voting.

Everything runs on whole batches with tensor operations (no Python loop over candidates,
detections or classes), on CPU or CUDA, without torchvision. The arithmetic mirrors mmdetection
3.3 / mmcv 2.1 operation by operation so that fp32 results agree to rounding:

* NMS IoU is computed as mmcv's CPU kernel does, on boxes shifted by ``label * (max_coord + 1)``
  (mmcv's class-offset trick; it changes float rounding near the threshold, so we keep it).
* Score-voting IoU is mmdetection's ``bbox_overlaps`` (eps 1e-6, no +1).

Shaped for a GPU: the work of a batch is a fixed number of tensor operations (about 320) and host
synchronisations (about a dozen), whatever the batch size, the number of classes or of candidates;
NMS decides each image's score-sorted candidates a tile at a time (:func:`greedy_nms_first`).

Deliberate difference: where a detection has no voting partner (only possible for a zero-area box,
whose IoU with itself is 0), mmdetection divides 0 by 0 and returns a NaN box; we keep the NMS box.
The output is sorted by score (mmdetection groups by class); the set of detections is the same.

Box format everywhere: xyxy, float, no +1.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from paadet.boxes import bbox_overlaps, pairwise_iou_mmcv_nms
from paadet.detections import Detections, PostprocessConfig  # defined there (no torch), used and re-exported here
from paadet.model.anchors import AnchorGenerator
from paadet.model.box_coder import DeltaXYWHBoxCoder


class Candidates(NamedTuple):
    """Per-image candidate anchors after the per-level top-k, all levels concatenated.

    Attributes:
        boxes: ``[B, A, 4]`` decoded, clipped and rescaled boxes (original-image pixels).
        nms_scores: ``[B, A, C]`` ``sqrt(sigmoid(cls) * sigmoid(iou))``.
    """

    boxes: Tensor
    nms_scores: Tensor


def select_candidates(
    cls_logits: list[Tensor],
    box_deltas: list[Tensor],
    iou_logits: list[Tensor],
    anchors: list[Tensor],
    img_shapes: Tensor,
    scale_factors: Tensor,
    nms_pre: int = 1000,
    box_coder: DeltaXYWHBoxCoder | None = None,
) -> Candidates:
    """Per-level top-k, decoding with clamps and clipping, and rescaling to the original image.

    The top-k runs level by level; the decoding once for all levels. The logits may be float16 (they
    are converted to float32 first).

    Args:
        cls_logits: per level ``[B, C, H, W]``.
        box_deltas: per level ``[B, 4, H, W]``.
        iou_logits: per level ``[B, 1, H, W]``.
        anchors: per level ``[H * W, 4]`` xyxy.
        img_shapes: ``[B, 2]`` (height, width) of each resized, unpadded image; boxes are clipped to it.
        scale_factors: ``[B, 2]`` (w_scale, h_scale) = resized / original size.
        nms_pre: anchors kept per level.
        box_coder: decoder (default: PAA's delta-xywh with stds 0.1, 0.1, 0.2, 0.2).
    """
    coder = box_coder or DeltaXYWHBoxCoder()
    batch, num_classes = cls_logits[0].shape[:2]
    level_scores, level_deltas, level_anchors = [], [], []
    for cls, deltas, iou, anchors_l in zip(cls_logits, box_deltas, iou_logits, anchors, strict=False):
        # [B, HW, C] (classes innermost: the max over classes is a fast contiguous reduction)
        scores = cls.permute(0, 2, 3, 1).reshape(batch, -1, num_classes).float().sigmoid()
        deltas = deltas.permute(0, 2, 3, 1).reshape(batch, -1, 4).float()
        iou = iou.reshape(batch, -1, 1).float().sigmoid()
        nms_scores = (scores * iou).sqrt()
        anchors_l = anchors_l[None].expand(batch, -1, -1)
        if 0 < nms_pre < nms_scores.shape[1]:
            topk = nms_scores.max(dim=-1).values.topk(nms_pre, dim=1).indices
            nms_scores, deltas, anchors_l = (gather_rows(t, topk) for t in (nms_scores, deltas, anchors_l))
        level_scores.append(nms_scores)
        level_deltas.append(deltas)
        level_anchors.append(anchors_l)
    # decoding once for all levels
    all_anchors = torch.cat(level_anchors, dim=1)
    deltas = torch.cat(level_deltas, dim=1)
    nms_scores = torch.cat(level_scores, dim=1)
    boxes = coder.decode(all_anchors, deltas, max_shape=img_shapes.to(torch.float32)[:, None, :])
    scale = scale_factors.to(boxes.dtype).repeat(1, 2)[:, None, :]
    return Candidates(boxes / scale, nms_scores)


def greedy_nms_sorted(boxes: Tensor, valid: Tensor, iou_thr: float, sweeps_per_check: int = 1) -> Tensor:
    """Exact greedy NMS for many independent groups at once.

    Args:
        boxes: ``[G, K, 4]`` boxes of each group, sorted by descending score.
        valid: ``[G, K]`` which rows are real candidates (padding is False).
        iou_thr: a box is suppressed by a kept, higher-scored box with IoU strictly above this.
        sweeps_per_check: sweeps between two convergence tests (each test is a host-device
            synchronisation on a GPU; extra sweeps after convergence change nothing).

    Returns:
        ``[G, K]`` bool, the kept boxes.

    Greedy NMS is the unique solution of ``keep[j] = valid[j] and not any(keep[i] and S[i, j] for i < j)``.
    Jacobi iteration of that triangular system fixes at least one more position per sweep and stops
    at the exact greedy result; in practice it needs as many sweeps as the longest suppression chain.
    A state that repeats after ``n`` sweeps is that fixed point, since the iteration converges.
    """
    k = boxes.shape[1]
    suppress = pairwise_iou_mmcv_nms(boxes) > iou_thr
    upper = torch.ones(k, k, dtype=torch.bool, device=boxes.device).triu(1)
    dtype = boxes.dtype if boxes.is_floating_point() else torch.float32
    suppress = (suppress & upper & valid[:, :, None] & valid[:, None, :]).to(dtype)
    valid_f = valid.to(dtype)
    keep = valid_f  # 0/1 floats: the products and sums below are exact
    sweeps = 0
    while sweeps <= k:
        previous = keep
        for _ in range(max(1, sweeps_per_check)):
            keep = torch.where(torch.bmm(keep[:, None, :], suppress)[:, 0] == 0, valid_f, 0.0)
        sweeps += max(1, sweeps_per_check)
        if torch.equal(keep, previous):
            break
    return keep > 0


class ClassGroups(NamedTuple):
    """Each image's candidate list grouped by class, for work that only pairs candidates of one class.

    Attributes:
        order: ``[B, P]`` positions in the list, class by class, list order within a class (padding last).
        starts: ``[B, C]`` where each class begins in ``order``.
        counts: ``[B, C]`` candidates of each class.
        largest: the largest class of the batch (``counts.max()``).
    """

    order: Tensor
    starts: Tensor
    counts: Tensor
    largest: int


def group_by_class(labels: Tensor, valid: Tensor, num_classes: int) -> ClassGroups:
    """:class:`ClassGroups` of a ``[B, P]`` candidate list with ``labels`` and ``valid`` (padding False)."""
    batch, num = labels.shape
    label_or_pad = torch.where(valid, labels, num_classes)
    order = (label_or_pad * num + torch.arange(num, device=labels.device)).argsort(dim=1)
    counts = torch.zeros(batch, num_classes + 1, dtype=torch.long, device=labels.device)
    counts = counts.scatter_add_(1, label_or_pad, torch.ones_like(labels))[:, :num_classes]
    return ClassGroups(order, counts.cumsum(dim=1) - counts, counts, int(counts.max()) if counts.numel() else 0)


def class_members(groups: ClassGroups, labels: Tensor) -> tuple[Tensor, Tensor]:
    """For ``labels [B, M]``, the list positions of all candidates of each one's class.

    Returns ``members [B, M, K]`` (positions, ``K = groups.largest``) and ``valid [B, M, K]`` (False
    in padding slots, whose positions are arbitrary).
    """
    batch, m = labels.shape
    slots = torch.arange(groups.largest, device=labels.device)
    valid = slots < groups.counts.gather(1, labels)[..., None]
    slot = (groups.starts.gather(1, labels)[..., None] + slots).clamp(max=groups.order.shape[1] - 1)
    members = groups.order.gather(1, slot.reshape(batch, m * groups.largest)).reshape(batch, m, groups.largest)
    return members, valid


def gather_rows(values: Tensor, index: Tensor) -> Tensor:
    """``values [B, P, ...]`` at ``index [B, ...]`` along dim 1: ``[B, ..., ...]`` (the trailing dims of values
    kept)."""
    batch = index.shape[0]
    flat = index.reshape(batch, -1)
    if values.dim() == 2:
        return values.gather(1, flat).reshape(index.shape)
    tail = values.shape[2:]
    out = values.gather(1, flat.reshape(batch, -1, *([1] * len(tail))).expand(-1, -1, *tail))
    return out.reshape(*index.shape, *tail)


def suppressed_by(
    kept: Tensor,
    kept_labels: Tensor,
    kept_valid: Tensor,
    boxes: Tensor,
    groups: ClassGroups,
    iou_thr: float,
    chunk_elements: int = 1 << 26,
) -> Tensor:
    """Which candidates of the list ``boxes [B, P, 4]`` a valid ``kept [B, M, 4]`` box of the same class
    overlaps by IoU strictly above ``iou_thr`` (mmcv's NMS arithmetic, kept boxes in the kept role).

    Only same-class pairs are computed (``B x M x largest class``), in blocks of about
    ``chunk_elements``. Returns ``[B, P]`` bool.
    """
    batch, m = kept_valid.shape
    hits = torch.zeros(boxes.shape[:2], dtype=torch.int32, device=boxes.device)
    step = max(1, chunk_elements // max(batch * groups.largest, 1))
    for start in range(0, m, step):
        members, member_valid = class_members(groups, kept_labels[:, start : start + step])
        iou = pairwise_iou_mmcv_nms(kept[:, start : start + step, None, :], gather_rows(boxes, members))[:, :, 0, :]
        hit = (iou > iou_thr) & member_valid & kept_valid[:, start : start + step, None]
        hits.scatter_add_(1, members.reshape(batch, -1), hit.reshape(batch, -1).to(torch.int32))
    return hits > 0


def greedy_nms_first(
    boxes: Tensor,
    valid: Tensor,
    labels: Tensor,
    groups: ClassGroups,
    iou_thr: float,
    max_keep: int,
    tile: int = 256,
    sweeps_per_check: int = 4,
    chunk_elements: int = 1 << 26,
) -> Tensor:
    """Exact greedy NMS over each image's score-sorted candidates, up to the first ``max_keep`` kept.

    Args:
        boxes: ``[B, P, 4]`` candidates of each image sorted by descending score; boxes of different
            classes must not overlap (mmcv's class offsets see to that).
        valid: ``[B, P]`` real candidates (padding is False).
        labels: ``[B, P]`` their classes.
        groups: :func:`group_by_class` of the list.
        iou_thr: suppression threshold (strict).
        max_keep: how many kept boxes per image are wanted.
        tile: candidates decided per image per step.
        sweeps_per_check: see :func:`greedy_nms_sorted`.
        chunk_elements: memory bound for :func:`suppressed_by`.

    Returns:
        ``[B, P]`` bool: the greedy result for each image's first ``max_keep`` kept boxes; every later
        candidate is False.

    Each step takes the first ``tile`` candidates of each image that are still alive (not yet decided
    and not overlapped by a kept box), decides them by :func:`greedy_nms_sorted` among themselves (no
    earlier kept box suppresses them, and dead candidates suppress nothing), and lets the newly kept
    boxes remove the later candidates they suppress. Each step decides at least one candidate per
    unfinished image; usually one or two steps suffice, since a few kept boxes suppress most of the rest.
    """
    batch, num = valid.shape
    device = boxes.device
    tile = max(1, min(tile, num))
    earliness = torch.arange(num, 0, -1, device=device)  # larger = earlier in score order
    alive = valid.clone()
    keep = torch.zeros_like(valid)
    num_kept = torch.zeros(batch, dtype=torch.long, device=device)
    while True:
        alive &= (num_kept < max_keep)[:, None]
        if not bool(alive.any()):
            break
        order, idx = torch.where(alive, earliness, 0).topk(tile, dim=1)  # first `tile` alive, in score order
        t_valid = order > 0
        t_boxes = gather_rows(boxes, idx)
        t_keep = greedy_nms_sorted(t_boxes, t_valid, iou_thr, sweeps_per_check)
        keep |= torch.zeros_like(keep).scatter_(1, idx, t_keep)
        alive &= ~torch.zeros_like(alive).scatter_(1, idx, t_valid)
        new_per_image = t_keep.sum(dim=1)
        num_kept += new_per_image
        new = int(new_per_image.max())
        if new == 0:
            continue
        flag, k_idx = t_keep.to(torch.int32).topk(new, dim=1)  # compact the newly kept boxes
        k_pos = idx.gather(1, k_idx)
        alive &= ~suppressed_by(
            gather_rows(boxes, k_pos), labels.gather(1, k_pos), flag > 0, boxes, groups, iou_thr, chunk_elements
        )
    return keep & (keep.cumsum(dim=1) <= max_keep)


def multiclass_nms(candidates: Candidates, config: PostprocessConfig = PostprocessConfig()) -> Detections:
    """Class-aware NMS (mmcv's ``batched_nms`` semantics) and optional score voting for a batch.

    Every (anchor, class) pair with ``nms_score > score_thr`` is a candidate; NMS runs within each
    (image, class) group; the ``max_per_img`` best kept detections per image are returned sorted by
    score. With ``config.score_voting`` each kept box becomes the weighted mean of the candidates of
    its class that overlap it (PAA's score voting); scores are unchanged.

    As mmcv does, all classes of an image go through one NMS on boxes shifted by
    ``label * (max_coord + 1)``, so that boxes of different classes never overlap; the NMS stops
    once ``max_per_img`` boxes are kept (:func:`greedy_nms_first`).
    """
    boxes, nms_scores = candidates
    batch, num_anchors, num_classes = nms_scores.shape
    device = boxes.device
    max_det = config.max_per_img
    out_boxes = boxes.new_zeros(batch, max_det, 4)
    out_scores = nms_scores.new_zeros(batch, max_det)
    out_labels = torch.full((batch, max_det), -1, dtype=torch.long, device=device)

    valid = nms_scores > config.score_thr  # [B, A, C]
    counts = valid.sum(dim=(1, 2))  # [B]
    num = int(counts.max()) if num_anchors > 0 else 0
    if num == 0:
        return Detections(out_boxes, out_scores, out_labels, torch.zeros(batch, dtype=torch.long, device=device))

    # every image's candidates, (anchor, class) pairs sorted by score
    flat_scores = torch.where(valid, nms_scores, -1.0).reshape(batch, num_anchors * num_classes)
    cand_scores, cand_idx = flat_scores.topk(num, dim=1, sorted=True)  # [B, P]
    cand_valid = torch.arange(num, device=device)[None, :] < counts[:, None]
    cand_labels = cand_idx % num_classes
    cand_boxes = gather_rows(boxes, cand_idx // num_classes)  # [B, P, 4]

    # mmcv's class offsets: label * (max coordinate over this image's candidate boxes + 1)
    any_valid = valid.any(dim=-1)
    max_coord = torch.where(any_valid[..., None], boxes, float("-inf")).amax(dim=(1, 2))
    max_coord = torch.where(torch.isfinite(max_coord), max_coord, torch.zeros_like(max_coord))
    offsets = cand_labels.to(boxes.dtype) * (max_coord[:, None] + 1)
    groups = group_by_class(cand_labels, cand_valid, num_classes)
    keep = greedy_nms_first(
        cand_boxes + offsets[..., None],
        cand_valid,
        cand_labels,
        groups,
        config.iou_thr,
        max_det,
        config.nms_tile,
        config.nms_sweeps_per_check,
        config.nms_chunk_elements,
    )

    top = min(max_det, num)
    order, pos = torch.where(keep, torch.arange(num, 0, -1, device=device), 0).topk(top, dim=1)  # kept, in score order
    det_valid = order > 0
    det_scores = cand_scores.gather(1, pos)
    det_labels = cand_labels.gather(1, pos)
    det_boxes = gather_rows(cand_boxes, pos)
    if config.score_voting:
        det_boxes = score_voting(det_boxes, det_labels, cand_boxes, cand_scores, groups, config)

    out_boxes[:, :top] = torch.where(det_valid[..., None], det_boxes, 0.0)
    out_scores[:, :top] = torch.where(det_valid, det_scores, 0.0)
    out_labels[:, :top] = torch.where(det_valid, det_labels, torch.full_like(det_labels, -1))
    return Detections(out_boxes, out_scores, out_labels, det_valid.sum(dim=1))


def score_voting(
    det_boxes: Tensor,
    det_labels: Tensor,
    cand_boxes: Tensor,
    cand_scores: Tensor,
    groups: ClassGroups,
    config: PostprocessConfig,
) -> Tensor:
    """PAA score voting for every detection of a batch at once.

    Args:
        det_boxes: ``[B, D, 4]`` boxes kept by NMS.
        det_labels: ``[B, D]`` their classes (any class index in padding rows).
        cand_boxes: ``[B, P, 4]`` every image's candidate list ((anchor, class) pairs above ``score_thr``).
        cand_scores: ``[B, P]`` their NMS scores.
        groups: :func:`group_by_class` of the list.

    Returns:
        ``[B, D, 4]`` voted boxes: ``sum(w_k * box_k) / sum(w_k)`` over the candidates ``k`` of the
        detection's class with ``IoU(det, k) > voting_iou_thr``, ``w_k = exp(-(1 - IoU)^2 / sigma) * score_k``;
        a detection without any partner keeps its box. The work is ``B x D x (largest class)``.
    """
    members, member_valid = class_members(groups, det_labels)  # [B, D, K]
    boxes = gather_rows(cand_boxes, members)  # [B, D, K, 4]
    scores = gather_rows(cand_scores, members)
    ious = bbox_overlaps(det_boxes[:, :, None, :], boxes)[:, :, 0, :]  # [B, D, K]
    use = member_valid & (ious > config.voting_iou_thr)
    weights = torch.exp(-((1 - ious) ** 2) / config.voting_sigma) * scores
    weights = torch.where(use, weights, 0.0)
    total = weights.sum(dim=-1, keepdim=True)
    voted = (weights[..., None] * boxes).sum(dim=-2) / total.clamp(min=torch.finfo(total.dtype).tiny)
    return torch.where(total > 0, voted, det_boxes)


class PAAPostprocess(torch.nn.Module):
    """Raw head outputs -> :class:`Detections`, for a batch of images of one padded size.

    Anchors follow the feature sizes of each call and are cached per size and device.

    Args:
        config: thresholds and limits.
        strides: pyramid strides.
    """

    def __init__(
        self, config: PostprocessConfig = PostprocessConfig(), strides: tuple[int, ...] = (8, 16, 32, 64, 128)
    ) -> None:
        super().__init__()
        self.config = config
        self.anchor_generator = AnchorGenerator(strides)
        self.box_coder = DeltaXYWHBoxCoder()
        self._anchor_cache: dict[tuple, list[Tensor]] = {}

    def anchors(self, feat_sizes: list[tuple[int, int]], device: torch.device) -> list[Tensor]:
        key = (tuple(feat_sizes), str(device))
        if key not in self._anchor_cache:
            self._anchor_cache[key] = self.anchor_generator(feat_sizes, torch.float32, device)
        return self._anchor_cache[key]

    def forward(
        self,
        cls_logits: list[Tensor],
        box_deltas: list[Tensor],
        iou_logits: list[Tensor],
        img_shapes: Tensor,
        scale_factors: Tensor,
    ) -> Detections:
        """Args as :func:`select_candidates`; logits may be fp16 (post-processing runs in fp32)."""
        feat_sizes = [(int(c.shape[-2]), int(c.shape[-1])) for c in cls_logits]
        anchors = self.anchors(feat_sizes, cls_logits[0].device)
        candidates = select_candidates(
            cls_logits,
            box_deltas,
            iou_logits,
            anchors,
            img_shapes.to(cls_logits[0].device),
            scale_factors.to(cls_logits[0].device),
            self.config.nms_pre,
            self.box_coder,
        )
        return multiclass_nms(candidates, self.config)
