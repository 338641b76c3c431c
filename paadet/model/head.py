"""PAA's dense head (ATSS layout): shared towers over all pyramid levels."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class ConvGNReLU(nn.Module):
    """3x3 conv without bias -> GroupNorm(32) -> ReLU, named like mmcv's ``ConvModule`` (``.conv``, ``.gn``)."""

    def __init__(self, channels: int, num_groups: int = 32) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.gn = nn.GroupNorm(num_groups, channels, eps=1e-5)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.gn(self.conv(x)))


class Scale(nn.Module):
    """A learnable scalar multiplier (``scales.{i}.scale``, a 0-dim tensor)."""

    def __init__(self, value: float = 1.0) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(value, dtype=torch.float32))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale


class PAAHead(nn.Module):
    """Classification, box-regression and IoU branches shared across levels.

    Args:
        num_classes: number of foreground classes (sigmoid scores, no background column).
        channels: input and tower width.
        stacked_convs: conv-GN-ReLU blocks per tower.
        num_levels: pyramid levels, one ``Scale`` each.

    For each level ``[N, C, H, W]`` the head returns class logits ``[N, num_classes, H, W]``,
    box deltas ``[N, 4, H, W]`` (delta-xywh, already multiplied by the level's scale) and IoU logits
    ``[N, 1, H, W]``.
    """

    def __init__(self, num_classes: int = 80, channels: int = 256, stacked_convs: int = 4, num_levels: int = 5) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.cls_convs = nn.ModuleList(ConvGNReLU(channels) for _ in range(stacked_convs))
        self.reg_convs = nn.ModuleList(ConvGNReLU(channels) for _ in range(stacked_convs))
        self.atss_cls = nn.Conv2d(channels, num_classes, 3, padding=1)
        self.atss_reg = nn.Conv2d(channels, 4, 3, padding=1)
        self.atss_centerness = nn.Conv2d(channels, 1, 3, padding=1)
        self.scales = nn.ModuleList(Scale(1.0) for _ in range(num_levels))

    def forward_level(self, x: Tensor, scale: Scale) -> tuple[Tensor, Tensor, Tensor]:
        cls_feat = x
        reg_feat = x
        for conv in self.cls_convs:
            cls_feat = conv(cls_feat)
        for conv in self.reg_convs:
            reg_feat = conv(reg_feat)
        cls_logits = self.atss_cls(cls_feat)
        box_deltas = scale(self.atss_reg(reg_feat))
        iou_logits = self.atss_centerness(reg_feat)
        return cls_logits, box_deltas, iou_logits

    def forward(self, feats: list[Tensor]) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        cls_out, box_out, iou_out = [], [], []
        for x, scale in zip(feats, self.scales, strict=False):
            c, b, i = self.forward_level(x, scale)
            cls_out.append(c)
            box_out.append(b)
            iou_out.append(i)
        return cls_out, box_out, iou_out
