"""Dynamic batching: images decoded in worker threads, queued, and run in batches of one padded shape.

Requests are admitted up to ``max_queue`` at once (:meth:`Batcher.try_admit`) once their bodies have
arrived (see :mod:`paadet.serve.receive`), their bytes checked, decoded and resized in a thread pool
(OpenCV releases the GIL; the event loop never decodes), then put on a queue that one inference thread
reads. That thread keeps one bucket per padded shape and runs a
bucket when it holds ``max_batch`` images or when its oldest image has waited ``max_wait_ms``, through
:meth:`Detector.run` exactly as ``paadet predict`` does, so an image's detections do not depend on the
images it is batched with. Results go back to each request's future.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import cv2
import numpy as np

from paadet.data.images import ImageReadError, decode_image
from paadet.data.pipeline import LoadedImage
from paadet.detections import ImageResult
from paadet.detector import Detector
from paadet.preprocess import Preset, resize
from paadet.runtime.base import StageTimer
from paadet.serve.limits import RequestError, image_size_from_header
from paadet.serve.settings import ServeSettings

log = logging.getLogger("paadet.serve")

_STOP = object()


@dataclass
class _Job:
    loaded: LoadedImage
    future: concurrent.futures.Future
    enqueued: float = field(default_factory=time.perf_counter)


def prepare_image(data: bytes, index: int, max_pixels: int, preset: str | Preset) -> LoadedImage:
    """An encoded image checked (its header), decoded and resized for ``preset``, with its stage times.

    Raises:
        RequestError: 400 for bytes that are not an image or cannot be decoded or resized, 413 for an image
            over ``max_pixels`` (from its header, or once decoded when the header lied).
    """
    start = time.perf_counter()
    image_size_from_header(data, max_pixels)
    try:
        image = decode_image(data, "the request body")
    except ImageReadError as exc:
        raise RequestError(400, str(exc)) from None
    if image.shape[0] * image.shape[1] > max_pixels:  # the header lied
        raise RequestError(
            413, f"image decodes to {image.shape[1]}x{image.shape[0]}, over the limit of {max_pixels} pixels"
        )
    decoded = time.perf_counter()
    try:
        resized, meta = resize(image, preset)
    except (ValueError, cv2.error) as exc:
        raise RequestError(400, f"cannot pre-process the image: {exc}") from None
    loaded = LoadedImage(index=index, name=None, resized=resized, meta=meta)
    loaded.timings = {"decode": decoded - start, "preprocess": time.perf_counter() - decoded}
    return loaded


class Batcher:
    """Batches detect requests for ``detector`` (see the module docstring).

    Args:
        detector: the model; its ``batch_size`` is raised to ``settings.max_batch`` if lower.
        settings: limits and batching settings.
        on_batch: called from the inference thread with ``(batch size, seconds)`` after each network call.
    """

    def __init__(
        self, detector: Detector, settings: ServeSettings, on_batch: Callable[[int, float], None] | None = None
    ) -> None:
        self.detector = detector
        self.settings = settings
        self.on_batch = on_batch
        if detector.batch_size < settings.max_batch:
            detector.batch_size = settings.max_batch
        self.ready = threading.Event()
        self.warmup_error: str | None = None
        self.admitted = 0
        self._ids = itertools.count()
        self._queue: queue.Queue = queue.Queue()
        self._closed = False
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._thread: threading.Thread | None = None

    # -- life cycle -------------------------------------------------------------------------------
    def start(self, warm_up: bool = True) -> None:
        """Start the decoding pool and the inference thread (which warms the model up first)."""
        if self._thread is not None:
            return
        self._pool = concurrent.futures.ThreadPoolExecutor(self.settings.workers, thread_name_prefix="paadet-decode")
        self._thread = threading.Thread(target=self._loop, args=(warm_up,), name="paadet-infer", daemon=True)
        self._thread.start()

    def close(self, timeout: float | None = None) -> None:
        """Drain: refuse new work, run what is queued, answer it, and stop the threads."""
        self._closed = True
        if self._thread is not None:
            self._queue.put(_STOP)
            self._thread.join(timeout)
        while True:  # anything queued after the stop marker (only past a graceful-shutdown timeout)
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not _STOP and job.future.set_running_or_notify_cancel():
                job.future.set_exception(RequestError(503, "the server is shutting down", {"Retry-After": "1"}))
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    @property
    def closed(self) -> bool:
        return self._closed

    def queue_depth(self) -> int:
        """Detect requests admitted and not yet answered (decoding, queued or running)."""
        return self.admitted

    # -- admission (called on the event loop) -------------------------------------------------------
    def try_admit(self) -> bool:
        """Take a slot for one request; False when ``max_queue`` are already in (answer 503)."""
        if self._closed or self.admitted >= self.settings.max_queue:
            return False
        self.admitted += 1
        return True

    def release(self) -> None:
        self.admitted -= 1

    # -- one request --------------------------------------------------------------------------------
    def prepare(self, data: bytes, index: int) -> LoadedImage:
        """Check the header, decode and resize (runs in a worker thread). Raises :class:`RequestError`."""
        return prepare_image(data, index, self.settings.max_pixels, self.detector.preset)

    async def detect(self, data: bytes) -> tuple[ImageResult, dict[str, float]]:
        """Detections for one encoded image and its stage times in ms (decode, preprocess, queue, network, ...).

        Raises :class:`RequestError` (400/413 from the checks, 503 while shutting down). Cancelling the
        call (a timeout) withdraws the image if it has not reached the network yet.
        """
        if self._closed or self._pool is None:
            raise RequestError(503, "the server is shutting down", {"Retry-After": "1"})
        loop = asyncio.get_running_loop()
        loaded = await loop.run_in_executor(self._pool, self.prepare, data, next(self._ids))
        if self._closed:
            raise RequestError(503, "the server is shutting down", {"Retry-After": "1"})
        job = _Job(loaded, concurrent.futures.Future())
        self._queue.put(job)
        return await asyncio.wrap_future(job.future)

    # -- the inference thread ---------------------------------------------------------------------
    def _warm_up(self) -> None:
        start = time.perf_counter()
        try:
            image = np.full((64, 64, 3), 114, np.uint8)
            resized, meta = resize(image, self.detector.preset)
            for _ in self.detector.run([LoadedImage(index=-1, name=None, resized=resized, meta=meta)]):
                pass
        except Exception as exc:
            self.warmup_error = f"warm-up failed: {type(exc).__name__}: {exc}"
            log.error("paadet serve: %s", self.warmup_error)
            return
        log.info("paadet serve: model warm in %.1f s", time.perf_counter() - start)
        self.ready.set()

    def _loop(self, warm_up: bool) -> None:
        if warm_up:
            self._warm_up()
        else:
            self.ready.set()
        max_wait = self.settings.max_wait_ms / 1000.0
        buckets: dict[tuple[int, int], list[_Job]] = {}
        while True:
            timeout = oldest = None
            if buckets:
                oldest = min(buckets, key=lambda s: buckets[s][0].enqueued)
                timeout = max(0.0, buckets[oldest][0].enqueued + max_wait - time.perf_counter())
            try:
                # a due bucket runs only once the queue is empty: the backlog that piled up during the
                # last network call fills it first
                job = self._queue.get_nowait() if timeout == 0.0 else self._queue.get(timeout=timeout)
            except queue.Empty:
                self._run(buckets.pop(oldest))
                continue
            if job is _STOP:
                for shape in list(buckets):
                    self._run(buckets.pop(shape))
                return
            bucket = buckets.setdefault(job.loaded.meta.pad_shape, [])
            bucket.append(job)
            if len(bucket) >= self.settings.max_batch:
                self._run(buckets.pop(job.loaded.meta.pad_shape))

    def _run(self, jobs: list[_Job]) -> None:
        live = [j for j in jobs if j.future.set_running_or_notify_cancel()]  # timed-out ones were cancelled
        if not live:
            return
        started = time.perf_counter()
        timer = StageTimer(getattr(self.detector.backend, "device", None))
        try:
            results = {loaded.index: result for loaded, result in self.detector.run([j.loaded for j in live], timer)}
        except Exception as exc:
            log.exception("paadet serve: inference failed on a batch of %d", len(live))
            for j in live:
                j.future.set_exception(RequestError(500, f"inference failed: {type(exc).__name__}: {exc}"))
            return
        seconds = time.perf_counter() - started
        if self.on_batch is not None:
            try:
                self.on_batch(len(live), seconds)
            except Exception:
                log.exception("paadet serve: batch callback failed")
        batch_ms = {name: 1000.0 * s for name, s in timer.totals.items()}
        for j in live:
            timings = {name: 1000.0 * s for name, s in j.loaded.timings.items()}
            timings["queue"] = 1000.0 * (started - j.enqueued)
            timings["normalize"] = batch_ms.get("preprocess", 0.0)
            timings["network"] = batch_ms.get("network", 0.0)
            timings["postprocess"] = batch_ms.get("postprocess", 0.0)
            timings["batch_size"] = float(len(live))
            j.future.set_result((results[j.loaded.index], timings))
