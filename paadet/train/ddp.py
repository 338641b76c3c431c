"""Data-parallel training with PyTorch's DDP, launched by ``torchrun`` (the standard engine, not our own).

``torchrun --nproc-per-node N [--nnodes M --rdzv-backend c10d --rdzv-endpoint HOST:PORT] -m paadet train ...``
starts N processes per machine; each reads ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` from its
environment, joins the process group (NCCL on ``cuda:LOCAL_RANK``, gloo on the CPU, with a timeout
so that no collective waits forever) and trains a ``DistributedDataParallel`` copy of the network:

* **Data**: rank ``r`` takes its shard of the seeded epoch order, ``DistributedSampler`` semantics
  (the same permutation on every rank, padded by repetition, ``indices[r::world_size]``; see
  :func:`paadet.train.loader.epoch_indices`), so ``--batch-size`` is per process and every rank runs
  the same number of batches per epoch. A resumed run starts each rank at the same batch of its shard.
* **Loss**: each rank computes :class:`~paadet.train.loss.PAALoss` on its own batch, unchanged (PAAHead
  has no ``reduce_mean``: ``num_pos`` and the other normalisers are per GPU, as in mmdetection); DDP
  averages the gradients, so every rank takes the same SGD step.
* **BatchNorm**: frozen by default (the recipe), so the ranks' statistics never change. With
  ``--bn-train`` each rank normalises with its own batch's statistics and updates its own running
  statistics (``broadcast_buffers=False``, mmengine's default; no SyncBatchNorm): those of rank 0 are the
  ones validated and saved, and a resumed run starts every rank from them. The other ranks' running
  statistics are never used (training normalises with batch statistics).
* **Agreement**: two small all-reduces per iteration. Before the forward pass
  (:meth:`Distributed.agree_step`): whether each rank's batch held a readable image (when one did not,
  every rank skips that step, so DDP's collectives stay paired) and a pending Ctrl-C or SIGTERM
  (:mod:`paadet.train.signals`: every rank stops after the same iteration, and rank 0 alone saves, once,
  whichever ranks got the signal; torchrun gives the workers 30 s before it kills them).
  Before the backward pass (:meth:`Distributed.agree_losses`): the losses (a non-finite loss on any rank
  stops every rank before the weights change), the positives and the images.
* **Outputs**: rank 0 alone writes the checkpoints (the unwrapped module's ``state_dict``, mmdetection's
  key names), ``metrics.jsonl`` (the losses averaged over the ranks, ``num_pos`` summed; ``files`` and
  ``num_pos_per_image`` are rank 0's batch), ``metrics.png`` and the progress bar, and runs the
  validation; the others wait for it at a barrier (so ``--dist-timeout`` must exceed a validation) and
  log only warnings, prefixed ``[rank r]``. The RNG states saved are rank 0's: training draws nothing
  from the global generators (the order and the flips are functions of the seed, the epoch and the
  index), so nothing per rank is needed. The world size is recorded in the settings; resuming with
  another one is refused (it changes the batches and so the result).
* **Failures**: a rank that dies makes ``torchrun`` stop the others (its default ``max_restarts=0``);
  every collective has the process group's timeout as a last resort; ``--resume`` continues from the
  last ``latest.pth`` (on a shared file system when several machines train).

The launcher of ``paadet train --nproc N`` (torchrun's engine on this machine) is :mod:`paadet.train.launch`.
"""

from __future__ import annotations

import inspect
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from paadet.train.config import TrainingError

__all__ = ["Agreement", "DistEnv", "Distributed", "NullMetrics", "start_distributed"]


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the run, from torchrun's ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` (absent: one
    process)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> DistEnv:
        """Read the variables; raises :class:`TrainingError` (one line) for inconsistent ones."""
        environ = os.environ if environ is None else environ
        names = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
        if "WORLD_SIZE" not in environ:
            return cls()
        try:
            rank, world, local = (int(environ.get(name, "0")) for name in names)
        except ValueError:
            raise TrainingError(
                "RANK, WORLD_SIZE and LOCAL_RANK must be integers, got "
                + ", ".join(f"{n}={environ.get(n)!r}" for n in names)
            ) from None
        if world < 1 or not 0 <= rank < world or local < 0:
            raise TrainingError(f"inconsistent torchrun environment: RANK={rank} WORLD_SIZE={world} LOCAL_RANK={local}")
        return cls(rank, world, local)


@dataclass
class Agreement:
    """The ranks' losses for one iteration (see :meth:`Distributed.agree_losses`).

    Attributes:
        finite: every rank's losses are finite.
        losses: ``loss, loss_cls, loss_bbox, loss_iou`` averaged over the ranks.
        num_pos: positives summed over the ranks.
        images: images summed over the ranks.
    """

    finite: bool
    losses: tuple[float, float, float, float]
    num_pos: int
    images: int


class Distributed:
    """The run's process group (or none, for one process: then nothing here communicates).

    Attributes:
        env: the rank, world size and local rank.
        device: this process's device (``cuda:LOCAL_RANK`` under DDP on GPUs).
        backend: ``nccl``, ``gloo`` or None (one process).
    """

    def __init__(self, env: DistEnv, device: torch.device, backend: str | None) -> None:
        self.env, self.device, self.backend = env, device, backend

    @property
    def active(self) -> bool:
        return self.backend is not None

    @property
    def rank(self) -> int:
        return self.env.rank

    @property
    def world_size(self) -> int:
        return self.env.world_size

    @property
    def is_main(self) -> bool:
        return self.env.rank == 0

    def wrap(self, net: nn.Module) -> nn.Module:
        """``net`` (already on :attr:`device`) as DDP (averaging gradients); ``net`` itself for one process."""
        if not self.active:
            return net
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        # no buffer broadcast before each forward pass (mmengine's default); the name changed in torch 2.13
        params = inspect.signature(nn.parallel.DistributedDataParallel).parameters
        no_sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}
        return nn.parallel.DistributedDataParallel(net, device_ids=device_ids, **no_sync)

    def _sum(self, values: Sequence[float]) -> list[float]:
        """``values`` summed over the ranks (one all-reduce, float64)."""
        if not self.active:
            return list(values)
        tensor = torch.tensor(list(values), dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor.cpu().tolist()

    def agree_step(self, has_batch: bool, stop: bool, terminated: bool) -> tuple[bool, bool, bool]:
        """Before the forward pass: ``(every rank has a batch, some rank has a pending stop, some rank's stop
        came from a SIGTERM)`` (one all-reduce)."""
        total = self._sum([float(has_batch), float(stop), float(terminated)])
        return round(total[0]) == self.world_size, total[1] > 0, total[2] > 0

    def agree_losses(self, losses: Sequence[float], num_pos: int, images: int) -> Agreement:
        """Before the backward pass: the losses averaged over the ranks (a NaN or inf on any rank makes
        them non-finite), the positives and the images summed."""
        total = self._sum([*losses, float(num_pos), float(images)])
        world = self.world_size
        finite = all(map(math.isfinite, total[:4]))
        return Agreement(
            finite=finite,
            losses=tuple(v / world for v in total[:4]),  # type: ignore[arg-type]
            num_pos=round(total[4]) if finite else 0,
            images=round(total[5]),
        )

    def barrier(self) -> None:
        """Wait for every rank (no-op for one process); bounded by the process group's timeout."""
        if self.active:
            if self.backend == "nccl":
                dist.barrier(device_ids=[self.device.index])
            else:
                dist.barrier()

    def rank_log(self, log: Callable[[str], None]) -> Callable[[str], None]:
        """``log`` on rank 0; on the others only warnings, prefixed with the rank."""
        if self.is_main:
            return log
        rank = self.rank

        def warnings_only(message: str) -> None:
            if message.startswith("warning"):
                log(f"[rank {rank}] {message}")

        return warnings_only

    def close(self) -> None:
        """Leave the process group (after an error too: no collective is waited for)."""
        if self.active and dist.is_initialized():
            dist.destroy_process_group()


def start_distributed(device: str, timeout_s: float, environ: Mapping[str, str] | None = None) -> Distributed:
    """Join torchrun's process group when ``WORLD_SIZE`` > 1 (else: one process, no group).

    Args:
        device: the run's ``--device``: ``cpu`` (gloo) or ``cuda`` (NCCL; each process takes
            ``cuda:LOCAL_RANK``; an explicit ``cuda:N`` is refused under DDP).
        timeout_s: the process group's timeout: the longest any collective (a barrier during rank 0's
            validation included) waits before the run fails.

    Raises:
        TrainingError: a bad environment or device (one line).
    """
    from paadet.runtime.torch_backend import resolve_device

    env = DistEnv.from_env(environ)
    dev = resolve_device(device)
    if env.world_size == 1:
        return Distributed(env, dev, None)
    if dev.type == "cuda":
        if dev.index is not None:
            raise TrainingError(
                f"--device {device}: under torchrun give --device cuda (each process takes cuda:LOCAL_RANK)"
            )
        if env.local_rank >= torch.cuda.device_count():
            raise TrainingError(
                f"LOCAL_RANK {env.local_rank} but only {torch.cuda.device_count()} CUDA devices are "
                f"visible: start at most that many processes per machine (--nproc-per-node)"
            )
        dev = torch.device("cuda", env.local_rank)
        torch.cuda.set_device(dev)
        backend = "nccl"
    else:
        backend = "gloo"
    if "MASTER_ADDR" not in (environ if environ is not None else os.environ):
        raise TrainingError(f"WORLD_SIZE={env.world_size} but no MASTER_ADDR: start the processes with torchrun")
    kwargs: dict[str, Any] = {"device_id": dev} if backend == "nccl" else {}
    dist.init_process_group(
        backend, rank=env.rank, world_size=env.world_size, timeout=timedelta(seconds=timeout_s), **kwargs
    )
    return Distributed(env, dev, backend)


class NullMetrics:
    """The metrics log of ranks other than 0: rows are dropped (rank 0 writes ``metrics.jsonl``)."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def append(self, row: dict[str, Any]) -> None:
        pass

    def sync(self) -> None:
        pass

    def close(self) -> None:
        pass
