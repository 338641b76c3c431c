"""``paadet train`` with test hooks: ``python tests/train_with_hooks.py [--kill-at RANK:ITER] [--dump-weights DIR] --
train FLAGS...`` (run under torchrun by tests/test_train_ddp.py).

The hooks reach inside the run through :class:`paadet.train.TrainHook`, as a user's hooks would: ``--kill-at``
SIGKILLs rank ``RANK`` right after its iteration ``ITER`` (no cleanup, as a crashed machine), ``--dump-weights``
makes each rank save its network's ``state_dict`` to ``DIR/rank<r>.pt`` when the run ends.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

import torch

from paadet.cli import build_parser
from paadet.commands.train import config_from_args
from paadet.train import TrainHook, train


class KillAt(TrainHook):
    def __init__(self, rank: int, iteration: int) -> None:
        self.rank, self.iteration = rank, iteration

    def after_step(self, trainer, row) -> None:
        if (trainer.dist.rank, trainer.state.iteration) == (self.rank, self.iteration):
            os.kill(os.getpid(), signal.SIGKILL)


class DumpWeights(TrainHook):
    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def after_train(self, trainer, summary) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu() for k, v in trainer.net.state_dict().items()}
        torch.save(state, self.folder / f"rank{trainer.dist.rank}.pt")


def main(argv: list[str]) -> int:
    split = argv.index("--")
    own = argparse.ArgumentParser()
    own.add_argument("--kill-at", default=None, help="RANK:ITER")
    own.add_argument("--dump-weights", default=None, type=Path)
    options = own.parse_args(argv[:split])
    args = build_parser("train", all_commands=False).parse_args(argv[split + 1 :])
    hooks: list[TrainHook] = []
    if options.kill_at:
        rank, iteration = (int(v) for v in options.kill_at.split(":"))
        hooks.append(KillAt(rank, iteration))
    if options.dump_weights is not None:
        hooks.append(DumpWeights(options.dump_weights))
    summary = train(config_from_args(args), hooks=hooks)
    if summary.rank == 0:
        print(summary.line())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
