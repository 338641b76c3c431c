"""PAA's training losses (mmdetection 3.3 ``PAAHead.loss_by_feat``) for a padded batch, as tensor code.

:class:`PAALoss` turns the head's raw outputs and the batch's ground truths into the three losses:

1. anchors of the batch-padded feature maps, valid flags from each image's own ``pad_shape``;
2. :class:`~paadet.train.assign.MaxIoUAssigner` (IoU 0.1/0.1, low-quality match) on the valid anchors;
3. PAA's score of every pre-assigned positive and the GMM reassignment
   (:mod:`paadet.train.reassign`), for all GTs of the batch at once;
4. ``loss_cls``: sigmoid focal loss over every anchor and class (reassigned labels, weight 0 on
   invalid anchors), divided by ``max(num_pos, num_imgs) + eps32``;
   ``loss_bbox``: ``1.3 * sum clamp(IoU, 1e-12) * (1 - GIoU) / (sum IoU + eps32)`` over the final
   positives, IoU = aligned IoU of the detached decoded box with its GT;
   ``loss_iou``: ``0.5 * sum BCE-with-logits(iou_logit, IoU) / (num_pos + eps32)``.
   Without any positive ``loss_bbox`` and ``loss_iou`` are ``0 * sum(outputs)`` (the graph is kept).

``num_pos`` and every normaliser are over the images of this call (mmdetection normalises per GPU,
with no all-reduce). The focal loss is mmdetection's CPU formula on every device (see
:func:`paadet.train.reassign.sigmoid_focal_loss`), summed in few passes by
:func:`paadet.train.focal.focal_loss_sum` (equal to float32 rounding).

:meth:`PAALoss.targets` returns the intermediate targets (pre-assignment, PAA scores, reassigned
labels) for inspection; the losses use exactly those.

Deliberate difference: where scikit-learn would reject a GT's GMM ("ill-defined empirical
covariance", which crashes mmdetection's training step, mmdetection#4152) the GMM's centred-variance
result is used and the GT is counted in :attr:`LossOutput.num_ill_defined`.

Host synchronisations per call: three (the sparse assigner's count of (GT, anchor) pairs; the pre-assigned
and the final positives gathered with ``nonzero``) plus the GMM's (bounded independently of the number of boxes),
whatever the number of
images, boxes or anchors.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from paadet.boxes import aligned_giou, aligned_iou
from paadet.errors import PaadetError
from paadet.model.anchors import AnchorGenerator
from paadet.model.box_coder import DeltaXYWHBoxCoder
from paadet.train.assign import MaxIoUAssigner, pad_targets, valid_flags
from paadet.train.focal import focal_loss_sum
from paadet.train.reassign import paa_anchor_scores, paa_reassign
from paadet.train.sparse_iou import AnchorGrid

EPS32 = float(torch.finfo(torch.float32).eps)  # mmdetection's avg_factor epsilon
IOU_WEIGHT_EPS = 1e-12  # PAAHead's EPS: clamp of the IoU used as GIoU weight


@dataclass(frozen=True)
class PAALossConfig:
    """mmdetection's ``paa_r50_fpn_1x_coco`` settings of the head's losses and targets.

    Attributes:
        strides: pyramid strides (P3..P7).
        octave_base_scale: anchor side in strides.
        target_means, target_stds: the delta-xywh coder's normalisation.
        pos_iou_thr, neg_iou_thr, min_pos_iou, gt_max_assign_all, match_low_quality: MaxIoUAssigner.
        topk: PAA candidates per GT and level.
        focal_alpha, focal_gamma: the focal loss.
        loss_cls_weight, loss_bbox_weight, loss_iou_weight: loss weights (also in PAA's anchor score:
            ``loss_cls_weight * focal + loss_bbox_weight * (1 - GIoU)``).
        giou_eps, iou_eps: clamps of union / enclosing area in GIoU and in the IoU target.
        gmm_reg_covar, gmm_tol, gmm_max_iter: scikit-learn's GaussianMixture defaults.
    """

    strides: tuple[int, ...] = (8, 16, 32, 64, 128)
    octave_base_scale: float = 8.0
    target_means: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)
    target_stds: tuple[float, float, float, float] = (0.1, 0.1, 0.2, 0.2)
    pos_iou_thr: float = 0.1
    neg_iou_thr: float = 0.1
    min_pos_iou: float = 0.0
    gt_max_assign_all: bool = True
    match_low_quality: bool = True
    topk: int = 9
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    loss_cls_weight: float = 1.0
    loss_bbox_weight: float = 1.3
    loss_iou_weight: float = 0.5
    giou_eps: float = 1e-6
    iou_eps: float = 1e-6
    gmm_reg_covar: float = 1e-6
    gmm_tol: float = 1e-3
    gmm_max_iter: int = 100

    def __post_init__(self) -> None:
        if self.topk < 1:
            raise PaadetError(f"topk must be >= 1, got {self.topk}")
        if not self.strides:
            raise PaadetError("strides must not be empty")
        if self.gmm_max_iter < 1:
            raise PaadetError(f"gmm_max_iter must be >= 1, got {self.gmm_max_iter}")


@dataclass
class LossOutput:
    """The losses of one batch.

    Attributes:
        loss_cls, loss_bbox, loss_iou: 0-dim tensors (with grad to the head outputs).
        loss: their sum (mmengine's ``parse_losses``).
        num_pos: ``[B]`` int64 positives of each image after the reassignment.
        num_ill_defined: ``[B]`` int64 GTs of each image whose GMM scikit-learn would have rejected
            ("ill-defined empirical covariance": mmdetection's step would crash; we go on).
    """

    loss_cls: Tensor
    loss_bbox: Tensor
    loss_iou: Tensor
    loss: Tensor
    num_pos: Tensor
    num_ill_defined: Tensor


@dataclass
class PAATargets:
    """The targets of a batch after PAA's reassignment (flat indices run over ``B * A``: image-major, then
    each image's anchors in level order).

    Attributes:
        labels: ``[B * A]`` int64 reassigned class of every anchor (``C`` = background).
        label_weights: ``[B * A]`` float, 1 on every valid anchor (demoted candidates are negatives),
            0 on anchors outside the image's pad_shape.
        pos_index: ``[Q]`` int64 flat indices of the final positives, ascending.
        pos_anchors: ``[Q, 4]`` their anchors; pos_boxes: ``[Q, 4]`` their GT boxes.
        num_pos: ``[B]`` int64 final positives per image.
        num_ill_defined: ``[B]`` int64 GTs whose GMM scikit-learn would have rejected.
        pre_gt_inds: ``[B, A]`` the MaxIoUAssigner result (``i + 1``, 0 negative, -1 invalid).
        pre_pos_index: ``[P]`` int64 flat indices of the pre-assigned positives, ascending.
        pre_pos_scores: ``[P]`` their PAA scores (focal sum + 1.3 (1 - GIoU)).
    """

    labels: Tensor
    label_weights: Tensor
    pos_index: Tensor
    pos_anchors: Tensor
    pos_boxes: Tensor
    num_pos: Tensor
    num_ill_defined: Tensor
    pre_gt_inds: Tensor
    pre_pos_index: Tensor
    pre_pos_scores: Tensor


def flatten_levels(outputs: list[Tensor]) -> Tensor:
    """Per-level ``[B, K, H, W]`` maps -> ``[B, sum(H * W), K]``, levels concatenated, cells row-major."""
    batch, channels = outputs[0].shape[:2]
    return torch.cat([t.permute(0, 2, 3, 1).reshape(batch, -1, channels) for t in outputs], dim=1)


class PAALoss:
    """PAA's losses for a padded batch, mmdetection 3.3's numbers (see the module docstring).

    Args:
        config: the settings (default: mmdetection's ``paa_r50_fpn_1x_coco``).
        **overrides: single settings of :class:`PAALossConfig` to change, e.g. ``PAALoss(topk=5)``.
    """

    def __init__(self, config: PAALossConfig | None = None, **overrides: object) -> None:
        base = config or PAALossConfig()
        try:
            self.config = replace(base, **overrides)
        except TypeError as error:
            raise PaadetError(f"PAALoss: unknown setting ({error})") from None
        cfg = self.config
        self.anchor_generator = AnchorGenerator(cfg.strides, cfg.octave_base_scale)
        self.box_coder = DeltaXYWHBoxCoder(cfg.target_means, cfg.target_stds)
        self.assigner = MaxIoUAssigner(
            cfg.pos_iou_thr, cfg.neg_iou_thr, cfg.min_pos_iou, cfg.gt_max_assign_all, cfg.match_low_quality, cfg.iou_eps
        )
        self._anchor_cache: dict[tuple, tuple[Tensor, Tensor, AnchorGrid]] = {}

    def settings(self) -> dict:
        """The settings as plain values (for a checkpoint's metadata)."""
        return asdict(self.config)

    def anchors(self, feat_sizes: list[tuple[int, int]], device: torch.device) -> tuple[Tensor, Tensor]:
        """All levels' anchors ``[A, 4]`` and each anchor's level ``[A]`` int64, cached per size and device."""
        return self._anchors_and_grid(feat_sizes, device)[:2]

    def _anchors_and_grid(
        self, feat_sizes: list[tuple[int, int]], device: torch.device
    ) -> tuple[Tensor, Tensor, AnchorGrid]:
        """:meth:`anchors` and their :class:`AnchorGrid` (for the assigner's sparse IoUs), cached together."""
        key = (tuple(feat_sizes), str(device))
        if key not in self._anchor_cache:
            levels = self.anchor_generator(feat_sizes, torch.float32, device)
            level_ids = torch.cat(
                [torch.full((a.shape[0],), i, dtype=torch.long, device=device) for i, a in enumerate(levels)]
            )
            anchors = torch.cat(levels)
            self._anchor_cache[key] = (anchors, level_ids, AnchorGrid.from_anchors(anchors, feat_sizes))
        return self._anchor_cache[key]

    def _check(
        self,
        cls_logits: list[Tensor],
        box_deltas: list[Tensor],
        iou_logits: list[Tensor],
        gt_boxes: list[Tensor],
        gt_labels: list[Tensor],
        pad_shapes: list[tuple[int, int]],
    ) -> None:
        num_levels = len(self.config.strides)
        if not (len(cls_logits) == len(box_deltas) == len(iou_logits) == num_levels):
            raise PaadetError(
                f"expected {num_levels} levels of outputs, got {len(cls_logits)}, {len(box_deltas)}, {len(iou_logits)}"
            )
        batch = cls_logits[0].shape[0]
        for level, (c, b, i) in enumerate(zip(cls_logits, box_deltas, iou_logits, strict=False)):
            if (
                c.dim() != 4
                or c.shape[0] != batch
                or b.shape != (batch, 4, *c.shape[2:])
                or i.shape != (batch, 1, *c.shape[2:])
            ):
                raise PaadetError(
                    f"level {level}: outputs of shapes {list(c.shape)}, {list(b.shape)}, "
                    f"{list(i.shape)} are not [B, C, H, W], [B, 4, H, W], [B, 1, H, W]"
                )
        if not (len(gt_boxes) == len(gt_labels) == len(pad_shapes) == batch):
            raise PaadetError(
                f"batch of {batch} images but {len(gt_boxes)} box sets, {len(gt_labels)} label sets "
                f"and {len(pad_shapes)} pad shapes"
            )

    @torch.no_grad()
    def targets(
        self,
        cls_logits: list[Tensor],
        box_deltas: list[Tensor],
        iou_logits: list[Tensor],
        gt_boxes: list[Tensor],
        gt_labels: list[Tensor],
        pad_shapes: list[tuple[int, int]],
    ) -> PAATargets:
        """The reassigned targets of a padded batch (arguments as :meth:`__call__`; nothing here has grad)."""
        self._check(cls_logits, box_deltas, iou_logits, gt_boxes, gt_labels, pad_shapes)
        feat_sizes = [(int(c.shape[-2]), int(c.shape[-1])) for c in cls_logits]
        return self._targets(
            flatten_levels(cls_logits).float(),
            flatten_levels(box_deltas).float(),
            feat_sizes,
            gt_boxes,
            gt_labels,
            pad_shapes,
        )

    @torch.no_grad()
    def _targets(
        self,
        cls_flat: Tensor,
        deltas_flat: Tensor,
        feat_sizes: list[tuple[int, int]],
        gt_boxes: list[Tensor],
        gt_labels: list[Tensor],
        pad_shapes: list[tuple[int, int]],
    ) -> PAATargets:
        """:meth:`targets` from the flattened outputs ``[B, A, C]`` and ``[B, A, 4]``."""
        cfg = self.config
        device = cls_flat.device
        batch, _, num_classes = cls_flat.shape
        anchors, anchor_levels, grid = self._anchors_and_grid(feat_sizes, device)
        num_anchors = anchors.shape[0]

        gts = pad_targets(gt_boxes, gt_labels, device)
        num_gts = gts.mask.shape[1]
        valid = valid_flags(feat_sizes, cfg.strides, pad_shapes, device)
        assigned = self.assigner(anchors, gts, valid, grid)

        # pre-assigned positives, image-major and in ascending anchor order (sync 1)
        pre_pos = (assigned.gt_inds > 0).reshape(-1).nonzero().squeeze(1)
        pos_image = pre_pos // num_anchors
        pos_anchor = pre_pos % num_anchors
        pos_gt = assigned.gt_inds.reshape(-1)[pre_pos] - 1
        pos_labels = gts.labels[pos_image, pos_gt]
        pos_boxes = gts.boxes[pos_image, pos_gt]
        pos_anchors = anchors[pos_anchor]

        cls_pos = cls_flat.reshape(-1, num_classes)[pre_pos]
        deltas_pos = deltas_flat.reshape(-1, 4)[pre_pos]
        scores = paa_anchor_scores(
            cls_pos,
            pos_labels,
            pos_anchors,
            deltas_pos,
            pos_boxes,
            box_coder=self.box_coder,
            focal_alpha=cfg.focal_alpha,
            focal_gamma=cfg.focal_gamma,
            cls_weight=cfg.loss_cls_weight,
            bbox_weight=cfg.loss_bbox_weight,
            giou_eps=cfg.giou_eps,
        )
        result = paa_reassign(
            scores,
            pos_image * num_gts + pos_gt,
            anchor_levels[pos_anchor],
            batch * num_gts,
            len(cfg.strides),
            topk=cfg.topk,
            reg_covar=cfg.gmm_reg_covar,
            tol=cfg.gmm_tol,
            max_iter=cfg.gmm_max_iter,
        )
        keep = result.positive.nonzero().squeeze(1)  # sync 2
        final_pos = pre_pos[keep]
        labels = torch.full((batch * num_anchors,), num_classes, dtype=torch.long, device=device)
        labels[final_pos] = pos_labels[keep]
        num_pos = torch.zeros(batch, dtype=torch.long, device=device).index_add_(
            0, pos_image[keep], torch.ones_like(keep)
        )
        return PAATargets(
            labels=labels,
            label_weights=(assigned.gt_inds >= 0).reshape(-1).float(),
            pos_index=final_pos,
            pos_anchors=pos_anchors[keep],
            pos_boxes=pos_boxes[keep],
            num_pos=num_pos,
            num_ill_defined=result.ill_defined.reshape(batch, num_gts).sum(1),
            pre_gt_inds=assigned.gt_inds,
            pre_pos_index=pre_pos,
            pre_pos_scores=scores,
        )

    def __call__(
        self,
        cls_logits: list[Tensor],
        box_deltas: list[Tensor],
        iou_logits: list[Tensor],
        gt_boxes: list[Tensor],
        gt_labels: list[Tensor],
        pad_shapes: list[tuple[int, int]],
    ) -> LossOutput:
        """The losses of a padded batch.

        Args:
            cls_logits: per level ``[B, C, H, W]`` class logits.
            box_deltas: per level ``[B, 4, H, W]`` delta-xywh regressions (already scaled).
            iou_logits: per level ``[B, 1, H, W]`` IoU logits.
            gt_boxes: per image ``[M_i, 4]`` xyxy in network-input pixels (``M_i`` may be 0).
            gt_labels: per image ``[M_i]`` int64 classes in ``0..C-1``.
            pad_shapes: per image its own ``(ceil(h / 32) * 32, ceil(w / 32) * 32)``.
        """
        self._check(cls_logits, box_deltas, iou_logits, gt_boxes, gt_labels, pad_shapes)
        cfg = self.config
        batch, num_classes = cls_logits[0].shape[:2]
        feat_sizes = [(int(c.shape[-2]), int(c.shape[-1])) for c in cls_logits]
        # the losses are computed in float32 whatever the outputs' dtype (a no-op for mmdetection's fp32)
        cls_flat = flatten_levels(cls_logits).float()
        deltas_flat = flatten_levels(box_deltas).float()
        targets = self._targets(cls_flat, deltas_flat, feat_sizes, gt_boxes, gt_labels, pad_shapes)
        cls_flat = cls_flat.reshape(-1, num_classes)
        deltas_flat = deltas_flat.reshape(-1, 4)
        iou_flat = flatten_levels(iou_logits).float().reshape(-1, 1)
        final_pos = targets.pos_index
        total_pos = int(final_pos.shape[0])

        # mmdetection's focal loss summed (weighted by the label weights), in few passes: paadet.train.focal
        focal = focal_loss_sum(
            cls_flat, targets.labels, targets.label_weights, cfg.focal_alpha, cfg.focal_gamma, positives=final_pos
        )
        loss_cls = cfg.loss_cls_weight * (focal / (max(total_pos, batch) + EPS32))
        if total_pos > 0:
            pred = self.box_coder.decode(targets.pos_anchors, deltas_flat[final_pos])
            target = targets.pos_boxes
            iou_target = aligned_iou(pred.detach(), target, cfg.iou_eps)
            bce = F.binary_cross_entropy_with_logits(iou_flat[final_pos], iou_target[:, None], reduction="none")
            loss_iou = cfg.loss_iou_weight * (bce.sum() / (total_pos + EPS32))
            giou_loss = (1 - aligned_giou(pred, target, cfg.giou_eps)) * iou_target.clamp(min=IOU_WEIGHT_EPS)
            loss_bbox = cfg.loss_bbox_weight * (giou_loss.sum() / (iou_target.sum() + EPS32))
        else:
            loss_iou = iou_flat.sum() * 0
            loss_bbox = deltas_flat.sum() * 0
        loss = loss_cls + loss_bbox + loss_iou
        return LossOutput(loss_cls, loss_bbox, loss_iou, loss, targets.num_pos, targets.num_ill_defined)
