"""Feature pyramid (mmdetection's ``FPN`` with ``start_level=1, add_extra_convs='on_output'``)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class ConvWithBias(nn.Module):
    """A bare convolution under the name ``.conv``, as mmcv's ``ConvModule`` without norm/act stores it."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class FPN(nn.Module):
    """FPN over C3..C5 with two extra stride-2 levels computed from P5's output.

    Args:
        in_channels: channels of the backbone outputs used (C3, C4, C5).
        out_channels: channels of every pyramid level.

    Returns five maps P3..P7 (strides 8..128), no ReLU anywhere.
    """

    def __init__(self, in_channels: tuple[int, ...] = (512, 1024, 2048), out_channels: int = 256) -> None:
        super().__init__()
        self.lateral_convs = nn.ModuleList(ConvWithBias(c, out_channels, 1) for c in in_channels)
        convs = [ConvWithBias(out_channels, out_channels, 3) for _ in in_channels]
        convs += [ConvWithBias(out_channels, out_channels, 3, stride=2) for _ in range(2)]
        self.fpn_convs = nn.ModuleList(convs)

    def forward(self, feats: list[Tensor]) -> list[Tensor]:
        laterals = [conv(f) for conv, f in zip(self.lateral_convs, feats, strict=False)]
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + F.interpolate(
                laterals[i], size=laterals[i - 1].shape[-2:], mode="nearest"
            )
        outs = [self.fpn_convs[i](lat) for i, lat in enumerate(laterals)]
        for conv in self.fpn_convs[len(laterals) :]:
            outs.append(conv(outs[-1]))
        return outs
