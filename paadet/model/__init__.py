"""The PAA network and its building blocks."""
from .anchors import AnchorGenerator, feature_sizes
from .box_coder import DeltaXYWHBoxCoder
from .paa import STRIDES, PAANet

__all__ = ["AnchorGenerator", "DeltaXYWHBoxCoder", "PAANet", "STRIDES", "feature_sizes"]
