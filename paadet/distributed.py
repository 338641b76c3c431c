"""Detection over many images on a Ray cluster: sharded, resumable output that holds every input once.

How it works (see ``docs/ray.md``):

* The driver (the process that calls :func:`run_batch`) lists the inputs, drops those that an earlier
  run with the same output folder already covers, and cuts the rest into shards of ``shard_size``
  images.
* A pool of Ray actors, each holding one :class:`~paadet.detector.Detector` (one GPU per actor where
  asked for, else CPUs), takes shards from a queue; each actor decodes and resizes its images in a
  thread pool ahead of the network and sends the detections of the whole shard back.
* Only the driver writes. For each finished shard it writes the results file
  (``shards/shard-NNNNNN.jsonl``, one JSON object per detected image) atomically, then the shard's
  manifest (``shards/shard-NNNNNN.manifest.json``: the inputs it covers, its unreadable images, the
  results file's size and SHA-256) atomically. The manifest is the commit: a shard without one does
  not exist, and its inputs are done again by the next run.
* A task whose actor dies (killed process, lost node, out of memory) fails with a Ray error; the
  driver puts the shard back in the queue (Ray restarts the actor), so a dead worker costs one shard.
  Because one process commits each shard once, under a fresh number, no input is ever written twice.

Ray is an optional dependency (``pip install "paadet[ray]"``); it is imported only when a run starts.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from .data.images import ImageSource, list_images
from .detector import ImageResult
from .fileio import atomic_write_bytes, atomic_write_json, atomic_write_text
from .preprocess import Preset, get_preset

FORMAT = "paadet-batch/1"
SHARD_FORMAT = "paadet-batch-shard/1"
SHARDS_DIR = "shards"
RUN_FILE = "run.json"
ERRORS_FILE = "errors.jsonl"
SUMMARY_FILE = "summary.json"
LOCK_FILE = ".lock"
LIST_SUFFIXES = (".txt",)
"""Inputs with these suffixes are lists of image paths, one a line (see :func:`expand_inputs`)."""


class BatchError(RuntimeError):
    """A batch run that cannot start or go on (output folder in use or made with another model, no workers left)."""


def require_ray():
    """Import Ray, or fail with the command that installs it."""
    try:
        import ray
    except ImportError:
        raise BatchError("Ray is not installed; install the extra: pip install 'paadet[ray]'") from None
    return ray


# --- inputs ---------------------------------------------------------------------------------------


def read_path_list(list_file: str | os.PathLike) -> list[ImageSource]:
    """Image files named in a text file, one a line; blank lines and lines starting with ``#`` are skipped.

    Relative paths are relative to the list file's folder. Each entry is taken as an image file
    without looking at the disk (a missing one is reported as unreadable when it is processed, which
    keeps listing millions of entries cheap); its ``file_name`` is the line as written.
    """
    list_path = Path(list_file)
    sources = []
    for line in list_path.read_text(encoding="utf-8").splitlines():
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        sources.append(ImageSource(list_path.parent / entry, entry))
    return sources


def expand_inputs(inputs: Sequence[str | os.PathLike]) -> list[ImageSource]:
    """The images named by ``inputs`` in order: image files, folders (as :func:`~paadet.data.images.list_images`
    searches them) and ``.txt`` lists of image paths (:func:`read_path_list`); each file once.

    Raises:
        FileNotFoundError: an input (file, folder or list) does not exist.
    """
    sources: list[ImageSource] = []
    seen: set[str] = set()
    for item in inputs:
        path = Path(item)
        if path.suffix.lower() in LIST_SUFFIXES and path.is_file():
            found = read_path_list(path)
        else:
            found = list_images([item])
        for source in found:
            key = input_key(source)
            if key not in seen:
                seen.add(key)
                sources.append(source)
    return sources


def input_key(source: ImageSource) -> str:
    """The identity of an input across runs: its absolute path (not resolved, so no disk access)."""
    return os.path.abspath(os.fspath(source.path))


# --- model settings -------------------------------------------------------------------------------


@dataclass
class ModelSpec:
    """What each worker builds its detector from: the arguments of :func:`paadet.commands.common.build_detector`.

    ``preset`` may be a preset name or a :class:`~paadet.preprocess.Preset`. With GPUs per worker,
    ``device`` ``cuda:N`` means the worker's own GPU (Ray makes it the only visible one).
    """

    backend: str = "torch"
    checkpoint: str | None = None
    model: str | None = None
    providers: str | None = None
    preset: str | Preset | None = None
    device: str = "cpu"
    batch_size: int | None = None
    fp16: bool = False
    score_voting: bool = True
    workers: int = 2
    optimize: bool = False

    def kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``build_detector`` (the preset object kept as is)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def fingerprint(self) -> dict[str, Any]:
        """The settings that decide the detections (JSON-normalised); a resumed run must use the same ones."""
        return json.loads(json.dumps({
            "backend": self.backend,
            "checkpoint": os.path.abspath(self.checkpoint) if self.checkpoint else None,
            "model": os.path.abspath(self.model) if self.model else None,
            "preset": dataclasses.asdict(get_preset(self.preset)) if self.preset is not None else None,
            "fp16": self.fp16,
            "score_voting": self.score_voting,
            "optimize": self.optimize,
        }))


# --- records --------------------------------------------------------------------------------------


def result_record(source_key: str, file_name: str, result: ImageResult) -> dict[str, Any]:
    """One line of a shard's results file. Floats are the float32 values written exactly (as in ``predict``)."""
    return {
        "path": source_key,
        "file_name": file_name,
        "height": int(result.ori_shape[0]),
        "width": int(result.ori_shape[1]),
        "boxes": result.boxes.tolist(),
        "scores": result.scores.tolist(),
        "labels": result.labels.tolist(),
    }


def record_to_result(record: dict[str, Any]) -> ImageResult:
    """The :class:`~paadet.detector.ImageResult` a results line was made from (bit-identical arrays)."""
    return ImageResult(
        boxes=np.asarray(record["boxes"], np.float32).reshape(-1, 4),
        scores=np.asarray(record["scores"], np.float32),
        labels=np.asarray(record["labels"], np.int64),
        ori_shape=(record["height"], record["width"]),
        file_name=record["file_name"],
    )


# --- the worker -----------------------------------------------------------------------------------


class ShardWorker:
    """Holds one detector and runs whole shards; wrapped as a Ray actor by :func:`run_batch`.

    Args:
        index: the worker's number in the pool (for reports).
        spec: the model to build.
        threads: torch / OpenCV threads (the actor's CPUs).
    """

    def __init__(self, index: int, spec: ModelSpec, threads: int) -> None:
        import cv2
        import torch

        from .commands.common import build_detector

        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)
        cv2.setNumThreads(1)
        self.index = index
        kwargs = spec.kwargs()
        if kwargs["device"].startswith("cuda") and os.environ.get("CUDA_VISIBLE_DEVICES"):
            kwargs["device"] = "cuda"
        self.detector = build_detector(**kwargs)
        self.identity = {"worker": index, "pid": os.getpid(), "node": _node_ip()}

    def ready(self) -> dict[str, Any]:
        """The worker's identity, once its model is loaded."""
        return self.identity

    def process(self, shard: int, items: list[tuple[str, str]]) -> dict[str, Any]:
        """Detect on one shard's ``(path, file_name)`` items; unreadable images are returned as errors.

        Returns ``{"shard", "records", "errors", "seconds", "timings", **identity}`` with the records
        in the shard's input order.
        """
        from .detector import iter_loaded
        from .runtime.base import StageTimer

        start = time.perf_counter()
        detector = self.detector
        sources = [ImageSource(Path(path), name) for path, name in items]
        timer = StageTimer(getattr(detector.backend, "device", None))
        records: list[dict[str, Any] | None] = [None] * len(items)
        errors: list[dict[str, Any] | None] = [None] * len(items)
        for loaded, result in detector.run(iter_loaded(sources, detector.preset, detector.workers), timer):
            path, name = items[loaded.index]
            if result is None:
                errors[loaded.index] = {"path": path, "file_name": name, "error": loaded.error}
            else:
                records[loaded.index] = result_record(path, name, result)
        return {
            "shard": shard,
            "records": [r for r in records if r is not None],
            "errors": [e for e in errors if e is not None],
            "seconds": time.perf_counter() - start,
            "timings": dict(timer.totals),
            **self.identity,
        }


def _reason(exc: BaseException) -> str:
    """One line saying why a Ray call failed: the worker's own exception (the last line of the traceback
    Ray carries) for an error raised in the worker, else the first line of Ray's message."""
    import ray

    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(exc).splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        return type(exc).__name__
    raised_in_worker = isinstance(exc, ray.exceptions.RayTaskError) or getattr(exc, "_actor_init_failed", False)
    return lines[-1] if raised_in_worker else lines[0]


def _node_ip() -> str:
    """This process's Ray node address (or the host name outside Ray)."""
    try:
        import ray

        return ray.util.get_node_ip_address()
    except Exception:  # noqa: BLE001 - only for reports
        import socket

        return socket.gethostname()


# --- the output folder ----------------------------------------------------------------------------


@dataclass
class ShardManifest:
    """A committed shard: the inputs it covers and where their results are."""

    shard: int
    inputs: list[tuple[str, str]]
    errors: list[dict[str, Any]]
    results: str
    size: int
    sha256: str
    worker: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> "ShardManifest":
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("format") != SHARD_FORMAT:
            raise ValueError(f"{path}: not a {SHARD_FORMAT} manifest")
        return cls(shard=int(data["shard"]), inputs=[tuple(i) for i in data["inputs"]], errors=data["errors"],
                   results=data["results"], size=int(data["size"]), sha256=data["sha256"], worker=data.get("worker", {}))

    def to_json(self) -> dict[str, Any]:
        return {"format": SHARD_FORMAT, **dataclasses.asdict(self)}


def shard_stem(shard: int) -> str:
    return f"shard-{shard:06d}"


class OutputFolder:
    """The output folder of a batch run: ``run.json``, ``shards/``, ``errors.jsonl``, ``summary.json``."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.shards = self.root / SHARDS_DIR

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold an exclusive lock on the folder: two drivers must not write one folder."""
        self.shards.mkdir(parents=True, exist_ok=True)
        with open(self.root / LOCK_FILE, "a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise BatchError(f"{self.root}: another paadet batch run is writing this output folder") from None
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def check_run(self, fingerprint: dict[str, Any]) -> None:
        """Record the model settings, or check that they are those of the runs before."""
        run_file = self.root / RUN_FILE
        if run_file.exists():
            recorded = json.loads(run_file.read_text(encoding="utf-8"))
            if recorded.get("model") != fingerprint:
                raise BatchError(
                    f"{self.root} holds results of other model settings ({recorded.get('model')}); "
                    f"use a new --output-dir for {fingerprint}")
            return
        atomic_write_json(run_file, {"format": FORMAT, "model": fingerprint}, indent=1)

    def manifests(self, warn: Callable[[str], None] = print) -> list[ShardManifest]:
        """The committed shards, lowest number first; a manifest whose results file is missing or of the
        wrong size is skipped (its inputs are done again)."""
        found = []
        for path in sorted(self.shards.glob("shard-*.manifest.json")):
            try:
                manifest = ShardManifest.load(path)
            except (ValueError, KeyError, TypeError) as exc:
                warn(f"ignoring unreadable shard manifest {path}: {exc}")
                continue
            results = self.shards / manifest.results
            if not results.is_file() or results.stat().st_size != manifest.size:
                warn(f"ignoring shard {manifest.shard}: its results file {results} is missing or truncated")
                continue
            found.append(manifest)
        found.sort(key=lambda m: m.shard)
        return found

    def remove_uncommitted(self, committed: list[ShardManifest]) -> int:
        """Delete results files no manifest names and temporary files left by a killed run; returns how many."""
        keep = {m.results for m in committed} | {f"{shard_stem(m.shard)}.manifest.json" for m in committed}
        removed = 0
        for path in self.shards.iterdir():
            if path.name not in keep and (path.name.startswith("shard-") or path.name.startswith(".shard-")):
                path.unlink()
                removed += 1
        return removed

    def next_shard(self) -> int:
        """A shard number above every file in ``shards/`` (committed or not), so none is reused."""
        numbers = [int(p.name.split("-")[1].split(".")[0]) for p in self.shards.glob("shard-*")]
        return max(numbers, default=-1) + 1

    def commit(self, shard: int, inputs: list[tuple[str, str]], outcome: dict[str, Any]) -> ShardManifest:
        """Write a shard's results, then its manifest (the commit), each atomically."""
        stem = shard_stem(shard)
        text = "".join(json.dumps(r) + "\n" for r in outcome["records"])
        data = text.encode("utf-8")
        atomic_write_bytes(self.shards / f"{stem}.jsonl", data)
        manifest = ShardManifest(
            shard=shard, inputs=inputs, errors=outcome["errors"], results=f"{stem}.jsonl", size=len(data),
            sha256=hashlib.sha256(data).hexdigest(),
            worker={k: outcome[k] for k in ("worker", "pid", "node", "seconds")},
        )
        atomic_write_json(self.shards / f"{stem}.manifest.json", manifest.to_json())
        return manifest

    def iter_records(self, manifests: list[ShardManifest] | None = None, verify: bool = True) -> Iterator[dict[str, Any]]:
        """Every results line of the committed shards (checked against the manifests' SHA-256)."""
        for manifest in self.manifests() if manifests is None else manifests:
            data = (self.shards / manifest.results).read_bytes()
            if verify and hashlib.sha256(data).hexdigest() != manifest.sha256:
                raise BatchError(f"{self.shards / manifest.results}: contents do not match its manifest's SHA-256")
            for line in data.decode("utf-8").splitlines():
                yield json.loads(line)


def read_results(output_dir: str | os.PathLike) -> dict[str, ImageResult]:
    """The detections stored in an output folder, by input path (absolute); each input once."""
    out: dict[str, ImageResult] = {}
    for record in OutputFolder(output_dir).iter_records():
        out.setdefault(record["path"], record_to_result(record))
    return out


def merge_coco(output_dir: str | os.PathLike, sources: list[ImageSource]) -> list[dict[str, Any]]:
    """The COCO results entries ``paadet predict`` writes for ``sources``, from an output folder.

    Image ids follow :func:`paadet.commands.predict.image_ids` over ``sources``; inputs without results
    (unreadable, or not done yet) contribute nothing, as in ``predict``.
    """
    from .commands.predict import coco_entries

    wanted = {input_key(s): i for i, s in enumerate(sources)}
    results: dict[int, ImageResult] = {}
    for key, result in read_results(output_dir).items():
        if key in wanted:
            results[wanted[key]] = result
    return coco_entries(results, sources)


# --- the run --------------------------------------------------------------------------------------


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
        out = [
            f"{self.total} inputs: {self.already_done} done before, {self.processed} processed now "
            f"({self.detected} with detections run, {self.errors} unreadable), {self.failed} failed; "
            f"{self.retries} shard retries",
            f"wall time {self.wall_s:.1f} s ({self.startup_s:.1f} s starting workers): {self.images_per_s:.2f} img/s, "
            f"{self.steady_images_per_s:.2f} img/s after start-up, {len(self.workers)} workers",
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


def _cluster_workers(ray, cpus_per_worker: float, gpus_per_worker: float) -> int:
    """How many workers the cluster's resources hold."""
    resources = ray.cluster_resources()
    if gpus_per_worker > 0:
        return max(1, int(resources.get("GPU", 0) // gpus_per_worker))
    return max(1, int(resources.get("CPU", 1) // cpus_per_worker))


def run_batch(
    inputs: Sequence[str | os.PathLike],
    output_dir: str | os.PathLike,
    spec: ModelSpec,
    address: str | None = None,
    num_workers: int | None = None,
    cpus_per_worker: float = 1.0,
    gpus_per_worker: float | None = None,
    shard_size: int = 64,
    max_attempts: int = 3,
    coco_output: str | os.PathLike | None = None,
    progress: bool = True,
    on_shard_done: Callable[[ShardDone], None] | None = None,
) -> BatchSummary:
    """Detect on every image of ``inputs`` with a pool of Ray actors; write sharded results to ``output_dir``.

    Args:
        inputs: image files, folders and ``.txt`` lists of image paths (:func:`expand_inputs`).
        output_dir: output folder; a run with the same folder does only the inputs not yet covered.
        spec: the model each worker loads.
        address: Ray cluster to join (``auto``, ``HOST:PORT``, ``ray://...``); None starts a local
            instance. When Ray is already initialised in this process, that instance is used.
        num_workers: actors in the pool; default: as many as the cluster's CPUs (or GPUs) hold.
        cpus_per_worker: CPUs reserved per actor (also its torch threads).
        gpus_per_worker: GPUs per actor; default 1 when ``spec.device`` is CUDA, else 0.
        shard_size: images per shard (the unit of work, commit and retry).
        max_attempts: tries per shard before its inputs are reported as failed (left for a re-run).
        coco_output: also write the COCO results JSON of all inputs, as ``paadet predict`` does.
        progress: show a progress bar.
        on_shard_done: called after each shard is committed (for monitoring and fault-injection tests).

    Returns:
        The run's :class:`BatchSummary`, also written to ``summary.json``.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    if max_attempts < 1:
        raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
    if gpus_per_worker is None:
        gpus_per_worker = 1.0 if spec.device.startswith("cuda") else 0.0
    sources = expand_inputs(inputs)
    folder = OutputFolder(output_dir)
    with folder.locked():
        folder.check_run(spec.fingerprint())
        committed = folder.manifests(warn=_warn)
        folder.remove_uncommitted(committed)
        done_keys = {path for m in committed for path, _ in m.inputs}
        todo = [(input_key(s), s.file_name) for s in sources if input_key(s) not in done_keys]
        already_done = len(sources) - len(todo)
        first = folder.next_shard()
        shards = {first + i: todo[start:start + shard_size] for i, start in enumerate(range(0, len(todo), shard_size))}
        start_time = time.perf_counter()
        stats: dict[int, WorkerStats] = {}
        counts: collections.Counter = collections.Counter()
        if shards:
            _run_pool(folder, shards, spec, address, num_workers, cpus_per_worker, gpus_per_worker,
                      max_attempts, progress, on_shard_done, already_done, len(sources), stats, counts)
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
            atomic_write_json(coco_output, merge_coco(folder.root, sources))
        summary = BatchSummary(
            total=len(sources), already_done=already_done, processed=counts["images"], detected=counts["detected"],
            errors=counts["errors"], errors_listed=len(error_lines), failed=counts["failed"],
            retries=counts["retries"], wall_s=wall,
            startup_s=counts["startup_ms"] / 1000.0,
            workers=[stats[i] for i in sorted(stats)], output_dir=str(folder.root),
            coco_output=str(coco_output) if coco_output is not None else None,
        )
        atomic_write_json(folder.root / SUMMARY_FILE, summary.to_json(), indent=1)
    return summary


def _run_pool(
    folder: OutputFolder,
    shards: dict[int, list[tuple[str, str]]],
    spec: ModelSpec,
    address: str | None,
    num_workers: int | None,
    cpus_per_worker: float,
    gpus_per_worker: float,
    max_attempts: int,
    progress: bool,
    on_shard_done: Callable[[ShardDone], None] | None,
    already_done: int,
    total: int,
    stats: dict[int, WorkerStats],
    counts: collections.Counter,
) -> None:
    """Start (or join) Ray, run every shard on an actor pool, commit each result; fills ``stats`` and ``counts``."""
    from tqdm import tqdm

    begin = time.perf_counter()

    ray = require_ray()
    started = False
    if not ray.is_initialized():
        ray.init(address=address or "local", include_dashboard=False, logging_level=logging.WARNING)
        started = True
    actors: list[Any] = []
    try:
        if num_workers is None:
            num_workers = _cluster_workers(ray, cpus_per_worker, gpus_per_worker)
        num_workers = max(1, min(num_workers, len(shards)))
        threads = max(1, int(cpus_per_worker))
        actor_class = ray.remote(ShardWorker).options(
            num_cpus=cpus_per_worker, num_gpus=gpus_per_worker, max_restarts=-1, max_task_retries=0,
        )
        actors = [actor_class.remote(i, spec, threads) for i in range(num_workers)]
        try:
            identities = ray.get([a.ready.remote() for a in actors])
        except ray.exceptions.RayError as exc:
            raise BatchError(f"the workers could not start: {_reason(exc)}") from exc
        for identity in identities:
            stats[identity["worker"]] = WorkerStats(worker=identity["worker"], node=identity["node"], pids={identity["pid"]})
        counts["startup_ms"] = round(1000 * (time.perf_counter() - begin))
        queue = collections.deque(sorted(shards))
        attempts: collections.Counter = collections.Counter()
        consecutive_failures = [0] * num_workers
        alive = set(range(num_workers))
        inflight: dict[Any, tuple[int, int]] = {}
        load = [0] * num_workers
        per_worker = 2  # one running, one queued: the actor never waits for the driver
        bar = tqdm(total=total, initial=already_done, unit="img", desc="batch", disable=not progress, smoothing=0.1)
        committed = 0
        try:
            while queue or inflight:
                for w in sorted(alive, key=lambda i: load[i]):
                    while queue and load[w] < per_worker:
                        shard = queue.popleft()
                        inflight[actors[w].process.remote(shard, shards[shard])] = (shard, w)
                        load[w] += 1
                ready, _ = ray.wait(list(inflight), num_returns=1)
                for ref in ready:
                    shard, w = inflight.pop(ref)
                    load[w] -= 1
                    try:
                        outcome = ray.get(ref)
                    except ray.exceptions.RayError as exc:
                        attempts[shard] += 1
                        stats[w].failures += 1
                        consecutive_failures[w] += 1
                        reason = _reason(exc)
                        if attempts[shard] < max_attempts:
                            counts["retries"] += 1
                            queue.appendleft(shard)
                            bar.write(f"paadet batch: shard {shard} failed on worker {w} ({type(exc).__name__}: "
                                      f"{reason}); retrying", file=sys.stderr)
                        else:
                            counts["failed"] += len(shards[shard])
                            bar.write(f"paadet batch: shard {shard} failed {attempts[shard]} times ({reason}); "
                                      f"its {len(shards[shard])} inputs are left for a re-run", file=sys.stderr)
                        if consecutive_failures[w] >= max_attempts:
                            alive.discard(w)
                            bar.write(f"paadet batch: worker {w} failed {consecutive_failures[w]} times in a row; "
                                      f"dropped from the pool", file=sys.stderr)
                            if not alive:
                                raise BatchError("every worker failed repeatedly; see the messages above") from exc
                        continue
                    consecutive_failures[w] = 0
                    folder.commit(shard, shards[shard], outcome)
                    committed += 1
                    n = len(shards[shard])
                    counts["images"] += n
                    counts["detected"] += len(outcome["records"])
                    counts["errors"] += len(outcome["errors"])
                    for error in outcome["errors"]:
                        bar.write(f"paadet batch: unreadable: {error['error']}", file=sys.stderr)
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
