"""Delta-xywh box decoding (mmdetection's ``DeltaXYWHBBoxCoder`` at test time)."""

from __future__ import annotations

import math

import torch
from torch import Tensor


class DeltaXYWHBoxCoder:
    """Decodes ``(dx, dy, dw, dh)`` regressions against anchors into xyxy boxes.

    ``d = delta * stds + means``; ``g_xy = p_xy + p_wh * d_xy``; ``d_wh`` is clamped to
    ``+-|ln(wh_ratio_clip)|``; ``g_wh = p_wh * exp(d_wh)``; box = ``g_xy -+ g_wh / 2`` (no +1).

    Args:
        means: the 4 target means.
        stds: the 4 target standard deviations.
        wh_ratio_clip: bound of the width/height scaling, as a ratio.
    """

    def __init__(
        self,
        means: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0),
        stds: tuple[float, float, float, float] = (0.1, 0.1, 0.2, 0.2),
        wh_ratio_clip: float = 16 / 1000,
    ) -> None:
        self.means = tuple(float(m) for m in means)
        self.stds = tuple(float(s) for s in stds)
        self.max_ratio = abs(math.log(wh_ratio_clip))
        self._cache: dict[tuple[torch.device, torch.dtype], tuple[Tensor, Tensor]] = {}

    def _constants(self, like: Tensor) -> tuple[Tensor, Tensor]:
        """``means`` and ``stds`` as tensors on ``like``'s device and dtype, made once per device (no copy per call).

        While tracing (ONNX export) or compiling they are made afresh so that they become graph constants.
        """
        if torch.jit.is_tracing() or torch.compiler.is_compiling():
            return like.new_tensor(self.means), like.new_tensor(self.stds)
        key = (like.device, like.dtype)
        if key not in self._cache:
            self._cache[key] = (like.new_tensor(self.means), like.new_tensor(self.stds))
        return self._cache[key]

    def decode(self, anchors: Tensor, deltas: Tensor, max_shape: Tensor | None = None) -> Tensor:
        """Decode boxes.

        Args:
            anchors: ``[..., 4]`` xyxy anchors, broadcastable against ``deltas``.
            deltas: ``[..., 4]`` regressions.
            max_shape: optional ``[..., 2]`` (height, width) per box batch to clip to, broadcastable
                against ``deltas[..., 0]`` after adding a trailing dimension; x is clamped to
                ``[0, width]`` and y to ``[0, height]``.

        Returns:
            ``[..., 4]`` xyxy boxes.
        """
        means, stds = self._constants(deltas)
        d = deltas * stds + means
        dxy, dwh = d[..., :2], d[..., 2:]
        pxy = (anchors[..., :2] + anchors[..., 2:]) * 0.5
        pwh = anchors[..., 2:] - anchors[..., :2]
        dwh = dwh.clamp(min=-self.max_ratio, max=self.max_ratio)
        gxy = pxy + pwh * dxy
        gwh = pwh * dwh.exp()
        boxes = torch.cat([gxy - gwh * 0.5, gxy + gwh * 0.5], dim=-1)
        if max_shape is not None:
            # [..., 2] (h, w) -> [..., 4] bounds (w, h, w, h)
            bounds = max_shape.flip(-1).to(boxes.dtype)
            bounds = torch.cat([bounds, bounds], dim=-1)
            boxes = torch.minimum(boxes.clamp(min=0), bounds)
        return boxes
