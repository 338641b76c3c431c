"""Box maths on xyxy boxes (``[..., 4]`` as ``x1, y1, x2, y2`` in pixels), as mmdetection and mmcv compute it.

``bbox_overlaps`` (pairwise IoU, mmdetection's ``bbox_overlaps``), ``pairwise_iou_mmcv_nms`` (mmcv's NMS kernel's
IoU), and the aligned IoU / GIoU of box pairs that training's losses use.
"""

from __future__ import annotations

import torch
from torch import Tensor


def pairwise_iou_mmcv_nms(rows: Tensor, cols: Tensor | None = None) -> Tensor:
    """IoU of ``[..., M, 4]`` against ``[..., N, 4]`` boxes (``cols`` defaults to ``rows``), as mmcv's CPU NMS
    kernel computes it, row ``i`` in the role of the kept box: ``inter / (area_i + area_j - inter)``.

    Returns ``[..., M, N]``.
    """
    cols = rows if cols is None else cols
    rx1, ry1, rx2, ry2 = rows.unbind(-1)
    cx1, cy1, cx2, cy2 = cols.unbind(-1)
    row_areas = (rx2 - rx1) * (ry2 - ry1)
    col_areas = (cx2 - cx1) * (cy2 - cy1)
    w = (
        torch.minimum(rx2[..., :, None], cx2[..., None, :]) - torch.maximum(rx1[..., :, None], cx1[..., None, :])
    ).clamp(min=0)
    h = (
        torch.minimum(ry2[..., :, None], cy2[..., None, :]) - torch.maximum(ry1[..., :, None], cy1[..., None, :])
    ).clamp(min=0)
    inter = w * h
    return inter / (row_areas[..., :, None] + col_areas[..., None, :] - inter)


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


def _aligned_terms(boxes1: Tensor, boxes2: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """(IoU, clamped union, clamped enclosing area) of aligned pairs ``[..., 4]``, as mmdetection computes them."""
    area1 = (boxes1[..., 2] - boxes1[..., 0]) * (boxes1[..., 3] - boxes1[..., 1])
    area2 = (boxes2[..., 2] - boxes2[..., 0]) * (boxes2[..., 3] - boxes2[..., 1])
    lt = torch.maximum(boxes1[..., :2], boxes2[..., :2])
    rb = torch.minimum(boxes1[..., 2:], boxes2[..., 2:])
    wh = (rb - lt).clamp(min=0)
    overlap = wh[..., 0] * wh[..., 1]
    union = area1 + area2 - overlap
    eps_t = union.new_tensor([eps])
    union = torch.maximum(union, eps_t)
    enclose_lt = torch.minimum(boxes1[..., :2], boxes2[..., :2])
    enclose_rb = torch.maximum(boxes1[..., 2:], boxes2[..., 2:])
    enclose_wh = (enclose_rb - enclose_lt).clamp(min=0)
    enclose_area = torch.maximum(enclose_wh[..., 0] * enclose_wh[..., 1], eps_t)
    return overlap / union, union, enclose_area


def aligned_iou(boxes1: Tensor, boxes2: Tensor, eps: float = 1e-6) -> Tensor:
    """IoU of the pairs ``boxes1[..., i]``, ``boxes2[..., i]`` (both ``[..., 4]``): ``[...]``.

    mmdetection's ``bbox_overlaps(mode='iou', is_aligned=True)``; the union is clamped below at ``eps``.
    """
    return _aligned_terms(boxes1, boxes2, eps)[0]


def aligned_giou(boxes1: Tensor, boxes2: Tensor, eps: float = 1e-6) -> Tensor:
    """Generalised IoU of aligned pairs ``[..., 4]``: ``IoU - (enclosing - union) / enclosing``, ``[...]``.

    mmdetection's ``bbox_overlaps(mode='giou', is_aligned=True)``: union and enclosing area are
    clamped below at ``eps``. ``GIoULoss`` uses ``1 - giou``.
    """
    iou, union, enclose = _aligned_terms(boxes1, boxes2, eps)
    return iou - (enclose - union) / enclose
