"""The worker: one detector in a Ray actor, running whole shards."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from paadet.batch.errors import BatchError
from paadet.batch.output import result_record
from paadet.batch.weights import weights_stat
from paadet.data.images import ImageSource
from paadet.errors import one_line
from paadet.runtime.spec import DetectorSpec


class ShardWorker:
    """Holds one detector and runs whole shards; wrapped as a Ray actor by :func:`~paadet.batch.run_batch`.

    Creating the actor is cheap (it only records its settings), so that the driver can tell a worker
    Ray could not place (no free resources: the start deadline) from one still loading its model.
    The model is loaded by :meth:`ready`, or by the first :meth:`process` of a restarted actor.

    Args:
        index: the worker's number in the pool (for reports).
        spec: the model to build (a :class:`~paadet.runtime.spec.DetectorSpec`).
        threads: torch / OpenCV threads (the actor's CPUs).
        weights_check: ``(size, mtime_ns, sha256)`` of the weights file as the driver hashed it; a
            worker (or a restarted one) whose file differs in size or time hashes it, and refuses to
            load other contents, so that one run never mixes two models' results (a copy of the same
            file on a node's own disk costs one hash).
    """

    def __init__(
        self, index: int, spec: DetectorSpec, threads: int, weights_check: tuple[int, int, str] | None = None
    ) -> None:
        os.environ["OMP_NUM_THREADS"] = str(threads)
        self.index = index
        self.spec = spec
        self.threads = threads
        self.weights_check = weights_check
        self.detector = None
        self.identity = {"worker": index, "pid": os.getpid(), "node": _node_ip()}

    def placed(self) -> dict[str, Any]:
        """The worker's identity, as soon as Ray has started it (before the model is loaded)."""
        return self.identity

    def _load(self) -> None:
        import cv2

        from paadet.detector import Detector

        self._check_weights()
        spec = self.spec
        if not spec.uses_graph:  # the exported-graph backends take OMP_NUM_THREADS and run without torch
            import torch

            torch.set_num_threads(self.threads)
        cv2.setNumThreads(1)
        if spec.device.startswith("cuda") and os.environ.get("CUDA_VISIBLE_DEVICES"):
            spec = spec.replace(device="cuda")  # Ray made this worker's GPU the only visible one
        self.detector = Detector.from_spec(spec)

    def _check_weights(self) -> None:
        from paadet.fileio import sha256_file

        file = self.spec.weights_file
        if self.weights_check is None or file is None:
            return
        size, mtime_ns, digest = self.weights_check
        if weights_stat(file) == (size, mtime_ns):
            return
        try:
            same = sha256_file(file) == digest
        except OSError as exc:
            raise BatchError(one_line(f"{file}: cannot read {self.spec.weights_flag}: {exc.strerror or exc}")) from None
        if not same:
            raise BatchError(
                f"{file}: {self.spec.weights_flag} on this node is not the file this run started with "
                f"(replaced since, or another copy); one run must not mix two models' results"
            )

    def ready(self) -> dict[str, Any]:
        """Load the model; the worker's identity once it is loaded."""
        if self.detector is None:
            self._load()
        return self.identity

    def process(self, shard: int, items: Sequence[Sequence[Any]]) -> dict[str, Any]:
        """Detect on one shard's ``(path, file_name[, listing error])`` items.

        Unreadable images (and entries that could not be listed) are returned as errors. If the network
        fails on the shard, its images are run one at a time and the ones that fail are returned as
        errors, so one bad image does not sink its shard; if none of them works, the exception is raised
        (a broken worker: the driver retries the shard elsewhere).

        Returns ``{"shard", "records", "errors", "seconds", "timings", **identity}`` with the records
        in the shard's input order.
        """
        from paadet.runtime.base import StageTimer

        if self.detector is None:  # a restarted actor
            self._load()
        start = time.perf_counter()
        timer = StageTimer(getattr(self.detector.backend, "device", None))
        records: list[dict[str, Any] | None] = [None] * len(items)
        errors: list[dict[str, Any] | None] = [None] * len(items)
        todo = []
        for i, item in enumerate(items):
            path, name = item[0], item[1]
            listing = item[2] if len(item) > 2 else None
            if listing is not None:
                errors[i] = {"path": path, "file_name": name, "error": listing}
            else:
                todo.append(i)
        try:
            self._detect(items, todo, records, errors, timer)
        except Exception:
            left = [i for i in todo if records[i] is None and errors[i] is None]
            worked = any(r is not None for r in records)
            failures: dict[int, dict[str, Any]] = {}
            for i in left:
                try:
                    self._detect(items, [i], records, errors, timer)
                    worked = True
                except Exception as exc:
                    failures[i] = {
                        "path": items[i][0],
                        "file_name": items[i][1],
                        "error": one_line(f"detection failed on {items[i][1]}: {type(exc).__name__}: {exc}"),
                    }
            if not worked:
                raise
            for i, error in failures.items():
                errors[i] = error
        return {
            "shard": shard,
            "records": [r for r in records if r is not None],
            "errors": [e for e in errors if e is not None],
            "seconds": time.perf_counter() - start,
            "timings": dict(timer.totals),
            **self.identity,
        }

    def _detect(
        self, items: Sequence[Sequence[Any]], indices: list[int], records: list, errors: list, timer: Any
    ) -> None:
        """Run the detector on ``items[indices]``, filling ``records`` / ``errors`` at those positions."""
        from paadet.data.pipeline import iter_loaded

        detector = self.detector
        sources = [ImageSource(Path(items[i][0]), items[i][1]) for i in indices]
        for loaded, result in detector.run(iter_loaded(sources, detector.preset, detector.workers), timer):
            i = indices[loaded.index]
            path, name = items[i][0], items[i][1]
            if result is None:
                errors[i] = {"path": path, "file_name": name, "error": loaded.error}
            else:
                records[i] = result_record(path, name, result)


def _node_ip() -> str:
    """This process's Ray node address (or the host name outside Ray)."""
    try:
        import ray

        return ray.util.get_node_ip_address()
    except Exception:
        import socket

        return socket.gethostname()
