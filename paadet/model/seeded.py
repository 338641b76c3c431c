"""Deterministic seeded weights, for golden files, tests and timing-only benchmarks.

Nothing here is a stand-in for the official checkpoint: these weights detect nothing real. They are
shaped so that the head produces thousands of candidates per image, which exercises top-k, NMS and
score voting hard, and they are reproducible from a seed on any machine (CPU generator).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from paadet.model.paa import PAANet

# name -> (seed, cls_bias) of :func:`seeded_state_dict`: "dense" gives ~3,500-4,000 NMS candidates and 100
# detections per image (post-processing works hard), "sparse" a few hundred candidates and ~50 detections
# (closer to a trained model's load).
SEEDED_WEIGHTS: dict[str, tuple[int, float]] = {"dense": (0, -8.0), "sparse": (2, -10.3)}


def seeded_state_dict(
    seed: int = 0, cls_bias: float = -8.0, cls_std: float = 0.035, num_classes: int = 80, depth: int = 50
) -> dict[str, Tensor]:
    """A random PAA state dict with mmdetection's keys (369 for R-50, 675 for R-101), identical for the same
    arguments.

    Args:
        seed: seed of the CPU generator.
        cls_bias: bias of the classification logits; with ``cls_std`` it sets how many
            (anchor, class) pairs pass the 0.05 score threshold (thousands at the defaults).
        cls_std: standard deviation of the classification conv weights.
        num_classes: classes of the head.
        depth: the backbone's depth, 50 or 101 (the R-50 draws are unchanged by the option).
    """
    gen = torch.Generator().manual_seed(seed)
    template = PAANet(num_classes=num_classes, depth=depth).state_dict()
    out: dict[str, Tensor] = {}

    def normal(shape: torch.Size, std: float, mean: float = 0.0) -> Tensor:
        return torch.randn(shape, generator=gen) * std + mean

    def uniform(shape: torch.Size, low: float, high: float) -> Tensor:
        return torch.rand(shape, generator=gen) * (high - low) + low

    for key, ref in template.items():
        shape = ref.shape
        if key.endswith("num_batches_tracked"):
            value = torch.zeros((), dtype=torch.long)
        elif key.endswith("scale"):
            value = uniform(shape, 0.8, 1.2)
        elif "atss_cls" in key:
            value = normal(shape, cls_std) if key.endswith("weight") else normal(shape, 0.3, cls_bias)
        elif "atss_reg" in key:
            value = normal(shape, 0.004) if key.endswith("weight") else normal(shape, 0.1)
        elif "atss_centerness" in key:
            value = normal(shape, 0.01) if key.endswith("weight") else normal(shape, 0.2, 0.5)
        elif ref.ndim == 4:  # conv weights: He initialisation keeps activations bounded
            fan_in = shape[1] * shape[2] * shape[3]
            value = normal(shape, math.sqrt(2.0 / fan_in))
        elif key.endswith("running_var"):
            value = uniform(shape, 0.5, 1.5)
        elif key.endswith("running_mean"):
            value = normal(shape, 0.1)
        elif key.endswith("weight"):  # BatchNorm / GroupNorm affine weights
            low, high = (0.1, 0.3) if key.endswith("bn3.weight") else (0.5, 1.0)
            value = uniform(shape, low, high)
        else:  # biases
            value = normal(shape, 0.05)
        out[key] = value.to(ref.dtype).contiguous()
    return out


def seeded_net(seed: int = 0, cls_bias: float = -8.0, depth: int = 50) -> PAANet:
    """A :class:`PAANet` in eval mode holding :func:`seeded_state_dict` ``(seed, cls_bias, depth=depth)``."""
    net = PAANet(depth=depth)
    net.load_state_dict(seeded_state_dict(seed, cls_bias=cls_bias, depth=depth))
    return net.eval()


def train_state_dict(
    seed: int = 0, cls_bias: float = -4.595, num_classes: int = 3, depth: int = 50
) -> dict[str, Tensor]:
    """:func:`seeded_state_dict` for a ``num_classes`` head (R-``depth``), with a bias that spreads the focal losses."""
    return seeded_state_dict(seed, cls_bias=cls_bias, num_classes=num_classes, depth=depth)
