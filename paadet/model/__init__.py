"""The PAA network (ResNet-50 + FPN + PAA head, mmdetection's state-dict names) and its building blocks, built from
a checkpoint (:mod:`.build`), with seeded random weights for tests and timing-only benchmarks (:mod:`.seeded`)."""

from paadet.model.anchors import AnchorGenerator, feature_sizes
from paadet.model.box_coder import DeltaXYWHBoxCoder
from paadet.model.paa import STRIDES, PAANet

__all__ = ["STRIDES", "AnchorGenerator", "DeltaXYWHBoxCoder", "PAANet", "feature_sizes"]
