"""The high-level API: :class:`Detector` turns image files or arrays into detections, on any backend.

Example::

    from paadet import Detector
    det = Detector.from_checkpoint("paa_r50_fpn_1x_coco_20200821-936edec3.pth", preset="mmdet", device="cpu")
    for r in det.predict(["a.jpg", "b.jpg"]):
        print(r.boxes, r.scores, r.labels)

    from paadet import DetectorSpec
    det = Detector.from_spec(DetectorSpec(backend="onnxruntime", model="paa.onnx"))
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np

from paadet.classes import ClassList
from paadet.data.images import ImageReadError
from paadet.data.pipeline import LoadedImage, iter_loaded
from paadet.detections import Detections, FrameResult, ImageResult
from paadet.preprocess import ImageMeta, Preset, resize
from paadet.runtime.base import Backend, StageTimer
from paadet.runtime.registry import OpenedModel, build_backend
from paadet.runtime.spec import DetectorSpec, TorchOptions

if TYPE_CHECKING:
    from paadet.sources import Frame, VideoReader, VideoSource


def split_detections(dets: Detections, metas: list[ImageMeta], names: list[str | None]) -> list[ImageResult]:
    """Fixed-shape batch detections -> one :class:`ImageResult` per image."""
    out = []
    boxes, scores, labels, num = (np.asarray(t) for t in dets)  # torch tensors on the host, or numpy arrays
    for i, meta in enumerate(metas):
        n = int(num[i])
        out.append(
            ImageResult(
                boxes=boxes[i, :n].astype(np.float32),
                scores=scores[i, :n].astype(np.float32),
                labels=labels[i, :n].astype(np.int64),
                ori_shape=meta.ori_shape,
                file_name=names[i],
            )
        )
    return out


@dataclasses.dataclass
class _LoadedFrame(LoadedImage):
    """A video frame after resizing: :class:`LoadedImage` with the frame's index, timestamp and picture."""

    frame: int = 0
    time_ms: float = 0.0
    image: np.ndarray | None = None


class Detector:
    """Images in, detections out, on any :class:`~paadet.runtime.base.Backend`.

    Images are batched by padded size, so each image is padded exactly as it would be alone and its
    detections do not depend on its batch-mates (the head's GroupNorm sees the padding).

    Args:
        backend: the runtime.
        batch_size: images per network call.
        workers: threads that decode and resize ahead of the network.
    """

    def __init__(self, backend: Backend, batch_size: int = 1, workers: int = 2) -> None:
        """A detector on ``backend`` (see :meth:`from_spec` and :meth:`from_checkpoint` to build one from options)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.backend = backend
        self.batch_size = batch_size
        self.workers = workers

    @property
    def preset(self) -> Preset:
        return self.backend.preset

    @property
    def classes(self) -> ClassList:
        """The model's classes: ``classes.names[label]``, COCO id ``classes.category_ids[label]``."""
        return self.backend.classes

    @classmethod
    def from_spec(cls, spec: DetectorSpec, opened: OpenedModel | None = None) -> Detector:
        """The detector ``spec`` describes, on its backend.

        ``opened``: the spec's weights file as :func:`paadet.runtime.registry.open_model` read it, when the
        caller already read it (for its classes, say); it is read here otherwise.

        ``spec.batch_size`` None: the graph's static batch, else ``spec.default_batch``.

        Raises:
            ValueError: options that do not go together (one line).
            PaadetError: a checkpoint or graph that cannot be used (one line, naming the file).
        """
        backend = build_backend(spec, opened)
        batch_size = spec.batch_size or backend.fixed_batch or spec.default_batch
        return cls(backend, batch_size=batch_size, workers=spec.workers)

    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike | None = None,
        preset: str | Preset | None = None,
        device: str = "cpu",
        fp16: bool = False,
        score_voting: bool = True,
        batch_size: int = 1,
        workers: int = 2,
        default_preset: str = "mmdet",
        **backend_options: Any,
    ) -> Detector:
        """A PyTorch detector from an mmdetection checkpoint: a file, a model name of :mod:`paadet.zoo`
        (``paa_r101_fpn_ms-3x_coco``, its file downloaded once into the cache), or the official one if ``path`` is None.

        ``backend_options``: ``optimize=True`` or ``bf16=True`` on a CPU, and the CUDA options of
        :class:`~paadet.runtime.spec.TorchOptions` (``channels_last=True``...).

        ``preset`` None: the one the checkpoint was trained at (``meta.preset``, written by ``paadet
        train``), else ``default_preset``.
        """
        cuda_names = {f.name for f in dataclasses.fields(TorchOptions)}
        cuda = TorchOptions(**{k: v for k, v in backend_options.items() if k in cuda_names})
        others = {k: v for k, v in backend_options.items() if k not in cuda_names}
        spec = DetectorSpec(
            checkpoint=None if path is None else os.fspath(path),
            preset=preset,
            device=device,
            fp16=fp16,
            score_voting=score_voting,
            batch_size=batch_size,
            workers=workers,
            default_preset=default_preset,
            cuda=cuda,
            **others,
        )
        return cls.from_spec(spec.validate())

    def predict(self, images) -> list[ImageResult]:
        """Detect on one image or a list: paths (str / Path) or BGR ``uint8`` arrays ``[H, W, 3]``.

        Returns one :class:`ImageResult` per input, in input order. Raises ``ImageReadError`` (or
        ``ValueError`` for a bad array) naming the first input that cannot be used.
        """
        items = [images] if isinstance(images, (str, os.PathLike, np.ndarray)) else list(images)
        results: list[ImageResult | None] = [None] * len(items)
        for loaded, result in self.run(iter_loaded(items, self.preset, self.workers)):
            if loaded.error is not None:
                raise ImageReadError(loaded.error) if loaded.name else ValueError(loaded.error)
            results[loaded.index] = result
        return results  # type: ignore[return-value]

    def stream(
        self,
        source: str | os.PathLike | int | VideoSource | VideoReader,
        stride: int = 1,
        max_frames: int | None = None,
        keep_images: bool = False,
        timer: StageTimer | None = None,
        prefetch: int | None = None,
    ) -> Iterator[FrameResult]:
        """Detections of a video file, webcam (``0``, ``"/dev/video0"``) or stream URL, frame by frame, lazily.

        Frames are decoded and resized in a thread ahead of the network (at most ``prefetch`` frames ahead,
        default ``2 * batch_size + 2``: memory stays flat on a long video), batched by ``batch_size``, and
        yielded in order as their batch completes. Works on every backend.

        Args:
            source: the video (see :func:`paadet.sources.video_source`), or one already opened by
                :func:`paadet.sources.open_video` (closed here).
            stride: keep frames ``0, stride, 2 * stride ...``.
            max_frames: stop after this many kept frames.
            keep_images: put each decoded frame in :attr:`FrameResult.image` (to draw on).
            timer: adds the ``decode``, ``preprocess`` and network stages' times.
            prefetch: frames decoded ahead.

        Raises:
            SourceError: the source cannot be opened, or it stopped or failed mid-way; raised after every frame
                decoded before the failure was yielded, with ``frames_done`` (one line naming the source).
            MissingVideoLibrary: PyAV is not installed.
        """
        from paadet.sources import SourceError, VideoReader, open_video, read_ahead

        if stride < 1:
            raise ValueError(f"stride must be >= 1, got {stride}")
        reader = source if isinstance(source, VideoReader) else open_video(source)
        preset = self.preset

        def load(frame: Frame, decode_s: float) -> _LoadedFrame:
            started = time.perf_counter()
            resized, meta = resize(frame.image, preset)
            item = _LoadedFrame(index=frame.index, name=reader.name, resized=resized, meta=meta)
            item.timings = {"decode": decode_s, "preprocess": time.perf_counter() - started}
            item.frame, item.time_ms, item.image = frame.index, frame.time_ms, frame.image if keep_images else None
            return item

        def decoded() -> Iterator[_LoadedFrame]:  # runs in the read-ahead thread, which also closes the reader
            with reader:
                frames = reader.frames(stride, max_frames)
                while True:
                    started = time.perf_counter()
                    frame = next(frames, None)
                    if frame is None:
                        return
                    yield load(frame, time.perf_counter() - started)

        failure: list[SourceError] = []

        def fed() -> Iterator[_LoadedFrame]:  # a failure ends the input normally, so that the last batch still runs
            try:
                yield from read_ahead(decoded(), prefetch or 2 * self.batch_size + 2)
            except SourceError as exc:
                failure.append(exc)

        done = 0
        for item, result in self.run(fed(), timer):  # every item is a _LoadedFrame with a result: none failed to load
            done += 1
            yield FrameResult(reader.name, item.frame, item.time_ms, result, item.image)  # type: ignore[attr-defined,arg-type]
        if failure:
            raise SourceError(f"{failure[0]}; {done} frames done", done)

    def run(
        self, loaded: Iterable[LoadedImage], timer: StageTimer | None = None
    ) -> Iterator[tuple[LoadedImage, ImageResult | None]]:
        """Stream detections for already loaded images, batching images of equal padded size.

        Yields ``(loaded, result)`` as batches complete (not necessarily in input order); images
        that failed to load are yielded at once with ``result`` None. A backend whose ``concurrency`` is
        N > 1 gets up to N batches at once, from N threads.
        """
        buckets: dict[tuple[int, int], list[LoadedImage]] = {}
        pending = 0
        with _BatchRunner(self.backend, timer) as runner:
            for item in loaded:
                if timer is not None:
                    for stage, seconds in item.timings.items():
                        timer.add(stage, seconds)
                if item.error is not None:
                    yield item, None
                    continue
                bucket = buckets.setdefault(item.meta.pad_shape, [])
                bucket.append(item)
                pending += 1
                if len(bucket) >= self.batch_size:
                    yield from runner.submit(buckets.pop(item.meta.pad_shape))
                    pending -= len(bucket)
                elif pending > 4 * self.batch_size:  # many distinct sizes: run the fullest partial batch
                    shape = max(buckets, key=lambda s: len(buckets[s]))
                    flushed = buckets.pop(shape)
                    pending -= len(flushed)
                    yield from runner.submit(flushed)
            for shape in list(buckets):
                yield from runner.submit(buckets.pop(shape))
            yield from runner.drain()


class _BatchRunner:
    """Runs batches on a backend: in the caller's thread when its ``concurrency`` is 1, else up to
    ``concurrency`` at once in a thread pool; results come out oldest batch first."""

    def __init__(self, backend: Backend, timer: StageTimer | None) -> None:
        self.backend = backend
        self.timer = timer
        self.concurrency = max(1, int(getattr(backend, "concurrency", 1)))
        self._pool = (
            ThreadPoolExecutor(self.concurrency, thread_name_prefix="paadet-infer") if self.concurrency > 1 else None
        )
        self._in_flight: list[tuple[list[LoadedImage], Future]] = []

    def __enter__(self) -> _BatchRunner:
        return self

    def __exit__(self, *exc_info) -> None:
        if self._pool is not None:
            for _, future in self._in_flight:
                future.cancel()
            self._pool.shutdown(wait=True)

    def _infer(self, batch: list[LoadedImage]) -> Detections:
        return self.backend.infer([b.resized for b in batch], [b.meta for b in batch], self.timer)

    @staticmethod
    def _results(batch: list[LoadedImage], dets: Detections) -> Iterator[tuple[LoadedImage, ImageResult]]:
        yield from zip(batch, split_detections(dets, [b.meta for b in batch], [b.name for b in batch]), strict=False)

    def submit(self, batch: list[LoadedImage]) -> Iterator[tuple[LoadedImage, ImageResult]]:
        """Start ``batch``; yields the results of batches that must finish first to keep at most
        ``concurrency`` in flight (``batch`` itself when running inline)."""
        if self._pool is None:
            yield from self._results(batch, self._infer(batch))
            return
        self._in_flight.append((batch, self._pool.submit(self._infer, batch)))
        while len(self._in_flight) > self.concurrency:
            yield from self._pop()

    def drain(self) -> Iterator[tuple[LoadedImage, ImageResult]]:
        """The results of every batch still in flight."""
        while self._in_flight:
            yield from self._pop()

    def _pop(self) -> Iterator[tuple[LoadedImage, ImageResult]]:
        batch, future = self._in_flight.pop(0)
        yield from self._results(batch, future.result())
