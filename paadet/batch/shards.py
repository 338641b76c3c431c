"""The driver's bookkeeping of a batch run: the shards to hand out (retried, then split, when they fail), the
default shard size, and what each worker and the whole run did."""

from __future__ import annotations

import collections
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from paadet.batch.output import ERRORS_FILE

MAX_SHARD_SIZE = 64
"""The default shard size on a large input (see :func:`default_shard_size`)."""
SHARDS_PER_WORKER = 4
"""On a small input the default shard size gives each worker about this many shards."""


def default_shard_size(images: int, workers: int) -> int:
    """``min(64, ceil(images / (4 * workers)))``, at least 1: 64 images a shard on a large input, and on a
    small one about four shards per worker, so that no worker sits idle and the last shards even out."""
    return max(1, min(MAX_SHARD_SIZE, math.ceil(images / (SHARDS_PER_WORKER * max(workers, 1)))))


# --- the queue of shards --------------------------------------------------------------------------


@dataclass
class Failure:
    """What :meth:`ShardQueue.failed` decided about a failed shard."""

    action: str
    """``retry`` (whole, at the front of the queue), ``split`` (into ``parts``, at the front) or ``give_up``."""
    attempts: int
    parts: list[int] = field(default_factory=list)
    drop_worker: bool = False
    """The worker failed on ``drop_after`` different shards in a row: take it out of the pool."""


class ShardQueue:
    """The shards still to do, and what to do when one fails (no Ray here: the policy alone).

    A failed shard is retried whole once (a killed worker or a lost node costs one retry); if it fails
    again it is split in two halves, each a new shard, and so on down to single images, so that an
    image that kills its worker (or that the network cannot take) costs its neighbours only retries.
    A single image is tried ``max_attempts`` times before it is given up (left for a re-run). A worker
    is dropped from the pool after failing on ``drop_after`` (default ``max(2, max_attempts)``)
    different shards in a row; the halves of one shard count as that shard, so one bad image never
    drops a worker.
    """

    def __init__(self, shards: dict[int, list], max_attempts: int, drop_after: int | None = None) -> None:
        self.items: dict[int, list] = dict(shards)
        self.pending: collections.deque[int] = collections.deque(sorted(shards))
        self.attempts: collections.Counter = collections.Counter()
        self.max_attempts = max_attempts
        self.drop_after = max(2, max_attempts) if drop_after is None else drop_after
        self.next_number = max(shards, default=-1) + 1
        self._origin: dict[int, int] = {s: s for s in shards}
        self._streak: dict[Any, set[int]] = collections.defaultdict(set)

    def __len__(self) -> int:
        return len(self.pending)

    def pop(self) -> int:
        return self.pending.popleft()

    def succeeded(self, shard: int, worker: Any) -> None:
        self._streak[worker].clear()

    def failed(self, shard: int, worker: Any) -> Failure:
        self.attempts[shard] += 1
        attempts = self.attempts[shard]
        streak = self._streak[worker]
        streak.add(self._origin[shard])
        drop = len(streak) >= self.drop_after
        items = self.items[shard]
        if len(items) > 1 and attempts >= min(2, self.max_attempts):
            half = (len(items) + 1) // 2
            parts = []
            for chunk in (items[:half], items[half:]):
                number = self.next_number
                self.next_number += 1
                self.items[number] = chunk
                self._origin[number] = self._origin[shard]
                parts.append(number)
            self.pending.extendleft(reversed(parts))
            return Failure("split", attempts, parts, drop)
        if attempts < self.max_attempts:
            self.pending.appendleft(shard)
            return Failure("retry", attempts, drop_worker=drop)
        return Failure("give_up", attempts, drop_worker=drop)


# --- reports --------------------------------------------------------------------------------------


@dataclass
class WorkerStats:
    """What one worker of the pool did in this run."""

    worker: int
    images: int = 0
    shards: int = 0
    busy_s: float = 0.0
    failures: int = 0
    pids: set[int] = field(default_factory=set)
    node: str = ""

    def line(self, wall_s: float) -> str:
        return (
            f"worker {self.worker} ({self.node}): {self.images} images in {self.shards} shards, "
            f"{self.images / wall_s if wall_s > 0 else 0.0:.2f} img/s after start-up, "
            f"{self.images / self.busy_s if self.busy_s > 0 else 0.0:.2f} img/s busy, "
            f"{self.failures} failed tasks, {max(len(self.pids) - 1, 0)} restarts"
        )


@dataclass
class ShardDone:
    """Passed to ``on_shard_done`` after each commit."""

    shard: int
    images: int
    worker: int
    pid: int
    node: str
    committed: int
    """Shards committed so far in this run (this one included)."""


@dataclass
class BatchSummary:
    """Totals of a run (also written to ``summary.json``)."""

    total: int
    already_done: int
    processed: int
    detected: int
    errors: int
    errors_listed: int
    failed: int
    retries: int
    wall_s: float
    startup_s: float
    workers: list[WorkerStats]
    output_dir: str
    coco_output: str | None = None
    shard_size: int | None = None
    """Images per shard in this run (None when there was nothing to do)."""

    @property
    def images_per_s(self) -> float:
        """Images per second over the wall time, worker start-up included."""
        return self.processed / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def steady_images_per_s(self) -> float:
        """Images per second once every worker had loaded its model."""
        running = self.wall_s - self.startup_s
        return self.processed / running if running > 0 else 0.0

    def lines(self) -> list[str]:
        """The report printed at the end of a run."""
        shards = f", shards of {self.shard_size} image{'' if self.shard_size == 1 else 's'}" if self.shard_size else ""
        out = [
            f"{self.total} inputs: {self.already_done} done before, {self.processed} processed now "
            f"({self.detected} with detections run, {self.errors} unreadable), {self.failed} failed; "
            f"{self.retries} shard retries",
            f"wall time {self.wall_s:.1f} s ({self.startup_s:.1f} s starting workers): {self.images_per_s:.2f} img/s, "
            f"{self.steady_images_per_s:.2f} img/s after start-up, {len(self.workers)} workers{shards}",
        ]
        out += ["  " + w.line(self.wall_s - self.startup_s) for w in self.workers]
        if self.errors_listed:
            out.append(f"unreadable images: {self.errors_listed}, listed in {Path(self.output_dir) / ERRORS_FILE}")
        if self.coco_output:
            out.append(f"wrote {self.coco_output}")
        return out

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["images_per_s"] = self.images_per_s
        data["steady_images_per_s"] = self.steady_images_per_s
        data["workers"] = [{**dataclasses.asdict(w), "pids": sorted(w.pids)} for w in self.workers]
        return data
