"""``paadet train --nproc N``: train with N processes on this machine through torchrun's elastic launcher.

The launcher is apart from the loop (:mod:`paadet.train.loop`) and from the process group
(:mod:`paadet.train.ddp`): each process it starts calls :func:`paadet.train.train`, which joins the group.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

from paadet.train.config import TrainConfig, TrainingError
from paadet.train.signals import TrainingTerminated


def _shortcut_worker(config: TrainConfig) -> str:
    """One process of :func:`launch_local` (module level, so that ``spawn`` can import it)."""
    from paadet.train.setup import train

    return train(config).line()


def launch_local(config: TrainConfig, nproc: int) -> str:
    """Train with ``nproc`` processes on this machine through torchrun's elastic launcher
    (``torch.distributed.run``'s engine, standalone rendezvous on a free port); returns rank 0's summary line.

    Each process gets ``max(1, cpu_count // nproc)`` CPU threads unless ``config.threads`` or
    ``OMP_NUM_THREADS`` says otherwise. Raises :class:`TrainingError` naming the failed ranks, and
    ``KeyboardInterrupt`` / :class:`~paadet.train.signals.TrainingTerminated` when Ctrl-C / SIGTERM reached this
    process (the launcher passes the signal on to the workers, which stop and save as one).
    """
    import dataclasses
    import uuid

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if config.threads is None and "OMP_NUM_THREADS" not in os.environ:
        config = dataclasses.replace(config, threads=max(1, (os.cpu_count() or 1) // nproc))
    launch = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=f"paadet-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",
        max_restarts=0,
        start_method="spawn",
    )
    try:
        results = elastic_launch(launch, _shortcut_worker)(config)
    except SignalException as exc:  # Ctrl-C / SIGTERM reached the launcher: the workers stopped (rank 0 saved first)
        if exc.sigval == signal.SIGTERM:
            raise TrainingTerminated from None
        raise KeyboardInterrupt from None
    except ChildFailedError as exc:
        failed = ", ".join(f"rank {rank} (exit code {f.exitcode})" for rank, f in sorted(exc.failures.items()))
        saved = (Path(config.output_dir) / "latest.pth").is_file()
        hint = "continue with --resume" if saved else "nothing was saved; see the processes' errors above"
        raise TrainingError(f"the training processes failed: {failed}; {hint}") from None
    return str(results[0])
