"""PyTorch functions that export to single ONNX operators the tracer cannot express on its own.

* :class:`DynamicTopK`: ``TopK`` whose ``K`` is a graph value (``min(nms_pre, anchors of the level)``),
  so that one graph serves every input size.
* :class:`NonMaxSuppression`: ONNX's ``NonMaxSuppression`` (accepted by ONNX Runtime and TensorRT).
  Its PyTorch ``forward`` is a faithful implementation of the operator (greedy, strict ``>`` on both
  thresholds), used while tracing and when the export module is run in PyTorch.
"""

from __future__ import annotations

import torch
from torch import Tensor

from paadet.postprocess import greedy_nms_sorted


class DynamicTopK(torch.autograd.Function):
    """``x.topk(k, dim=1)`` (largest, sorted) with ``k`` a 0-dim int64 tensor computed in the graph."""

    @staticmethod
    def forward(ctx, x: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        return x.topk(int(k), dim=1, largest=True, sorted=True)

    @staticmethod
    def symbolic(g, x, k):
        k = g.op("Reshape", k, g.op("Constant", value_t=torch.tensor([1], dtype=torch.int64)))
        return g.op("TopK", x, k, axis_i=1, largest_i=1, sorted_i=1, outputs=2)


def dynamic_topk(x: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
    """Top ``k`` along dim 1 of ``x [B, A]``: values and indices ``[B, k]``, sorted descending."""
    return DynamicTopK.apply(x, k)


class NonMaxSuppression(torch.autograd.Function):
    """ONNX ``NonMaxSuppression`` (``center_point_box=0``).

    Args (of ``apply``):
        boxes: ``[G, A, 4]`` float32 boxes (corner format; ONNX reads them as y1, x1, y2, x2, which
            gives the same IoU for xyxy boxes).
        scores: ``[G, C, A]`` float32.
        max_output: ``[1]`` int64, boxes kept per (group, class) at most.
        iou_threshold: ``[1]`` float32, a box is suppressed by a kept one with IoU strictly above it.
        score_threshold: ``[1]`` float32, only scores strictly above it are candidates.

    Returns:
        ``[S, 3]`` int64 rows ``(group, class, box index)``, per (group, class) in descending score order.
    """

    @staticmethod
    def forward(
        ctx, boxes: Tensor, scores: Tensor, max_output: Tensor, iou_threshold: Tensor, score_threshold: Tensor
    ) -> Tensor:
        limit = int(max_output.reshape(-1)[0])
        iou_thr = float(iou_threshold.reshape(-1)[0])
        score_thr = float(score_threshold.reshape(-1)[0])
        rows = []
        for g in range(scores.shape[0]):
            for c in range(scores.shape[1]):
                s = scores[g, c]
                idx = (s > score_thr).nonzero().squeeze(1)
                if idx.numel() == 0:
                    continue
                idx = idx[s[idx].argsort(descending=True, stable=True)]
                keep = greedy_nms_sorted(boxes[g, idx][None], torch.ones(1, idx.numel(), dtype=torch.bool), iou_thr)[0]
                kept = idx[keep][:limit]
                rows.append(torch.stack([torch.full_like(kept, g), torch.full_like(kept, c), kept], dim=1))
        if not rows:
            return torch.zeros(0, 3, dtype=torch.int64)
        return torch.cat(rows).to(torch.int64)

    @staticmethod
    def symbolic(g, boxes, scores, max_output, iou_threshold, score_threshold):
        return g.op(
            "NonMaxSuppression", boxes, scores, max_output, iou_threshold, score_threshold, center_point_box_i=0
        )


def non_max_suppression(
    boxes: Tensor, scores: Tensor, max_output: int, iou_threshold: float, score_threshold: float
) -> Tensor:
    """See :class:`NonMaxSuppression`; thresholds become graph constants."""
    return NonMaxSuppression.apply(
        boxes,
        scores,
        torch.tensor([max_output], dtype=torch.int64),
        torch.tensor([iou_threshold], dtype=torch.float32),
        torch.tensor([score_threshold], dtype=torch.float32),
    )
