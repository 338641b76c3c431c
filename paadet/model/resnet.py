"""ResNet-50 backbone, "pytorch" style, with torchvision's (and so mmdetection's) parameter names.

The stride of each stage sits on the 3x3 convolution of its first bottleneck. BatchNorm runs in
eval mode only (frozen statistics, eps 1e-5), as at mmdetection's test time.
"""
from __future__ import annotations

from torch import Tensor, nn


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (stride) -> 1x1 bottleneck with expansion 4."""

    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int = 1) -> None:
        super().__init__()
        out_channels = width * self.expansion
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Sequential | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet50(nn.Module):
    """ResNet-50 returning the outputs of stages 1-4 (C2..C5: 256/512/1024/2048 channels).

    Input ``[N, 3, H, W]``; outputs at strides 4, 8, 16, 32.
    """

    stage_blocks = (3, 4, 6, 3)

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        in_channels = 64
        for i, num_blocks in enumerate(self.stage_blocks):
            width = 64 * 2**i
            stride = 1 if i == 0 else 2
            blocks = []
            for j in range(num_blocks):
                blocks.append(Bottleneck(in_channels, width, stride if j == 0 else 1))
                in_channels = width * Bottleneck.expansion
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        outs = []
        for name in ("layer1", "layer2", "layer3", "layer4"):
            x = getattr(self, name)(x)
            outs.append(x)
        return outs
