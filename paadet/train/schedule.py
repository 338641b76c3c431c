"""The learning-rate schedule of mmdetection's ``schedule_1x``: linear warm-up by iteration, steps by epoch.

mmengine 0.10's ``LinearLR(start_factor=r, by_epoch=False, begin=0, end=W)`` and
``MultiStepLR(milestones, gamma, by_epoch=True)`` are chainable schedulers: each multiplies the
optimizer's current lr by its own ratio at every step, so their product is, in closed form,

    lr(t, e) = base_lr * warmup(t) * gamma ** #{m in milestones : m <= e}

where ``t`` is the 0-based global iteration and ``e`` the 0-based epoch of that iteration, and
``warmup(t) = r + (1 - r) * t / (W - 1)`` for ``t < W`` (mmengine's ``total_iters = end - begin - 1``),
1 afterwards. With the recipe (``W = 500``, ``r = 0.001``, milestones 8, 11): iteration 0 runs at
``1e-5``, iteration 499 at the full ``0.01``; epochs 9-11 (1-based) at ``1e-3`` and epoch 12 at ``1e-4``.

mmengine's repeated multiplications round differently from the closed form in the last bits (about
1e-16 relative); the closed form is used here because it depends only on ``(t, e)``, so a resumed run
sets the same lr as an uninterrupted one by construction.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["LRSchedule", "set_lr"]


@dataclass(frozen=True)
class LRSchedule:
    """The lr at each iteration.

    Attributes:
        base_lr: the lr after warm-up, before any step (0.01 for 16 images per iteration).
        warmup_iters: iterations of linear warm-up (``LinearLR``'s ``end``; 0: none).
        warmup_ratio: the warm-up's start factor (``LinearLR``'s ``start_factor``).
        milestones: epochs (count of completed epochs) after which the lr is multiplied by ``gamma``.
        gamma: the step factor.
    """

    base_lr: float = 0.01
    warmup_iters: int = 500
    warmup_ratio: float = 0.001
    milestones: tuple[int, ...] = (8, 11)
    gamma: float = 0.1

    def __post_init__(self) -> None:
        if self.base_lr < 0:
            raise ValueError(f"base_lr must be >= 0, got {self.base_lr}")
        if self.warmup_iters < 0:
            raise ValueError(f"warmup_iters must be >= 0, got {self.warmup_iters}")
        if not 0.0 <= self.warmup_ratio <= 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1] (mmengine's start_factor), got {self.warmup_ratio}")
        if any(m < 1 for m in self.milestones) or list(self.milestones) != sorted(self.milestones):
            raise ValueError(f"milestones must be increasing epochs >= 1, got {list(self.milestones)}")

    def warmup_factor(self, iteration: int) -> float:
        """``LinearLR``'s factor at 0-based ``iteration``: ``r + (1 - r) * t / (W - 1)`` for ``t < W``, else 1."""
        if iteration >= self.warmup_iters:
            return 1.0
        if self.warmup_iters == 1:  # total_iters 0: mmengine sets the start factor at step 0 only
            return self.warmup_ratio
        return self.warmup_ratio + (1.0 - self.warmup_ratio) * iteration / (self.warmup_iters - 1)

    def step_factor(self, epoch: int) -> float:
        """``MultiStepLR``'s factor during 0-based ``epoch``: ``gamma`` per milestone ``<= epoch``."""
        return self.gamma ** sum(1 for m in self.milestones if m <= epoch)

    def lr_at(self, iteration: int, epoch: int) -> float:
        """The lr of 0-based global ``iteration``, which runs in 0-based ``epoch``."""
        if iteration < 0 or epoch < 0:
            raise ValueError(f"iteration and epoch must be >= 0, got {iteration} and {epoch}")
        return self.base_lr * self.warmup_factor(iteration) * self.step_factor(epoch)

    def state_dict(self) -> dict[str, float | int | list[int]]:
        """Plain values (for a checkpoint's ``scheduler`` entry)."""
        return {
            "base_lr": self.base_lr,
            "warmup_iters": self.warmup_iters,
            "warmup_ratio": self.warmup_ratio,
            "milestones": list(self.milestones),
            "gamma": self.gamma,
        }


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every parameter group's lr."""
    for group in optimizer.param_groups:
        group["lr"] = lr
