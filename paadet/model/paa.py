"""The PAA R50-FPN / R101-FPN network: backbone, neck and head with mmdetection's state-dict names."""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn

from paadet.model.fpn import FPN
from paadet.model.head import PAAHead
from paadet.model.resnet import STAGE_BLOCKS, ResNet

NUM_LEVELS = 5
STRIDES = (8, 16, 32, 64, 128)


class PAANet(nn.Module):
    """ResNet-50 or ResNet-101 + FPN + PAA head. The raw network, without pre- or post-processing.

    Input: normalised RGB images ``[N, 3, H, W]`` (H, W multiples of 32 are what the checkpoint saw).
    Output: three lists over the 5 levels P3..P7 (strides 8..128):
    class logits ``[N, num_classes, H_l, W_l]``, box deltas ``[N, 4, H_l, W_l]``, IoU logits
    ``[N, 1, H_l, W_l]``.

    ``state_dict()`` keys are mmdetection's (``backbone.*``, ``neck.*``, ``bbox_head.*``: 369 entries for
    R-50, 675 for R-101), so the official checkpoints load with ``strict=True``.

    Args:
        num_classes: foreground classes of the head.
        depth: the backbone's depth, 50 or 101 (:func:`depth_of_state_dict` reads it from a checkpoint).
        trainable: False (default): an inference-only network, :meth:`train` keeps it in eval mode.
            True: :meth:`train` works, with mmdetection's PAA recipe for the backbone: the stages up
            to ``frozen_stages`` frozen (no gradients, eval mode) and, with ``norm_eval``, every
            BatchNorm in eval mode (running statistics frozen, affine parameters still trained).
        frozen_stages: see :class:`~paadet.model.resnet.ResNet` (1: stem and ``layer1``, the recipe's).
        norm_eval: see :class:`~paadet.model.resnet.ResNet` (False trains BatchNorm statistics too).

    The network is built in eval mode either way; a trainer calls ``train()``.
    """

    def __init__(
        self,
        num_classes: int = 80,
        *,
        depth: int = 50,
        trainable: bool = False,
        frozen_stages: int = 1,
        norm_eval: bool = True,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.depth = depth
        self.trainable = trainable
        self.backbone = ResNet(depth, frozen_stages=frozen_stages if trainable else -1, norm_eval=norm_eval)
        self.neck = FPN((512, 1024, 2048), 256)
        self.bbox_head = PAAHead(num_classes=num_classes, channels=256, stacked_convs=4, num_levels=NUM_LEVELS)
        self.eval()

    def train(self, mode: bool = True) -> PAANet:
        """Training mode for a ``trainable`` network (frozen stages and BatchNorm as configured); an
        inference-only network stays in eval mode (BatchNorm always uses its running statistics)."""
        return super().train(mode and self.trainable)

    def forward(self, images: Tensor) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        _c2, c3, c4, c5 = self.backbone(images)
        feats = self.neck([c3, c4, c5])
        return self.bbox_head(feats)


def depth_of_state_dict(state_dict: Mapping[str, object]) -> int | None:
    """The backbone depth a PAA state dict was saved from: the number of ``backbone.layer3`` blocks decides
    (6 for R-50, 23 for R-101); ``None`` when the blocks match no supported depth (or there are none)."""
    prefix = "backbone.layer3."
    blocks = {key[len(prefix) :].split(".", 1)[0] for key in state_dict if key.startswith(prefix)}
    count = len(blocks)
    return next((depth for depth, stages in STAGE_BLOCKS.items() if stages[2] == count), None)
