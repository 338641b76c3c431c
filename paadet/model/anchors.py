"""Anchor generation for PAA: one square anchor per location and level, centre offset 0."""

from __future__ import annotations

import torch
from torch import Tensor


class AnchorGenerator:
    """Anchors of mmdetection's ``AnchorGenerator(ratios=[1.0], octave_base_scale=8, scales_per_octave=1)``.

    The anchor at grid cell ``(x, y)`` of a level with stride ``s`` is
    ``[x*s - b*s/2, y*s - b*s/2, x*s + b*s/2, y*s + b*s/2]`` with ``b = octave_base_scale`` (xyxy,
    input-pixel coordinates, no +1). Anchors are ordered row-major: y outer, x inner, which matches
    ``feature.permute(0, 2, 3, 1).reshape(N, -1, C)``.

    Args:
        strides: stride of each pyramid level.
        octave_base_scale: anchor side in units of the stride.
    """

    def __init__(self, strides: tuple[int, ...] = (8, 16, 32, 64, 128), octave_base_scale: float = 8.0) -> None:
        if not strides:
            raise ValueError("strides must not be empty")
        self.strides = tuple(int(s) for s in strides)
        self.octave_base_scale = float(octave_base_scale)

    def base_anchor(
        self, stride: int, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
    ) -> Tensor:
        """The anchor at cell (0, 0) of a level: ``[4]`` xyxy."""
        half = 0.5 * stride * self.octave_base_scale
        return torch.tensor([-half, -half, half, half], dtype=dtype, device=device)

    def level_anchors(
        self,
        feat_size: tuple[int, int],
        stride: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> Tensor:
        """Anchors of one level with feature size ``(H, W)``: ``[H * W, 4]`` xyxy."""
        h, w = int(feat_size[0]), int(feat_size[1])
        shift_x = torch.arange(0, w, device=device).to(dtype) * stride
        shift_y = torch.arange(0, h, device=device).to(dtype) * stride
        yy, xx = torch.meshgrid(shift_y, shift_x, indexing="ij")
        xx = xx.reshape(-1)
        yy = yy.reshape(-1)
        shifts = torch.stack([xx, yy, xx, yy], dim=-1)
        return self.base_anchor(stride, dtype, device)[None, :] + shifts

    def __call__(
        self,
        feat_sizes: list[tuple[int, int]],
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> list[Tensor]:
        """Anchors of every level, ``[H_l * W_l, 4]`` each."""
        if len(feat_sizes) != len(self.strides):
            raise ValueError(f"expected {len(self.strides)} feature sizes, got {len(feat_sizes)}")
        return [self.level_anchors(size, s, dtype, device) for size, s in zip(feat_sizes, self.strides, strict=False)]


def feature_sizes(height: int, width: int, num_levels: int = 5) -> list[tuple[int, int]]:
    """Feature-map sizes of P3..P7 for a padded input of ``height x width``.

    Each stride-2 convolution (kernel 3 or 1, padding 1 or 0) gives ``ceil(n / 2)``; P3 is at stride 8.
    Example: 800x1344 -> (100, 168), (50, 84), (25, 42), (13, 21), (7, 11).
    """
    sizes = []
    h, w = height, width
    for _ in range(3):  # conv1 (stride 2), maxpool (stride 2), layer2 (stride 2) -> stride 8
        h, w = (h + 1) // 2, (w + 1) // 2
    for _ in range(num_levels):
        sizes.append((h, w))
        h, w = (h + 1) // 2, (w + 1) // 2
    return sizes
