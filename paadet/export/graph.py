"""The exported computation as PyTorch modules: pixels in, final detections out.

:class:`PAAGraph` is what ``paadet export`` traces. It mirrors :mod:`paadet.preprocess` and
:mod:`paadet.postprocess` operation by operation, in a form the TorchScript ONNX exporter turns
into a graph that works for any batch and (when exported so) any input size:

* normalisation of a ``uint8`` BGR batch inside the graph (a quarter of the bytes of float input),
  with the region outside each image's ``img_shape`` set to 0 after normalising (mmdetection pads
  with zeros after normalisation);
* anchors built from the feature maps' sizes (``CumSum`` of ones, exact integers);
* per-level top-k with ``K = min(nms_pre, anchors of the level)`` as a graph value;
* decoding with the clamps and the clipping of :class:`~paadet.model.DeltaXYWHBoxCoder`, rescaling;
* class-aware NMS with ONNX ``NonMaxSuppression``: each (image, class) is one NMS batch entry whose
  boxes are shifted by ``class * (max_coord + 1)`` exactly as mmcv's ``batched_nms`` does, so the
  IoU values (and hence the kept set) are the reference's bit for bit;
* the ``max_per_img`` best kept detections per image, and score voting against every candidate
  of the detection's class, vectorised (``[B, max_det, A]`` IoUs and weights, a matrix product).
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from paadet.boxes import bbox_overlaps
from paadet.export.ops import dynamic_topk, non_max_suppression
from paadet.model import PAANet
from paadet.model.box_coder import DeltaXYWHBoxCoder
from paadet.model.head import ConvGNReLU
from paadet.model.paa import STRIDES
from paadet.postprocess import PostprocessConfig
from paadet.preprocess import MEAN_RGB, STD_RGB


class FP32GroupNorm(nn.Module):
    """GroupNorm computed in float32 inside a half-precision network (statistics lose accuracy in fp16)."""

    def __init__(self, gn: nn.GroupNorm) -> None:
        super().__init__()
        self.gn = copy.deepcopy(gn).float()

    def forward(self, x: Tensor) -> Tensor:
        return self.gn(x.float()).to(x.dtype)


def _fold_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A convolution equal to ``bn(conv(x))`` (eval mode), computed in float64 then cast back."""
    fused = copy.deepcopy(conv)
    w = conv.weight.detach().double()
    scale = bn.weight.detach().double() / torch.sqrt(bn.running_var.detach().double() + bn.eps)
    bias = conv.bias.detach().double() if conv.bias is not None else torch.zeros_like(scale)
    fused.weight = nn.Parameter((w * scale[:, None, None, None]).to(conv.weight.dtype), requires_grad=False)
    new_bias = (bias - bn.running_mean.detach().double()) * scale + bn.bias.detach().double()
    fused.bias = nn.Parameter(new_bias.to(conv.weight.dtype), requires_grad=False)
    return fused


def fold_batchnorm(net: PAANet) -> PAANet:
    """A copy of ``net`` with every backbone BatchNorm folded into its convolution (eval semantics)."""
    net = copy.deepcopy(net).eval()
    backbone = net.backbone
    backbone.conv1 = _fold_bn(backbone.conv1, backbone.bn1)
    backbone.bn1 = nn.Identity()
    for name in ("layer1", "layer2", "layer3", "layer4"):
        for block in getattr(backbone, name):
            for i in (1, 2, 3):
                setattr(block, f"conv{i}", _fold_bn(getattr(block, f"conv{i}"), getattr(block, f"bn{i}")))
                setattr(block, f"bn{i}", nn.Identity())
            if block.downsample is not None:
                block.downsample = nn.Sequential(_fold_bn(block.downsample[0], block.downsample[1]))
    return net


def prepare_network(net: PAANet, fp16: bool = False) -> PAANet:
    """The network as exported: BatchNorm folded; with ``fp16`` half weights except GroupNorm (fp32)."""
    net = fold_batchnorm(net)
    if fp16:
        blocks = [
            b
            for tower in (net.bbox_head.cls_convs, net.bbox_head.reg_convs)
            for b in tower
            if isinstance(b, ConvGNReLU)
        ]
        fp32_norms = [FP32GroupNorm(b.gn) for b in blocks]  # copied before the cast: weights stay exact
        net = net.half()
        for block, norm in zip(blocks, fp32_norms, strict=False):
            block.gn = norm
    for p in net.parameters():
        p.requires_grad_(False)
    return net


def normalize_in_graph(images: Tensor, img_shapes: Tensor) -> Tensor:
    """``uint8`` BGR ``[N, H, W, 3]`` -> normalised RGB float32 ``[N, 3, H, W]``, zero outside each ``img_shape``.

    Args:
        images: the padded batch (the padding's pixel values do not matter).
        img_shapes: ``[N, 2]`` float32 (height, width) of each resized image.
    """
    x = images.permute(0, 3, 1, 2)[:, [2, 1, 0]].float()
    mean = torch.tensor(MEAN_RGB, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(STD_RGB, dtype=torch.float32).view(1, 3, 1, 1)
    x = (x - mean) / std
    ones = torch.ones_like(x[0, 0])  # [H, W]
    ys = ones.cumsum(0) - 1  # row index, exact in float32
    xs = ones.cumsum(1) - 1
    inside = (ys[None] < img_shapes[:, 0, None, None]) & (xs[None] < img_shapes[:, 1, None, None])  # [N, H, W]
    return torch.where(inside[:, None], x, torch.zeros_like(x))


def level_anchors(feature: Tensor, stride: int, octave_base_scale: float = 8.0) -> Tensor:
    """Anchors ``[H * W, 4]`` of a level from its map ``[N, C, H, W]`` (as :class:`~paadet.model.AnchorGenerator`)."""
    ones = torch.ones_like(feature[0, 0], dtype=torch.float32)
    ys = ((ones.cumsum(0) - 1) * stride).reshape(-1)
    xs = ((ones.cumsum(1) - 1) * stride).reshape(-1)
    half = 0.5 * stride * octave_base_scale
    return torch.stack([xs - half, ys - half, xs + half, ys + half], dim=-1)


class Candidates(nn.Module):
    """Raw maps -> candidate boxes ``[N, A, 4]`` (original-image pixels) and NMS scores ``[N, A, C]``.

    As :func:`paadet.postprocess.select_candidates`, with the per-level ``K`` computed in the graph.
    """

    def __init__(self, config: PostprocessConfig, strides: tuple[int, ...] = STRIDES) -> None:
        super().__init__()
        self.config = config
        self.strides = strides
        self.coder = DeltaXYWHBoxCoder()

    def forward(
        self,
        cls_logits: list[Tensor],
        box_deltas: list[Tensor],
        iou_logits: list[Tensor],
        img_shapes: Tensor,
        scale_factors: Tensor,
    ) -> tuple[Tensor, Tensor]:
        all_boxes, all_scores = [], []
        max_shape = img_shapes[:, None, :]
        for cls, deltas, iou, stride in zip(cls_logits, box_deltas, iou_logits, self.strides, strict=False):
            cls, deltas, iou = cls.float(), deltas.float(), iou.float()
            num_classes = cls.shape[1]
            anchors = level_anchors(cls, stride)
            scores = cls.permute(0, 2, 3, 1).flatten(1, 2).sigmoid()  # [N, A_l, C]
            deltas = deltas.permute(0, 2, 3, 1).flatten(1, 2)  # [N, A_l, 4]
            iou = iou.permute(0, 2, 3, 1).flatten(1, 3).sigmoid()  # [N, A_l]
            max_scores = (scores * iou[..., None]).sqrt().max(dim=-1).values
            k = torch.clamp(torch._shape_as_tensor(max_scores)[1], max=self.config.nms_pre)
            topk = dynamic_topk(max_scores, k)[1]  # [N, K]
            scores = scores.gather(1, topk[..., None].expand(-1, -1, num_classes))
            deltas = deltas.gather(1, topk[..., None].expand(-1, -1, 4))
            iou = iou.gather(1, topk)
            level = anchors[topk]  # [N, K, 4]
            all_boxes.append(self.coder.decode(level, deltas, max_shape=max_shape))
            all_scores.append((scores * iou[..., None]).sqrt())
        boxes = torch.cat(all_boxes, dim=1)
        scale = torch.cat([scale_factors, scale_factors], dim=1)[:, None, :]
        return boxes / scale, torch.cat(all_scores, dim=1)


class MulticlassNMS(nn.Module):
    """Candidates -> fixed-shape detections: class-aware NMS, top ``max_per_img``, score voting.

    Returns ``boxes [N, D, 4]``, ``scores [N, D]``, ``labels [N, D]`` int64 (-1 padding) and
    ``num_dets [N]`` int64, sorted by score, ``D = max_per_img``.
    """

    def __init__(self, config: PostprocessConfig) -> None:
        super().__init__()
        self.config = config

    def forward(self, boxes: Tensor, nms_scores: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        cfg = self.config
        num_anchors = torch._shape_as_tensor(boxes)[1]
        num_classes = nms_scores.shape[2]
        valid = nms_scores > cfg.score_thr  # [N, A, C]
        # mmcv's class offsets: class * (max coordinate of this image's candidate boxes + 1); boxes are >= 0
        any_valid = valid.any(dim=-1, keepdim=True)
        max_coord = torch.where(any_valid, boxes, torch.zeros_like(boxes)).flatten(1, 2).max(dim=1).values  # [N]
        classes = torch.arange(num_classes, dtype=torch.float32)
        offsets = classes[None, :] * (max_coord[:, None] + 1)  # [N, C]
        class_boxes = (boxes[:, None] + offsets[:, :, None, None]).flatten(0, 1)  # [N*C, A, 4]
        class_scores = nms_scores.transpose(1, 2).flatten(0, 1)  # [N*C, A]
        selected = non_max_suppression(
            class_boxes, class_scores[:, None, :], cfg.max_per_img, cfg.iou_thr, cfg.score_thr
        )
        flat_scores = class_scores.flatten()  # [N*C*A]
        flat_index = selected[:, 0] * num_anchors + selected[:, 2]
        kept = torch.full_like(flat_scores, -1.0).scatter(0, flat_index, flat_scores.gather(0, flat_index))
        kept = kept.reshape(boxes.shape[0], -1)  # [N, C*A]
        top_scores, top_idx = kept.topk(cfg.max_per_img, dim=1, largest=True, sorted=True)
        det_valid = top_scores > cfg.score_thr
        det_cls = torch.div(top_idx, num_anchors, rounding_mode="floor")
        det_anchor = top_idx - det_cls * num_anchors
        det_boxes = boxes.gather(1, det_anchor[..., None].expand(-1, -1, 4))  # [N, D, 4]
        if cfg.score_voting:
            det_boxes = self.score_voting(det_boxes, det_cls, boxes, nms_scores)
        det_boxes = torch.where(det_valid[..., None], det_boxes, torch.zeros_like(det_boxes))
        det_scores = torch.where(det_valid, top_scores, torch.zeros_like(top_scores))
        labels = torch.where(det_valid, det_cls, torch.full_like(det_cls, -1))
        return det_boxes, det_scores, labels, det_valid.sum(dim=1)

    def score_voting(self, det_boxes: Tensor, det_cls: Tensor, boxes: Tensor, nms_scores: Tensor) -> Tensor:
        """PAA score voting for ``det_boxes [N, D, 4]`` of classes ``det_cls [N, D]``.

        Candidates are all ``boxes [N, A, 4]`` whose ``nms_scores [N, A, C]`` for the detection's class
        exceed ``score_thr``; those with IoU above ``voting_iou_thr`` vote with weight
        ``exp(-(1 - IoU)^2 / sigma) * score``. Returns ``[N, D, 4]``.
        """
        cfg = self.config
        by_class = nms_scores.transpose(1, 2)  # [N, C, A]
        cand_scores = by_class.gather(1, det_cls[..., None].expand(-1, -1, by_class.shape[2]))  # [N, D, A]
        ious = bbox_overlaps(det_boxes, boxes)  # [N, D, A]
        use = (cand_scores > cfg.score_thr) & (ious > cfg.voting_iou_thr)
        weights = torch.exp(-((1 - ious) ** 2) / cfg.voting_sigma) * cand_scores
        weights = torch.where(use, weights, torch.zeros_like(weights))
        total = weights.sum(dim=-1, keepdim=True)
        voted = torch.matmul(weights, boxes) / total.clamp(min=torch.finfo(torch.float32).tiny)
        return torch.where(total > 0, voted, det_boxes)


class PAAGraph(nn.Module):
    """The full exported model.

    Inputs: ``images [N, H, W, 3]`` uint8 BGR (resized, padded bottom/right to the graph's size),
    ``img_shapes [N, 2]`` float32 (height, width of each resized image), ``scale_factors [N, 2]``
    float32 (w_scale, h_scale = resized / original). Outputs: ``boxes [N, D, 4]`` float32 xyxy in
    original-image pixels, ``scores [N, D]`` float32, ``labels [N, D]`` int64 (-1 padding),
    ``num_dets [N]`` int64.

    Args:
        net: the network (weights loaded); it is copied, not modified.
        config: post-processing settings.
        fp16: half-precision network (GroupNorm and everything outside the network stay float32).
    """

    def __init__(self, net: PAANet, config: PostprocessConfig = PostprocessConfig(), fp16: bool = False) -> None:
        super().__init__()
        self.net = prepare_network(net, fp16)
        self.fp16 = fp16
        self.candidates = Candidates(config)
        self.nms = MulticlassNMS(config)

    def forward(
        self, images: Tensor, img_shapes: Tensor, scale_factors: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        x = normalize_in_graph(images, img_shapes)
        if self.fp16:
            x = x.half()
        cls_logits, box_deltas, iou_logits = self.net(x)
        boxes, nms_scores = self.candidates(cls_logits, box_deltas, iou_logits, img_shapes, scale_factors)
        return self.nms(boxes, nms_scores)


class RawGraph(nn.Module):
    """The network alone (the seed's form): normalised float32 ``[N, 3, H, W]`` in, 15 float32 maps out.

    Outputs in order: class logits of P3..P7 ``[N, 80, H_l, W_l]``, box deltas ``[N, 4, H_l, W_l]``,
    IoU logits ``[N, 1, H_l, W_l]``.
    """

    def __init__(self, net: PAANet, fp16: bool = False) -> None:
        super().__init__()
        self.net = prepare_network(net, fp16)
        self.fp16 = fp16

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        x = images.half() if self.fp16 else images
        cls_logits, box_deltas, iou_logits = self.net(x)
        return tuple(t.float() for t in (*cls_logits, *box_deltas, *iou_logits))
