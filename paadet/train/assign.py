"""Anchor targets before PAA's reassignment: IoU, GIoU, valid flags and mmdetection's MaxIoUAssigner, batched.

Everything works on a whole batch at once: the ground truths of ``B`` images are padded to
``[B, M, 4]`` with a mask (:func:`pad_targets`; ``M`` may be 0, and an image may have no box), the
anchors of all levels are concatenated (``[A, 4]``, P3 first, row-major within a level, as
:class:`paadet.model.anchors.AnchorGenerator` makes them) and shared by the images, and each image
has its own valid flags (:func:`valid_flags`). No Python loop over boxes or anchors. The assigner's
IoUs are dense ``[B, M, A]`` (no host sync), or, given the anchors' grid, computed only for the (GT,
anchor) pairs that overlap (:mod:`paadet.train.sparse_iou`: one host sync, the same results bit for bit).

The arithmetic is mmdetection 3.3's operation by operation (``bbox_overlaps``: no +1, union and
enclosing area clamped below at ``eps``), so fp32 results agree bit for bit; that matters because the
assigner compares IoUs for equality.

Box format everywhere: xyxy, float, in network-input pixels, no +1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from paadet.boxes import bbox_overlaps
from paadet.errors import PaadetError
from paadet.train.sparse_iou import AnchorGrid, PairOverlaps, anchor_max, candidate_pairs, gt_max, last_matching_gt

DEFAULT_MAX_PAIR_DENSITY = 0.25  # see MaxIoUAssigner's max_pair_density


def valid_flags(
    feat_sizes: list[tuple[int, int]],
    strides: tuple[int, ...],
    pad_shapes: list[tuple[int, int]],
    device: torch.device | str | None = None,
) -> Tensor:
    """Which anchors of the batch-padded grid lie on each image's own padded area: ``[B, A]`` bool.

    mmdetection's ``AnchorGenerator.valid_flags``: at a level of stride ``s`` and size ``(H, W)``, the
    cells with ``x < min(ceil(pad_w / s), W)`` and ``y < min(ceil(pad_h / s), H)`` are valid, where
    ``(pad_h, pad_w)`` is that image's ``pad_shape`` (its size rounded up to 32, not the batch's).
    Levels are concatenated P3 first, cells row-major, as the anchors are. With ``allowed_border=-1``
    (PAA's setting) these flags are also the "inside" flags.

    Args:
        feat_sizes: ``(H, W)`` of each level (the batch-padded feature maps).
        strides: stride of each level.
        pad_shapes: ``(pad_h, pad_w)`` of each image.
    """
    if len(feat_sizes) != len(strides):
        raise PaadetError(f"got {len(feat_sizes)} feature sizes for {len(strides)} strides")
    pads = torch.tensor([[int(h), int(w)] for h, w in pad_shapes], dtype=torch.long).reshape(-1, 2)
    flags = []
    for (feat_h, feat_w), stride in zip(feat_sizes, strides, strict=False):
        valid_h = torch.clamp(-(-pads[:, 0] // stride), max=int(feat_h)).to(device)  # ceil(pad_h / s)
        valid_w = torch.clamp(-(-pads[:, 1] // stride), max=int(feat_w)).to(device)
        ys = torch.arange(int(feat_h), device=device)
        xs = torch.arange(int(feat_w), device=device)
        level = (ys[None, :, None] < valid_h[:, None, None]) & (xs[None, None, :] < valid_w[:, None, None])
        flags.append(level.reshape(len(pad_shapes), -1))
    return torch.cat(flags, dim=1)


@dataclass
class PaddedTargets:
    """The ground truths of a batch padded to the largest image's count.

    Attributes:
        boxes: ``[B, M, 4]`` xyxy (zeros in padding).
        labels: ``[B, M]`` int64 class indices (-1 in padding).
        mask: ``[B, M]`` bool, True for real boxes.
    """

    boxes: Tensor
    labels: Tensor
    mask: Tensor


def pad_targets(
    gt_boxes: list[Tensor], gt_labels: list[Tensor], device: torch.device | str | None = None
) -> PaddedTargets:
    """Stack per-image ``[M_i, 4]`` boxes and ``[M_i]`` labels into :class:`PaddedTargets`.

    ``M = max M_i`` (0 when no image has a box); boxes become float32, labels int64, on ``device``.
    """
    if len(gt_boxes) != len(gt_labels):
        raise PaadetError(f"got boxes for {len(gt_boxes)} images but labels for {len(gt_labels)}")
    counts = []
    for i, (boxes, labels) in enumerate(zip(gt_boxes, gt_labels, strict=False)):
        if boxes.dim() != 2 or boxes.shape[-1] != 4:
            raise PaadetError(f"image {i}: gt boxes must be [M, 4], got {list(boxes.shape)}")
        if labels.shape != boxes.shape[:1]:
            raise PaadetError(f"image {i}: {boxes.shape[0]} gt boxes but labels of shape {list(labels.shape)}")
        counts.append(int(boxes.shape[0]))
    batch, num = len(gt_boxes), max(counts, default=0)
    out_boxes = torch.zeros(batch, num, 4, dtype=torch.float32, device=device)
    out_labels = torch.full((batch, num), -1, dtype=torch.long, device=device)
    for i, (boxes, labels) in enumerate(zip(gt_boxes, gt_labels, strict=False)):
        out_boxes[i, : counts[i]] = boxes.to(device=device, dtype=torch.float32)
        out_labels[i, : counts[i]] = labels.to(device=device, dtype=torch.long)
    mask = torch.arange(num, device=device)[None, :] < torch.tensor(counts, device=device).reshape(batch, 1)
    return PaddedTargets(out_boxes, out_labels, mask)


@dataclass
class AssignResult:
    """Per-anchor assignment of a batch.

    Attributes:
        gt_inds: ``[B, A]`` int64: ``i + 1`` for an anchor assigned to (padded) GT ``i``, 0 for a
            negative, -1 for an ignored anchor (IoU between the thresholds) or an invalid one.
        max_overlaps: ``[B, A]`` the anchor's largest IoU over the image's GTs (-1 for an invalid
            anchor or an image without GT).
        labels: ``[B, A]`` int64 class of the assigned GT, -1 where ``gt_inds <= 0``.
    """

    gt_inds: Tensor
    max_overlaps: Tensor
    labels: Tensor


class MaxIoUAssigner:
    """mmdetection's ``MaxIoUAssigner.assign`` for a batch, run on each image's valid anchors only.

    For each valid anchor: -1 to start; 0 (negative) if its max IoU over the GTs is in
    ``[0, neg_iou_thr)``; GT ``argmax + 1`` if the max IoU is ``>= pos_iou_thr`` (ties: the first GT,
    as ``torch.max`` returns). Then, with ``match_low_quality``, for each GT ``i`` in index order whose
    best IoU over the valid anchors is ``>= min_pos_iou``: every anchor whose IoU with it equals that
    best IoU (``gt_max_assign_all``; else only its first best anchor) is assigned to ``i``, a later GT
    overwriting an earlier one. An image without GT makes every valid anchor negative. Invalid anchors
    get -1 (mmdetection never assigns them and gives them weight 0).

    PAA's settings are the defaults: thresholds 0.1/0.1, ``min_pos_iou`` 0, both flags on. With
    ``min_pos_iou = 0`` a GT that overlaps no valid anchor (best IoU 0) grabs every IoU-0 anchor, as in
    mmdetection.

    Args:
        pos_iou_thr: IoU at or above which an anchor is positive.
        neg_iou_thr: IoU below which an anchor is negative.
        min_pos_iou: a GT's best IoU needed for the low-quality match.
        gt_max_assign_all: the low-quality match takes every anchor tied at the GT's best IoU.
        match_low_quality: run the low-quality match.
        iou_eps: union clamp of the IoU.
        max_pair_density: with a grid, the sparse IoUs are used while the overlapping pairs are at most
            this fraction of the dense ``B * M * A`` (beyond, the dense tensor is as fast and smaller).
    """

    def __init__(
        self,
        pos_iou_thr: float = 0.1,
        neg_iou_thr: float = 0.1,
        min_pos_iou: float = 0.0,
        gt_max_assign_all: bool = True,
        match_low_quality: bool = True,
        iou_eps: float = 1e-6,
        max_pair_density: float = DEFAULT_MAX_PAIR_DENSITY,
    ) -> None:
        if neg_iou_thr > pos_iou_thr:
            raise PaadetError(f"neg_iou_thr {neg_iou_thr} above pos_iou_thr {pos_iou_thr}")
        if not max_pair_density >= 0:
            raise PaadetError(f"max_pair_density must be >= 0, got {max_pair_density}")
        self.pos_iou_thr = float(pos_iou_thr)
        self.neg_iou_thr = float(neg_iou_thr)
        self.min_pos_iou = float(min_pos_iou)
        self.gt_max_assign_all = bool(gt_max_assign_all)
        self.match_low_quality = bool(match_low_quality)
        self.iou_eps = float(iou_eps)
        self.max_pair_density = float(max_pair_density)

    def __call__(
        self,
        anchors: Tensor,
        targets: PaddedTargets,
        anchor_valid: Tensor | None = None,
        grid: AnchorGrid | None = None,
    ) -> AssignResult:
        """Assign the anchors ``[A, 4]`` (shared by the images) to ``targets``.

        Args:
            anchors: ``[A, 4]`` xyxy, all levels concatenated.
            targets: the batch's padded GTs (``[B, M, 4]``).
            anchor_valid: ``[B, A]`` bool from :func:`valid_flags` (default: all valid).
            grid: the anchors' :class:`~paadet.train.sparse_iou.AnchorGrid` (built from these very
                anchors): the IoUs are then computed only where a GT and an anchor overlap (one host
                sync), with the same results bit for bit; without it (or where
                :func:`~paadet.train.sparse_iou.candidate_pairs` declines) the dense ``[B, M, A]`` IoUs.
        """
        boxes, labels, gt_mask = targets.boxes, targets.labels, targets.mask
        batch, num_gts = gt_mask.shape
        num_anchors = anchors.shape[0]
        device = anchors.device
        if anchor_valid is None:
            anchor_valid = torch.ones(batch, num_anchors, dtype=torch.bool, device=device)
        if anchor_valid.shape != (batch, num_anchors):
            raise PaadetError(f"anchor_valid must be [{batch}, {num_anchors}], got {list(anchor_valid.shape)}")
        if num_gts == 0:
            unassigned = torch.full((batch, num_anchors), -1, dtype=torch.long, device=device)
            gt_inds = torch.where(anchor_valid, 0, unassigned)
            return AssignResult(gt_inds, torch.full((batch, num_anchors), -1.0, device=device), unassigned)

        pairs = None
        if grid is not None:
            pairs = candidate_pairs(grid, anchors, boxes, gt_mask, anchor_valid, self.iou_eps, self.max_pair_density)
        if pairs is None:
            max_overlaps, argmax_overlaps, last = self._reduce_dense(anchors, boxes, gt_mask, anchor_valid)
        else:
            max_overlaps, argmax_overlaps, last = self._reduce_sparse(pairs, gt_mask, anchor_valid)
        return self._finish(max_overlaps, argmax_overlaps, last, labels, gt_mask, anchor_valid)

    def _reduce_dense(
        self, anchors: Tensor, boxes: Tensor, gt_mask: Tensor, anchor_valid: Tensor
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """From the dense ``[B, M, A]`` IoUs: each anchor's max IoU and first GT reaching it (``[B, A]``),
        and the low-quality match (``[B, A]`` GT ``i + 1`` or 0; None without ``match_low_quality``)."""
        num_gts = gt_mask.shape[1]
        # [B, M, A]; padded GTs and invalid anchors at -1, below every real IoU
        overlaps = bbox_overlaps(boxes, anchors[None], self.iou_eps)
        real = gt_mask[:, :, None] & anchor_valid[:, None, :]
        overlaps = torch.where(real, overlaps, -1.0)
        max_overlaps, argmax_overlaps = overlaps.max(dim=1)  # first GT on ties
        if not self.match_low_quality:
            return max_overlaps, argmax_overlaps, None
        gt_max_overlaps, gt_argmax_overlaps = overlaps.max(dim=2)  # first anchor on ties
        gt_ok = gt_mask & (gt_max_overlaps >= self.min_pos_iou)  # [B, M]
        if not self.gt_max_assign_all:
            return max_overlaps, argmax_overlaps, _first_best_match(gt_ok, gt_argmax_overlaps, anchors.shape[0])
        order = torch.arange(1, num_gts + 1, device=anchors.device, dtype=torch.int32)  # i + 1
        # a GT left out gets an unreachable best IoU (2), so one comparison replaces "& gt_ok"; with
        # min_pos_iou >= 0 a match has IoU >= 0 and is real (padding and invalid anchors hold -1)
        best = torch.where(gt_ok, gt_max_overlaps, 2.0)[:, :, None]
        match = overlaps == best if self.min_pos_iou >= 0 else (overlaps == best) & real
        last = torch.where(match, order[None, :, None], 0).amax(dim=1)  # the last matching GT wins
        return max_overlaps, argmax_overlaps, last.to(torch.long)

    def _reduce_sparse(
        self, pairs: PairOverlaps, gt_mask: Tensor, anchor_valid: Tensor
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """:meth:`_reduce_dense` from the overlapping pairs only (the same values: see
        :mod:`paadet.train.sparse_iou`)."""
        first_gt = gt_mask.to(torch.uint8).argmax(dim=1)  # with max IoU 0 the first real GT is the argmax
        max_overlaps, argmax_overlaps = anchor_max(pairs, first_gt)
        if not self.match_low_quality:
            return max_overlaps, argmax_overlaps, None
        gt_max_overlaps, gt_argmax_overlaps = gt_max(pairs, anchor_valid)
        gt_ok = gt_mask & (gt_max_overlaps >= self.min_pos_iou)
        if not self.gt_max_assign_all:
            return max_overlaps, argmax_overlaps, _first_best_match(gt_ok, gt_argmax_overlaps, pairs.num_anchors)
        # a GT whose best IoU is positive matches the pairs at that IoU; one whose best is 0 has IoU 0
        # with every valid anchor and matches them all; the others (best 2) match nothing
        best = torch.where(gt_ok & (gt_max_overlaps > 0), gt_max_overlaps, 2.0)
        return max_overlaps, argmax_overlaps, last_matching_gt(pairs, best, gt_ok & (gt_max_overlaps == 0))

    def _finish(
        self,
        max_overlaps: Tensor,
        argmax_overlaps: Tensor,
        last: Tensor | None,
        labels: Tensor,
        gt_mask: Tensor,
        anchor_valid: Tensor,
    ) -> AssignResult:
        """Thresholds, the low-quality overwrite ``last`` (``[B, A]`` ``i + 1`` or 0), invalid anchors and
        images without GT: the :class:`AssignResult`."""
        unassigned = torch.full(anchor_valid.shape, -1, dtype=torch.long, device=anchor_valid.device)
        gt_inds = unassigned
        gt_inds = torch.where((max_overlaps >= 0) & (max_overlaps < self.neg_iou_thr), 0, gt_inds)
        gt_inds = torch.where(max_overlaps >= self.pos_iou_thr, argmax_overlaps + 1, gt_inds)
        if last is not None:
            gt_inds = torch.where(last > 0, last, gt_inds)
        gt_inds = torch.where(anchor_valid, gt_inds, unassigned)
        no_gt = ~gt_mask.any(dim=1, keepdim=True)  # images without GT: all valid anchors negative
        gt_inds = torch.where(no_gt & anchor_valid, 0, gt_inds)
        max_overlaps = torch.where(anchor_valid & ~no_gt, max_overlaps, -1.0)
        assigned_labels = labels.gather(1, (gt_inds - 1).clamp(min=0))
        assigned_labels = torch.where(gt_inds > 0, assigned_labels, -1)
        return AssignResult(gt_inds, max_overlaps, assigned_labels)


def _first_best_match(gt_ok: Tensor, gt_argmax: Tensor, num_anchors: int) -> Tensor:
    """The low-quality match without ``gt_max_assign_all``: ``[B, A]`` int64, ``i + 1`` of the last GT ``i``
    (of those with ``gt_ok [B, M]``) whose first best anchor (``gt_argmax [B, M]``) is this one, else 0."""
    batch, num_gts = gt_ok.shape
    order = torch.arange(1, num_gts + 1, device=gt_ok.device)
    last = torch.zeros(batch, num_anchors, dtype=torch.long, device=gt_ok.device)
    return last.scatter_reduce(1, gt_argmax, torch.where(gt_ok, order[None, :], 0), reduce="amax")
