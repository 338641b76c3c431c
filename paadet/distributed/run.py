"""A batch run: the driver's queue of shards over the pool of workers, each finished shard committed."""
from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from ..errors import one_line
from ..fileio import OutputPathError, atomic_write_json, atomic_write_text, check_output_dir, check_output_file
from .cluster import DEFAULT_START_TIMEOUT, cluster_capacity, connect, reason, require_ray, start_workers, worker_need
from .errors import BatchError
from .inputs import expand_inputs, input_key, listing_error
from .model import ModelSpec, weights_identity
from .worker import weights_stat
from .output import ERRORS_FILE, LOCK_FILE, RUN_FILE, SUMMARY_FILE, OutputFolder, merge_coco

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
        return (f"worker {self.worker} ({self.node}): {self.images} images in {self.shards} shards, "
                f"{self.images / wall_s if wall_s > 0 else 0.0:.2f} img/s after start-up, "
                f"{self.images / self.busy_s if self.busy_s > 0 else 0.0:.2f} img/s busy, "
                f"{self.failures} failed tasks, {max(len(self.pids) - 1, 0)} restarts")


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


def _warn(message: str) -> None:
    print(f"paadet batch: {message}", file=sys.stderr)


# --- the run --------------------------------------------------------------------------------------


def check_settings(
    num_workers: int | None,
    cpus_per_worker: float,
    gpus_per_worker: float | None,
    shard_size: int | None,
    max_attempts: int,
    start_timeout: float,
) -> None:
    """The checks argparse makes on the command's flags, for callers of :func:`run_batch`.

    Raises:
        ValueError: a setting out of range; the message names its flag.
    """
    def bad(flag: str, value: Any, rule: str) -> ValueError:
        return ValueError(f"{flag} must be {rule}, got {value}")

    for flag, value in (("--num-workers", num_workers), ("--shard-size", shard_size), ("--max-attempts", max_attempts)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise bad(flag, value, "an integer >= 1")
    if not cpus_per_worker > 0:  # NaN fails too
        raise bad("--cpus-per-worker", cpus_per_worker, "> 0")
    if gpus_per_worker is not None:
        if not gpus_per_worker >= 0:
            raise bad("--gpus-per-worker", gpus_per_worker, ">= 0")
        if gpus_per_worker > 1 and gpus_per_worker != int(gpus_per_worker):
            raise bad("--gpus-per-worker", gpus_per_worker, "a whole number when above 1 (Ray's rule)")
    if not start_timeout > 0:
        raise bad("--start-timeout", start_timeout, "> 0")


def check_outputs(
    inputs: Sequence[str | os.PathLike],
    output_dir: str | os.PathLike,
    coco_output: str | os.PathLike | None,
) -> None:
    """The output folder and the COCO file can be written and are none of the inputs (before any work).

    Raises:
        OutputPathError: one line naming the path and the flag.
    """
    check_output_dir(output_dir, "--output-dir", inputs)
    if coco_output is not None:
        check_output_file(coco_output, "--coco", inputs)
        coco = Path(os.path.realpath(coco_output))
        if coco.parent == Path(os.path.realpath(output_dir)) and coco.name in (RUN_FILE, ERRORS_FILE, SUMMARY_FILE, LOCK_FILE):
            raise OutputPathError(f"{coco_output}: --coco would overwrite the output folder's own {coco.name}")


def run_batch(
    inputs: Sequence[str | os.PathLike],
    output_dir: str | os.PathLike,
    spec: ModelSpec,
    address: str | None = None,
    num_workers: int | None = None,
    cpus_per_worker: float = 1.0,
    gpus_per_worker: float | None = None,
    shard_size: int | None = None,
    max_attempts: int = 3,
    coco_output: str | os.PathLike | None = None,
    progress: bool = True,
    on_shard_done: Callable[[ShardDone], None] | None = None,
    start_timeout: float = DEFAULT_START_TIMEOUT,
) -> BatchSummary:
    """Detect on every image of ``inputs`` with a pool of Ray actors; write sharded results to ``output_dir``.

    Before any work (before Ray starts) the settings, the output paths and the weights file are
    checked and the weights hashed; a folder whose results came from other settings or other weights
    is refused.

    Args:
        inputs: image files, folders and ``.txt`` lists of image paths (:func:`expand_inputs`).
        output_dir: output folder; a run with the same folder does only the inputs not yet covered.
        spec: the model each worker loads.
        address: Ray cluster to join (``auto``, ``HOST:PORT``, ``ray://...``); None starts a local
            instance. When Ray is already initialised in this process, that instance is used.
        num_workers: actors in the pool; default: as many as the cluster's nodes hold (each worker's
            CPUs and GPUs on one node); more than that is cut to that, with a warning.
        cpus_per_worker: CPUs reserved per actor (also its torch threads).
        gpus_per_worker: GPUs per actor; default 1 when ``spec.device`` is CUDA, else 0.
        shard_size: images per shard (the unit of work, commit and retry); default
            :func:`default_shard_size` of the images to do and the workers.
        max_attempts: tries per image before it is reported as failed (left for a re-run); see
            :class:`ShardQueue` for how failed shards are retried and split.
        coco_output: also write the COCO results JSON of all inputs, as ``paadet predict`` does.
        progress: show a progress bar.
        on_shard_done: called after each shard is committed (for monitoring and fault-injection tests).
        start_timeout: seconds to wait for Ray to start the workers (a cluster whose resources are
            taken); the model loading that follows has no deadline.

    Raises:
        ValueError: a setting out of range. OutputPathError: an output path that cannot be written or
        is an input. BatchError: the folder holds other results, the cluster cannot hold a worker,
        no worker started in time, or every worker failed.

    Returns:
        The run's :class:`BatchSummary`, also written to ``summary.json``.
    """
    check_settings(num_workers, cpus_per_worker, gpus_per_worker, shard_size, max_attempts, start_timeout)
    if gpus_per_worker is None:
        gpus_per_worker = 1.0 if spec.device.startswith("cuda") else 0.0
    check_outputs(inputs, output_dir, coco_output)
    sources = expand_inputs(inputs)
    if coco_output is not None and os.path.abspath(coco_output) in {input_key(s) for s in sources}:
        raise OutputPathError(f"{coco_output}: --coco is one of the inputs; refusing to overwrite it")
    stat = weights_stat(spec.weights_file) if spec.weights_file is not None else None
    weights = weights_identity(spec)
    check = (*stat, weights["sha256"]) if stat is not None and weights is not None else None
    folder = OutputFolder(output_dir)
    with folder.locked():
        folder.check_run(spec.fingerprint(), weights)
        committed = folder.manifests(warn=_warn)
        folder.remove_uncommitted(committed)
        done_keys = {path for m in committed for path, _ in m.inputs}
        todo = [(input_key(s), s.file_name, listing_error(s)) for s in sources if input_key(s) not in done_keys]
        already_done = len(sources) - len(todo)
        start_time = time.perf_counter()
        stats: dict[int, WorkerStats] = {}
        counts: collections.Counter = collections.Counter()
        if todo:
            _run_pool(folder, todo, folder.next_shard(), spec, address, num_workers, cpus_per_worker, gpus_per_worker,
                      shard_size, max_attempts, start_timeout, progress, on_shard_done, already_done, len(sources),
                      stats, counts, check)
        wall = time.perf_counter() - start_time
        manifests = folder.manifests(warn=_warn)
        wanted = {input_key(s) for s in sources}
        seen: set[str] = set()
        error_lines = []
        for manifest in manifests:
            for error in manifest.errors:
                if error["path"] in wanted and error["path"] not in seen:
                    seen.add(error["path"])
                    error_lines.append(json.dumps(error) + "\n")
        atomic_write_text(folder.root / ERRORS_FILE, "".join(error_lines))
        if coco_output is not None:
            from ..runtime.classes import model_classes

            classes = model_classes(spec.backend, spec.checkpoint, spec.model)
            atomic_write_json(coco_output, merge_coco(folder.root, sources, classes.category_ids))
        summary = BatchSummary(
            total=len(sources), already_done=already_done, processed=counts["images"], detected=counts["detected"],
            errors=counts["errors"], errors_listed=len(error_lines), failed=counts["failed"],
            retries=counts["retries"], wall_s=wall,
            startup_s=counts["startup_ms"] / 1000.0,
            workers=[stats[i] for i in sorted(stats)], output_dir=str(folder.root),
            coco_output=str(coco_output) if coco_output is not None else None,
            shard_size=counts["shard_size"] or None,
        )
        atomic_write_json(folder.root / SUMMARY_FILE, summary.to_json(), indent=1)
    return summary


def _names(items: list, most: int = 3) -> str:
    names = [str(item[1]) for item in items[:most]]
    return ", ".join(names) + (f" and {len(items) - most} more" if len(items) > most else "")


def _run_pool(
    folder: OutputFolder,
    todo: list[tuple[str, str, str | None]],
    first_shard: int,
    spec: ModelSpec,
    address: str | None,
    num_workers: int | None,
    cpus_per_worker: float,
    gpus_per_worker: float,
    shard_size: int | None,
    max_attempts: int,
    start_timeout: float,
    progress: bool,
    on_shard_done: Callable[[ShardDone], None] | None,
    already_done: int,
    total: int,
    stats: dict[int, WorkerStats],
    counts: collections.Counter,
    weights_check: tuple[int, int, str] | None = None,
) -> None:
    """Start (or join) Ray, cut ``todo`` into shards for the pool, run every shard on it, commit each result.

    Fills ``stats`` and ``counts``.
    """
    from tqdm import tqdm

    begin = time.perf_counter()
    ray = require_ray()
    started = connect(ray, address)
    actors: list[Any] = []
    try:
        capacity = cluster_capacity(ray, cpus_per_worker, gpus_per_worker)
        if num_workers is not None and num_workers > capacity:
            _warn(f"--num-workers {num_workers}: the Ray cluster holds {capacity} workers of "
                  f"{worker_need(cpus_per_worker, gpus_per_worker)}; starting {capacity}")
        workers = max(1, min(num_workers or capacity, capacity, len(todo)))
        size = shard_size or default_shard_size(len(todo), workers)
        shards = {first_shard + i: todo[start:start + size] for i, start in enumerate(range(0, len(todo), size))}
        workers = min(workers, len(shards))
        counts["shard_size"] = size
        actors, identities = start_workers(ray, spec, workers, cpus_per_worker, gpus_per_worker, start_timeout, _warn,
                                          weights_check)
        for w, identity in identities.items():
            stats[w] = WorkerStats(worker=w, node=identity["node"], pids={identity["pid"]})
        counts["startup_ms"] = round(1000 * (time.perf_counter() - begin))
        queue = ShardQueue(shards, max_attempts)
        alive = set(identities)
        inflight: dict[Any, tuple[int, int]] = {}
        load = {w: 0 for w in alive}
        per_worker = 2  # one running, one queued: the actor never waits for the driver
        bar = tqdm(total=total, initial=already_done, unit="img", desc="batch", disable=not progress, smoothing=0.1)
        committed = 0
        try:
            while queue or inflight:
                for w in sorted(alive, key=lambda i: load[i]):
                    while queue and load[w] < per_worker:
                        shard = queue.pop()
                        inflight[actors[w].process.remote(shard, queue.items[shard])] = (shard, w)
                        load[w] += 1
                ready, _ = ray.wait(list(inflight), num_returns=1)
                for ref in ready:
                    shard, w = inflight.pop(ref)
                    load[w] -= 1
                    try:
                        outcome = ray.get(ref)
                    except ray.exceptions.RayError as exc:
                        stats[w].failures += 1
                        items = queue.items[shard]
                        why = f"{type(exc).__name__}: {reason(exc)}"
                        decision = queue.failed(shard, w)
                        if decision.action == "give_up":
                            counts["failed"] += len(items)
                            bar.write(one_line(f"paadet batch: shard {shard} failed {decision.attempts} times ({why}); "
                                               f"its {len(items)} inputs ({_names(items)}) are left for a re-run"),
                                      file=sys.stderr)
                        else:
                            counts["retries"] += 1
                            then = ("retrying" if decision.action == "retry" else
                                    f"retrying it as shards {' and '.join(map(str, decision.parts))}")
                            bar.write(one_line(f"paadet batch: shard {shard} failed on worker {w} ({why}); {then}"),
                                      file=sys.stderr)
                        if decision.drop_worker and w in alive:
                            alive.discard(w)
                            bar.write(f"paadet batch: worker {w} failed on {queue.drop_after} different shards in a row; "
                                      f"dropped from the pool", file=sys.stderr)
                            if not alive:
                                raise BatchError("every worker failed repeatedly; see the messages above") from exc
                        continue
                    queue.succeeded(shard, w)
                    items = queue.items[shard]
                    folder.commit(shard, items, outcome)
                    committed += 1
                    n = len(items)
                    counts["images"] += n
                    counts["detected"] += len(outcome["records"])
                    counts["errors"] += len(outcome["errors"])
                    for error in outcome["errors"]:
                        bar.write(one_line(f"paadet batch: unreadable: {error['error']}"), file=sys.stderr)
                    ws = stats[w]
                    ws.images += n
                    ws.shards += 1
                    ws.busy_s += outcome["seconds"]
                    ws.pids.add(outcome["pid"])
                    ws.node = outcome["node"]
                    bar.update(n)
                    if on_shard_done is not None:
                        on_shard_done(ShardDone(shard=shard, images=n, worker=w, pid=outcome["pid"],
                                                node=outcome["node"], committed=committed))
        finally:
            bar.close()
    finally:
        for actor in actors:
            ray.kill(actor, no_restart=True)
        if started:
            ray.shutdown()
