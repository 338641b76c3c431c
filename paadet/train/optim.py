"""The optimiser of a training run: mmdetection's SGD (the recipe), or AdamW for short from-scratch schedules.

Both are PyTorch's own (``torch.optim.SGD``, ``torch.optim.AdamW``, fused on CPUs and CUDA); the trainer's
warm-up and step schedule sets their lr at every iteration (:func:`paadet.train.schedule.set_lr`), whichever
it is.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from paadet.train.config import OPTIMIZERS

__all__ = ["OPTIMIZERS", "build_optimizer"]

FUSED_DEVICES = ("cpu", "cuda")
"""Devices where AdamW runs torch's fused implementation (the same update, rounded in another order)."""


def build_optimizer(
    name: str,
    params: Iterable[Tensor],
    *,
    lr: float,
    momentum: float = 0.9,
    weight_decay: float = 1e-4,
    betas: tuple[float, float] = (0.9, 0.999),
) -> torch.optim.Optimizer:
    """The optimiser ``name`` (one of :data:`OPTIMIZERS`) over ``params``, every one in one group.

    Args:
        name: ``sgd`` or ``adamw``.
        params: the trainable parameters, in a fixed order (the order of the optimiser state in checkpoints).
        lr: the initial lr (the schedule overwrites it before the first step).
        momentum: SGD's momentum; ignored by AdamW, whose first-moment decay is ``betas[0]``.
        weight_decay: SGD's L2 penalty (added to the gradient) or AdamW's decoupled decay (``lr * wd`` of
            each weight per step).
        betas: AdamW's moment decays.

    Raises:
        ValueError: an unknown ``name``.
    """
    params = list(params)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adamw":
        # torch's fused kernel (one pass per tensor) on CPUs and CUDA: 15.6 ms a step for PAA R50-FPN's 32 M
        # trainable weights on 2 CPU threads, against 97.6 ms for the default per-tensor loop (docs/standin.md)
        fused = bool(params) and all(p.device.type in FUSED_DEVICES for p in params)
        return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay, fused=fused or None)
    raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
