"""A batch run: the driver's queue of shards over the pool of workers, each finished shard committed."""

from __future__ import annotations

import collections
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from paadet.batch.cluster import (
    DEFAULT_START_TIMEOUT,
    cluster_capacity,
    connect,
    reason,
    require_ray,
    start_workers,
    worker_need,
)
from paadet.batch.errors import BatchError
from paadet.batch.inputs import expand_inputs, input_key, listing_error
from paadet.batch.output import ERRORS_FILE, LOCK_FILE, RUN_FILE, SUMMARY_FILE, OutputFolder, merge_coco
from paadet.batch.shards import BatchSummary, ShardDone, ShardQueue, WorkerStats, default_shard_size
from paadet.batch.weights import weights_identity, weights_stat
from paadet.errors import one_line
from paadet.fileio import OutputPathError, atomic_write_json, atomic_write_text, check_output_dir, check_output_file
from paadet.runtime.registry import with_checkpoint_file, with_explicit_preset
from paadet.runtime.spec import AUTO, DetectorSpec

ERRORS_PRINTED = 5
"""Unreadable inputs printed as a run finds them; the rest are counted at the end (errors.jsonl lists all)."""


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
        if coco.parent == Path(os.path.realpath(output_dir)) and coco.name in (
            RUN_FILE,
            ERRORS_FILE,
            SUMMARY_FILE,
            LOCK_FILE,
        ):
            raise OutputPathError(f"{coco_output}: --coco would overwrite the output folder's own {coco.name}")


def run_batch(
    inputs: Sequence[str | os.PathLike],
    output_dir: str | os.PathLike,
    spec: DetectorSpec,
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
        spec: the model each worker loads (the torch backend's preset made explicit here, after the output checks:
            the checkpoint's training scale, else the default).
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
    spec = with_checkpoint_file(spec.validate())  # a model name: its cached file, downloaded once, on this node
    if spec.backend == AUTO:  # the export and the choice are made here, on the driver; the workers run the result
        from paadet.export.auto import resolve_auto

        choice = resolve_auto(spec)
        _warn(choice.line())
        spec = choice.spec
    spec = with_explicit_preset(spec)  # a re-run with or without --preset is the same run
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
            _run_pool(
                folder,
                todo,
                folder.next_shard(),
                spec,
                address,
                num_workers,
                cpus_per_worker,
                gpus_per_worker,
                shard_size,
                max_attempts,
                start_timeout,
                progress,
                on_shard_done,
                already_done,
                len(sources),
                stats,
                counts,
                check,
            )
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
        if counts["errors"] > ERRORS_PRINTED:
            _warn(
                f"{counts['errors'] - ERRORS_PRINTED} more unreadable inputs were not printed "
                f"({counts['errors']} in this run); {folder.root / ERRORS_FILE} lists every one"
            )
        if coco_output is not None:
            from paadet.runtime.registry import model_classes

            classes = model_classes(spec)
            atomic_write_json(coco_output, merge_coco(folder.root, sources, classes.category_ids))
        summary = BatchSummary(
            total=len(sources),
            already_done=already_done,
            processed=counts["images"],
            detected=counts["detected"],
            errors=counts["errors"],
            errors_listed=len(error_lines),
            failed=counts["failed"],
            retries=counts["retries"],
            wall_s=wall,
            startup_s=counts["startup_ms"] / 1000.0,
            workers=[stats[i] for i in sorted(stats)],
            output_dir=str(folder.root),
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
    spec: DetectorSpec,
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
            _warn(
                f"--num-workers {num_workers}: the Ray cluster holds {capacity} workers of "
                f"{worker_need(cpus_per_worker, gpus_per_worker)}; starting {capacity}"
            )
        workers = max(1, min(num_workers or capacity, capacity, len(todo)))
        size = shard_size or default_shard_size(len(todo), workers)
        shards = {first_shard + i: todo[start : start + size] for i, start in enumerate(range(0, len(todo), size))}
        workers = min(workers, len(shards))
        counts["shard_size"] = size
        actors, identities = start_workers(
            ray, spec, workers, cpus_per_worker, gpus_per_worker, start_timeout, _warn, weights_check
        )
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
                            bar.write(
                                one_line(
                                    f"paadet batch: shard {shard} failed {decision.attempts} times ({why}); "
                                    f"its {len(items)} inputs ({_names(items)}) are left for a re-run"
                                ),
                                file=sys.stderr,
                            )
                        else:
                            counts["retries"] += 1
                            then = (
                                "retrying"
                                if decision.action == "retry"
                                else f"retrying it as shards {' and '.join(map(str, decision.parts))}"
                            )
                            bar.write(
                                one_line(f"paadet batch: shard {shard} failed on worker {w} ({why}); {then}"),
                                file=sys.stderr,
                            )
                        if decision.drop_worker and w in alive:
                            alive.discard(w)
                            bar.write(
                                f"paadet batch: worker {w} failed on {queue.drop_after} different shards in a row; "
                                f"dropped from the pool",
                                file=sys.stderr,
                            )
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
                    for error in outcome["errors"][: max(0, ERRORS_PRINTED - counts["errors"])]:
                        bar.write(one_line(f"paadet batch: unreadable: {error['error']}"), file=sys.stderr)
                    if counts["errors"] <= ERRORS_PRINTED < counts["errors"] + len(outcome["errors"]):
                        bar.write(
                            f"paadet batch: more unreadable inputs: only the first {ERRORS_PRINTED} are printed; "
                            f"{folder.root / ERRORS_FILE} will list them all",
                            file=sys.stderr,
                        )
                    counts["errors"] += len(outcome["errors"])
                    ws = stats[w]
                    ws.images += n
                    ws.shards += 1
                    ws.busy_s += outcome["seconds"]
                    ws.pids.add(outcome["pid"])
                    ws.node = outcome["node"]
                    bar.update(n)
                    if on_shard_done is not None:
                        on_shard_done(
                            ShardDone(
                                shard=shard,
                                images=n,
                                worker=w,
                                pid=outcome["pid"],
                                node=outcome["node"],
                                committed=committed,
                            )
                        )
        finally:
            bar.close()
    finally:
        for actor in actors:
            ray.kill(actor, no_restart=True)
        if started:
            ray.shutdown()
