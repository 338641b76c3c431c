"""Hooks into a training run: code that runs at fixed points of the loop, given the trainer.

Pass them as ``train(config, hooks=[...])``. Each hook subclasses :class:`TrainHook` and overrides the points
it needs; the trainer (:class:`paadet.train.loop.Trainer`) gives access to the run's state (``trainer.state``:
iteration, epoch, batch), its network (``trainer.net``), its process (``trainer.dist.rank``) and its output
folder (``trainer.out``). Hooks run on every rank of a DDP run, in the order given.

For example, a hook that stops a run hard at a chosen iteration (as a crashed machine would), which the
tests use to check that ``--resume`` continues bit for bit::

    class KillAt(TrainHook):
        def after_step(self, trainer, row):
            if trainer.state.iteration == 5:
                os.kill(os.getpid(), signal.SIGKILL)
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

from torch import nn

from paadet.train.checkpointer import TrainState
from paadet.train.config import TrainConfig
from paadet.train.ddp import Distributed
from paadet.train.summary import TrainSummary


class Trainer(Protocol):
    """What a hook sees of the trainer (:class:`paadet.train.loop.Trainer`)."""

    config: TrainConfig
    state: TrainState
    net: nn.Module
    dist: Distributed
    out: Path


class TrainHook:
    """A hook into a training run; every method is a no-op here."""

    def before_train(self, trainer: Trainer) -> None:
        """Once, before the first iteration of this call (after a resume has restored the state)."""

    def after_step(self, trainer: Trainer, row: dict[str, Any]) -> None:
        """After each optimiser step, with its metrics row (``iter``, ``epoch``, ``lr``, the losses, ``files``...)."""

    def after_epoch(self, trainer: Trainer) -> None:
        """After each finished epoch, once its checkpoint (and validation, when due) is done."""

    def after_train(self, trainer: Trainer, summary: TrainSummary) -> None:
        """Once, when the run ends normally (every epoch, ``max_iters``, or nothing to do)."""


class Hooks(TrainHook):
    """Several hooks called in order, as one."""

    def __init__(self, hooks: Iterable[TrainHook] = ()) -> None:
        self.hooks: Sequence[TrainHook] = tuple(hooks)
        for hook in self.hooks:
            if not isinstance(hook, TrainHook):
                raise TypeError(f"hooks must be TrainHook instances, got {type(hook).__name__}")

    def before_train(self, trainer: Trainer) -> None:
        for hook in self.hooks:
            hook.before_train(trainer)

    def after_step(self, trainer: Trainer, row: dict[str, Any]) -> None:
        for hook in self.hooks:
            hook.after_step(trainer, row)

    def after_epoch(self, trainer: Trainer) -> None:
        for hook in self.hooks:
            hook.after_epoch(trainer)

    def after_train(self, trainer: Trainer, summary: TrainSummary) -> None:
        for hook in self.hooks:
            hook.after_train(trainer, summary)
