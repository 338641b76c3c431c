"""Stopping a training run on request: Ctrl-C (SIGINT) and SIGTERM, the signal that Kubernetes, SLURM pre-emption
and torchrun send to stop a process.

:class:`StopRequest` is installed by :meth:`paadet.train.loop.Trainer.run` (main thread only) for the loop's
duration. The first SIGINT or SIGTERM asks the loop to stop after the current iteration; the loop then saves
``latest.pth`` (atomically) and raises ``KeyboardInterrupt`` (Ctrl-C, exit 130) or :class:`TrainingTerminated`
(SIGTERM, exit 143). A second Ctrl-C aborts at once without saving; further SIGTERMs are ignored (the save
goes on: a supervisor that will not wait sends SIGKILL).

Under DDP (``deferred``) a signal only makes the stop ``pending`` on the rank that got it; the ranks agree
on it before the next step (:meth:`paadet.train.ddp.Distributed.agree_step`), so that every rank stops
after the same iteration and rank 0 alone saves, whichever ranks got the signal.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from typing import Any

__all__ = ["StopRequest", "TrainingTerminated"]


class TrainingTerminated(KeyboardInterrupt):
    """SIGTERM stopped the run, after ``latest.pth`` was saved (``paadet train`` exits 143, 128 + SIGTERM).

    A ``KeyboardInterrupt``, so that code that handles Ctrl-C handles it too."""


class StopRequest:
    """The stop requests of a run (see the module docstring).

    Attributes:
        pending: a SIGINT or SIGTERM arrived (on this rank).
        requested: the loop must stop after the current iteration (under DDP: once the ranks agreed).
        terminated: the stop came from a SIGTERM (on some rank, once agreed).
    """

    REPEAT_S = 2.0
    """Under DDP a repeated Ctrl-C within this time is the same one (torchrun forwards the terminal's SIGINT to
    workers that got it already)."""

    def __init__(self, log: Callable[[str], None], deferred: bool = False) -> None:
        self.requested = self.pending = self.terminated = False
        self.deferred, self._first = deferred, 0.0
        self.log = log
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        now = time.monotonic()
        if self.pending or self.requested:
            if signum == signal.SIGTERM:  # already stopping: let the save finish
                self.terminated = True
                return
            if self.deferred and now - self._first < self.REPEAT_S:
                return
            raise KeyboardInterrupt
        self.pending, self._first = True, now
        self.terminated = signum == signal.SIGTERM
        self.requested = not self.deferred
        if self.terminated:
            self.log("terminated (SIGTERM): stopping after this iteration to save latest.pth")
        else:
            self.log(
                "interrupt: stopping after this iteration to save latest.pth (Ctrl-C again to abort without saving)"
            )

    def agreed(self, any_stop: bool, any_terminated: bool) -> None:
        """DDP: what the ranks agreed on (some rank has a pending stop, some rank got a SIGTERM)."""
        self.requested = self.requested or any_stop
        self.terminated = self.terminated or any_terminated

    def interruption(self) -> KeyboardInterrupt:
        """The exception to raise once ``latest.pth`` is saved."""
        return TrainingTerminated() if self.terminated else KeyboardInterrupt()

    def __exit__(self, *exc: Any) -> None:
        for signum, previous in self._previous.items():
            if previous is not None:
                signal.signal(signum, previous)
        self._previous.clear()
