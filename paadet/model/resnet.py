"""ResNet-50 and ResNet-101 backbones, "pytorch" style, with torchvision's (and so mmdetection's) parameter names.

The stride of each stage sits on the 3x3 convolution of its first bottleneck. BatchNorm has eps 1e-5.
For training, :class:`ResNet` follows mmdetection's ``frozen_stages`` and ``norm_eval``: the frozen
stages (the stem for 0, the stem and ``layer1`` for 1, ...) never take gradients and stay in eval mode,
and with ``norm_eval`` every BatchNorm keeps its running statistics (eval mode) while the affine
parameters of the unfrozen stages still train.
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
        # in place, as torchvision and mmdetection (one pass less; BatchNorm's backward needs its input only)
        out += identity
        return self.relu(out)


STAGE_BLOCKS: dict[int, tuple[int, int, int, int]] = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
"""Bottlenecks per stage (``layer1..layer4``) of each supported depth."""


class ResNet(nn.Module):
    """ResNet-50 or ResNet-101 returning the outputs of stages 1-4 (C2..C5: 256/512/1024/2048 channels).

    Input ``[N, 3, H, W]``; outputs at strides 4, 8, 16, 32. The two depths differ only in the number of
    bottlenecks of ``layer3`` (6 or 23), so their parameter names are the same up to that count.

    Args:
        depth: 50 or 101 (:data:`STAGE_BLOCKS`).
        frozen_stages: -1 freezes nothing; 0 the stem (``conv1``, ``bn1``); k >= 1 the stem and
            ``layer1..layerk``. Frozen parameters get ``requires_grad=False`` and their modules stay
            in eval mode (mmdetection's ``_freeze_stages``).
        norm_eval: keep every BatchNorm in eval mode in :meth:`train` (running statistics frozen).
    """

    def __init__(self, depth: int = 50, frozen_stages: int = -1, norm_eval: bool = True) -> None:
        super().__init__()
        if depth not in STAGE_BLOCKS:
            raise ValueError(f"ResNet depth must be one of {sorted(STAGE_BLOCKS)}, got {depth}")
        self.depth = depth
        self.stage_blocks = STAGE_BLOCKS[depth]
        if not -1 <= frozen_stages <= len(self.stage_blocks):
            raise ValueError(f"frozen_stages must be in -1..{len(self.stage_blocks)}, got {frozen_stages}")
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval
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
        for module in self.frozen_modules():
            module.requires_grad_(False)

    def frozen_modules(self) -> list[nn.Module]:
        """The modules ``frozen_stages`` freezes, stem first."""
        if self.frozen_stages < 0:
            return []
        return [self.conv1, self.bn1] + [getattr(self, f"layer{i}") for i in range(1, self.frozen_stages + 1)]

    def train(self, mode: bool = True) -> ResNet:
        """Set the training mode, then put the frozen stages (and, with ``norm_eval``, every BatchNorm) in eval mode."""
        super().train(mode)
        if mode:
            for module in self.frozen_modules():
                module.eval()
            if self.norm_eval:
                for module in self.modules():
                    if isinstance(module, nn.BatchNorm2d):
                        module.eval()
        return self

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        outs = []
        for name in ("layer1", "layer2", "layer3", "layer4"):
            x = getattr(self, name)(x)
            outs.append(x)
        return outs
