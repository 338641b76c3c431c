"""PAA post-processing as batched tensor code: per-level top-k, decoding, multi-class NMS, score voting.

Everything runs on whole batches with tensor operations (no Python loop over candidates,
detections or classes), on CPU or CUDA, without torchvision. The arithmetic mirrors mmdetection
3.3 / mmcv 2.1 operation by operation so that fp32 results agree to rounding:

* NMS IoU is computed as mmcv's CPU kernel does, on boxes shifted by ``label * (max_coord + 1)``
  (mmcv's class-offset trick; it changes float rounding near the threshold, so we keep it).
* Score-voting IoU is mmdetection's ``bbox_overlaps`` (eps 1e-6, no +1).

Deliberate difference: where a detection has no voting partner (only possible for a zero-area box,
whose IoU with itself is 0), mmdetection divides 0 by 0 and returns a NaN box; we keep the NMS box.
The output is sorted by score (mmdetection groups by class); the set of detections is the same.

Box format everywhere: xyxy, float, no +1.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from .model.anchors import AnchorGenerator
from .model.box_coder import DeltaXYWHBoxCoder


@dataclass(frozen=True)
class PostprocessConfig:
    """Test-time settings of the reference config (``paa_r50_fpn_1x_coco.py``'s ``test_cfg``).

    Attributes:
        nms_pre: anchors kept per level (by ``max_c sqrt(score_c * iou)``) before NMS.
        score_thr: candidates need ``sqrt(score * iou) > score_thr`` (strict).
        iou_thr: NMS suppresses same-class boxes with IoU strictly above this.
        max_per_img: detections kept per image after NMS.
        score_voting: refine each kept box by PAA's score voting.
        voting_iou_thr: voting uses candidates with IoU strictly above this.
        voting_sigma: the Gaussian's ``sigma`` in ``exp(-(1 - iou)^2 / sigma)``.
        nms_chunk_elements: upper bound on the elements of one pairwise-IoU block (memory).
        nms_prefix: NMS first runs on this many best candidates per (image, class) group and widens
            the prefix only when the result could depend on the rest (speed only; results are exact).
    """

    nms_pre: int = 1000
    score_thr: float = 0.05
    iou_thr: float = 0.6
    max_per_img: int = 100
    score_voting: bool = True
    voting_iou_thr: float = 0.01
    voting_sigma: float = 0.025
    nms_chunk_elements: int = 1 << 26
    nms_prefix: int = 256


class Detections(NamedTuple):
    """Fixed-shape detections of a batch, sorted by score within each image.

    Attributes:
        boxes: ``[B, max_det, 4]`` xyxy in original-image pixels (zeros beyond ``num_dets``).
        scores: ``[B, max_det]`` (zeros beyond ``num_dets``).
        labels: ``[B, max_det]`` int64 class indices 0..79 (-1 beyond ``num_dets``).
        num_dets: ``[B]`` int64 number of valid rows per image.
    """

    boxes: Tensor
    scores: Tensor
    labels: Tensor
    num_dets: Tensor


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
    all_boxes, all_scores = [], []
    max_shape = img_shapes.to(torch.float32)[:, None, :]
    for cls, deltas, iou, level_anchors in zip(cls_logits, box_deltas, iou_logits, anchors):
        batch, num_classes = cls.shape[:2]
        scores = cls.permute(0, 2, 3, 1).reshape(batch, -1, num_classes).sigmoid()
        deltas = deltas.permute(0, 2, 3, 1).reshape(batch, -1, 4)
        iou = iou.permute(0, 2, 3, 1).reshape(batch, -1).sigmoid()
        level_anchors = level_anchors[None].expand(batch, -1, -1)
        if 0 < nms_pre < scores.shape[1]:
            max_scores = (scores * iou[..., None]).sqrt().max(dim=-1).values
            topk = max_scores.topk(nms_pre, dim=1).indices
            scores = scores.gather(1, topk[..., None].expand(-1, -1, num_classes))
            deltas = deltas.gather(1, topk[..., None].expand(-1, -1, 4))
            level_anchors = level_anchors.gather(1, topk[..., None].expand(-1, -1, 4))
            iou = iou.gather(1, topk)
        boxes = coder.decode(level_anchors, deltas, max_shape=max_shape)
        all_boxes.append(boxes)
        all_scores.append((scores * iou[..., None]).sqrt())
    boxes = torch.cat(all_boxes, dim=1)
    scale = scale_factors.to(boxes.dtype).repeat(1, 2)[:, None, :]
    return Candidates(boxes / scale, torch.cat(all_scores, dim=1))


def pairwise_iou_mmcv_nms(boxes: Tensor) -> Tensor:
    """IoU between all pairs of ``[..., K, 4]`` boxes, as mmcv's CPU NMS kernel computes it.

    Returns ``[..., K, K]``.
    """
    x1, y1, x2, y2 = boxes.unbind(-1)
    areas = (x2 - x1) * (y2 - y1)
    w = (torch.minimum(x2[..., :, None], x2[..., None, :]) - torch.maximum(x1[..., :, None], x1[..., None, :])).clamp(min=0)
    h = (torch.minimum(y2[..., :, None], y2[..., None, :]) - torch.maximum(y1[..., :, None], y1[..., None, :])).clamp(min=0)
    inter = w * h
    return inter / (areas[..., :, None] + areas[..., None, :] - inter)


def bbox_overlaps(boxes1: Tensor, boxes2: Tensor, eps: float = 1e-6) -> Tensor:
    """IoU of ``[..., M, 4]`` against ``[..., N, 4]`` boxes, as mmdetection's ``bbox_overlaps`` (mode iou).

    Returns ``[..., M, N]``; the union is clamped below at ``eps``.
    """
    area1 = (boxes1[..., 2] - boxes1[..., 0]) * (boxes1[..., 3] - boxes1[..., 1])
    area2 = (boxes2[..., 2] - boxes2[..., 0]) * (boxes2[..., 3] - boxes2[..., 1])
    lt = torch.maximum(boxes1[..., :, None, :2], boxes2[..., None, :, :2])
    rb = torch.minimum(boxes1[..., :, None, 2:], boxes2[..., None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    overlap = wh[..., 0] * wh[..., 1]
    union = area1[..., None] + area2[..., None, :] - overlap
    union = torch.maximum(union, union.new_tensor(eps))
    return overlap / union


def greedy_nms_sorted(boxes: Tensor, valid: Tensor, iou_thr: float) -> Tensor:
    """Exact greedy NMS for many independent groups at once.

    Args:
        boxes: ``[G, K, 4]`` boxes of each group, sorted by descending score.
        valid: ``[G, K]`` which rows are real candidates (padding is False).
        iou_thr: a box is suppressed by a kept, higher-scored box with IoU strictly above this.

    Returns:
        ``[G, K]`` bool, the kept boxes.

    Greedy NMS is the unique solution of ``keep[j] = valid[j] and not any(keep[i] and S[i, j] for i < j)``.
    Jacobi iteration of that triangular system fixes at least one more position per sweep and stops
    at the exact greedy result; in practice it needs as many sweeps as the longest suppression chain.
    """
    k = boxes.shape[1]
    suppress = pairwise_iou_mmcv_nms(boxes) > iou_thr
    upper = torch.ones(k, k, dtype=torch.bool, device=boxes.device).triu(1)
    suppress = (suppress & upper & valid[:, :, None] & valid[:, None, :]).to(boxes.dtype if boxes.is_floating_point() else torch.float32)
    keep = valid
    for _ in range(k + 1):
        suppressed = torch.bmm(keep[:, None, :].to(suppress.dtype), suppress)[:, 0] > 0
        new_keep = valid & ~suppressed
        if torch.equal(new_keep, keep):
            break
        keep = new_keep
    return keep


def _chunks(total: int, per_item: int, budget: int) -> list[tuple[int, int]]:
    step = max(1, budget // max(per_item, 1))
    return [(s, min(s + step, total)) for s in range(0, total, step)]


def _grouped_nms(boxes: Tensor, valid: Tensor, counts: Tensor, config: PostprocessConfig) -> Tensor:
    """:func:`greedy_nms_sorted` over groups of very different sizes: ``[G, K, 4]`` -> ``[G, K]`` keep.

    Groups are padded to the next power of two of their own size, not to the largest group's, so one
    crowded class does not make every other class pay for its K x K matrix.
    """
    k = boxes.shape[1]
    keep = torch.zeros_like(valid)
    bucket = torch.clamp(counts, min=8)
    bucket = torch.pow(2, torch.ceil(torch.log2(bucket.to(torch.float32)))).to(torch.long).clamp(max=k)
    for size in torch.unique(bucket).tolist():
        members = (bucket == size).nonzero().squeeze(1)
        for start, end in _chunks(len(members), size * size, config.nms_chunk_elements):
            idx = members[start:end]
            keep[idx, :size] = greedy_nms_sorted(boxes[idx, :size], valid[idx, :size], config.iou_thr)
    return keep


def multiclass_nms(
    candidates: Candidates, config: PostprocessConfig = PostprocessConfig()
) -> Detections:
    """Class-aware NMS (mmcv's ``batched_nms`` semantics) and optional score voting for a batch.

    Every (anchor, class) pair with ``nms_score > score_thr`` is a candidate; NMS runs within each
    (image, class) group; the ``max_per_img`` best kept detections per image are returned sorted by
    score. With ``config.score_voting`` each kept box becomes the weighted mean of the candidates of
    its class that overlap it (PAA's score voting); scores are unchanged.
    """
    boxes, nms_scores = candidates
    batch, num_anchors, num_classes = nms_scores.shape
    device = boxes.device
    max_det = config.max_per_img
    out_boxes = boxes.new_zeros(batch, max_det, 4)
    out_scores = nms_scores.new_zeros(batch, max_det)
    out_labels = torch.full((batch, max_det), -1, dtype=torch.long, device=device)
    num_dets = torch.zeros(batch, dtype=torch.long, device=device)

    valid = nms_scores > config.score_thr  # [B, A, C]
    counts = valid.sum(dim=1).reshape(-1)  # [B * C]
    if num_anchors == 0 or not bool(counts.any()):
        return Detections(out_boxes, out_scores, out_labels, num_dets)
    k = int(counts.max())

    # mmcv's class offsets: label * (max coordinate over this image's candidate boxes + 1)
    any_valid = valid.any(dim=-1)
    max_coord = torch.where(any_valid[..., None], boxes, boxes.new_tensor(float("-inf"))).amax(dim=(1, 2))
    max_coord = torch.where(torch.isfinite(max_coord), max_coord, torch.zeros_like(max_coord))

    group_scores = torch.where(valid, nms_scores, nms_scores.new_tensor(-1.0)).permute(0, 2, 1).reshape(batch * num_classes, num_anchors)
    sorted_scores, order = group_scores.topk(k, dim=1, sorted=True)  # [B*C, K]
    slot_valid = torch.arange(k, device=device)[None, :] < counts[:, None]

    groups = counts.nonzero().squeeze(1)  # non-empty (image, class) groups
    g_img = groups // num_classes
    g_cls = groups % num_classes
    g_order = order[groups]
    g_valid = slot_valid[groups]
    g_boxes = boxes[g_img[:, None], g_order]  # [G, K, 4]
    offsets = g_cls.to(boxes.dtype) * (max_coord[g_img] + 1)
    g_boxes_offset = g_boxes + offsets[:, None, None]

    # Greedy NMS decides a candidate from higher-scored ones only, so the first `limit` candidates of
    # every group are decided exactly by NMS over those alone. Start with a prefix and double it
    # until no undecided candidate could still enter an image's top `max_per_img`.
    g_counts = counts[groups]
    limit = min(k, max(1, config.nms_prefix))
    while True:
        keep_groups = torch.zeros_like(g_valid)
        keep_groups[:, :limit] = _grouped_nms(g_boxes_offset[:, :limit], g_valid[:, :limit], g_counts.clamp(max=limit), config)
        keep = torch.zeros_like(slot_valid)
        keep[groups] = keep_groups
        kept_scores = torch.where(keep, sorted_scores, sorted_scores.new_tensor(-1.0)).reshape(batch, num_classes * k)
        if limit >= k:
            break
        last_kept = kept_scores.topk(min(max_det, num_classes * k), dim=1, sorted=True).values[:, -1]  # -1: too few
        undecided = torch.where(g_counts > limit, sorted_scores[groups, limit], sorted_scores.new_tensor(-1.0))
        best_undecided = torch.full((batch,), -1.0, dtype=undecided.dtype, device=device)
        best_undecided = best_undecided.scatter_reduce(0, g_img, undecided, reduce="amax")
        if bool((best_undecided < last_kept).all()):
            break
        limit = min(k, 2 * limit)

    top = min(max_det, num_classes * k)
    top_scores, top_idx = kept_scores.topk(top, dim=1, sorted=True)
    det_valid = top_scores > -1
    det_cls = top_idx // k
    det_slot = top_idx % k
    det_group = torch.arange(batch, device=device)[:, None] * num_classes + det_cls  # [B, D]
    det_anchor = order[det_group, det_slot]
    det_boxes = boxes[torch.arange(batch, device=device)[:, None], det_anchor]  # [B, D, 4]

    if config.score_voting:
        det_boxes = score_voting(det_boxes, det_group, boxes, order, sorted_scores, slot_valid, config)

    zero = det_boxes.new_tensor(0.0)
    out_boxes[:, :top] = torch.where(det_valid[..., None], det_boxes, zero)
    out_scores[:, :top] = torch.where(det_valid, top_scores, zero)
    out_labels[:, :top] = torch.where(det_valid, det_cls, torch.full_like(det_cls, -1))
    num_dets = det_valid.sum(dim=1)
    return Detections(out_boxes, out_scores, out_labels, num_dets)


def score_voting(
    det_boxes: Tensor,
    det_group: Tensor,
    boxes: Tensor,
    order: Tensor,
    sorted_scores: Tensor,
    slot_valid: Tensor,
    config: PostprocessConfig,
) -> Tensor:
    """PAA score voting for every detection of a batch at once.

    Args:
        det_boxes: ``[B, D, 4]`` boxes kept by NMS.
        det_group: ``[B, D]`` the (image * C + class) group of each detection.
        boxes: ``[B, A, 4]`` all candidate boxes of the batch.
        order: ``[B*C, K]`` anchor index of each group's candidates.
        sorted_scores: ``[B*C, K]`` their NMS scores.
        slot_valid: ``[B*C, K]`` which slots are real candidates.

    Returns:
        ``[B, D, 4]`` voted boxes: ``sum(w_k * box_k) / sum(w_k)`` over the class's candidates ``k``
        with ``IoU(det, k) > voting_iou_thr``, ``w_k = exp(-(1 - IoU)^2 / sigma) * score_k``.
    """
    batch = det_boxes.shape[0]
    cand_anchor = order[det_group]  # [B, D, K]
    cand_boxes = boxes[torch.arange(batch, device=boxes.device)[:, None, None], cand_anchor]  # [B, D, K, 4]
    cand_scores = sorted_scores[det_group]
    cand_valid = slot_valid[det_group]
    ious = bbox_overlaps(det_boxes[:, :, None, :], cand_boxes)[:, :, 0, :]  # [B, D, K]
    use = cand_valid & (ious > config.voting_iou_thr)
    weights = torch.exp(-((1 - ious) ** 2) / config.voting_sigma) * cand_scores
    weights = torch.where(use, weights, weights.new_tensor(0.0))
    total = weights.sum(dim=-1, keepdim=True)
    voted = (weights[..., None] * cand_boxes).sum(dim=-2) / total.clamp(min=torch.finfo(total.dtype).tiny)
    return torch.where(total > 0, voted, det_boxes)


class PAAPostprocess(torch.nn.Module):
    """Raw head outputs -> :class:`Detections`, for a batch of images of one padded size.

    Anchors follow the feature sizes of each call and are cached per size and device.

    Args:
        config: thresholds and limits.
        strides: pyramid strides.
    """

    def __init__(self, config: PostprocessConfig = PostprocessConfig(), strides: tuple[int, ...] = (8, 16, 32, 64, 128)) -> None:
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
        cls_logits = [c.float() for c in cls_logits]
        box_deltas = [b.float() for b in box_deltas]
        iou_logits = [i.float() for i in iou_logits]
        feat_sizes = [(int(c.shape[-2]), int(c.shape[-1])) for c in cls_logits]
        anchors = self.anchors(feat_sizes, cls_logits[0].device)
        candidates = select_candidates(
            cls_logits, box_deltas, iou_logits, anchors, img_shapes.to(cls_logits[0].device),
            scale_factors.to(cls_logits[0].device), self.config.nms_pre, self.box_coder,
        )
        return multiclass_nms(candidates, self.config)
