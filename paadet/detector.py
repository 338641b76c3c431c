"""The high-level API: :class:`Detector` turns image files or arrays into detections.

Example::

    from paadet import Detector
    det = Detector.from_checkpoint("paa_r50_fpn_1x_coco_20200821-936edec3.pth", preset="mmdet", device="cpu")
    for r in det.predict(["a.jpg", "b.jpg"]):
        print(r.boxes, r.scores, r.labels)
"""
from __future__ import annotations

import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from .coco import CATEGORY_IDS, ClassList
from .data.images import ImageReadError, ImageSource, read_image
from .detections import Detections, PostprocessConfig
from .preprocess import ImageMeta, Preset, get_preset, resize
from .runtime.base import Backend, StageTimer


@dataclass
class ImageResult:
    """Detections of one image, sorted by score.

    Attributes:
        boxes: ``[N, 4]`` float32 xyxy in original-image pixels.
        scores: ``[N]`` float32.
        labels: ``[N]`` int64 class indices into the model's class list (COCO's 80: see :mod:`paadet.coco`).
        ori_shape: ``(height, width)`` of the decoded image.
        file_name: the image's name for reports (relative path), or None for arrays.
    """

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    ori_shape: tuple[int, int]
    file_name: str | None = None

    def to_coco(self, image_id: int, category_ids: Sequence[int] | None = None) -> list[dict]:
        """COCO results entries (``bbox`` as ``[x, y, w, h]``, ``category_id`` from ``category_ids``: the
        model's, default COCO's 80)."""
        category_ids = CATEGORY_IDS if category_ids is None else category_ids
        out = []
        for (x1, y1, x2, y2), score, label in zip(self.boxes.tolist(), self.scores.tolist(), self.labels.tolist()):
            entry = {
                "image_id": image_id,
                "category_id": category_ids[label],
                "bbox": [x1, y1, x2 - x1, y2 - y1],
                "score": score,
            }
            if self.file_name is not None:
                entry["file_name"] = self.file_name
            out.append(entry)
        return out


@dataclass
class LoadedImage:
    """An input after decoding and resizing (or the reason it could not be read).

    Attributes:
        index: position in the input sequence.
        name: file name for reports.
        resized: BGR ``uint8`` resized image, None on error.
        meta: its geometry, None on error.
        error: one-line reason when the image could not be read.
        timings: seconds spent in ``decode`` and ``preprocess`` (resize) for this image.
    """

    index: int
    name: str | None
    resized: np.ndarray | None = None
    meta: ImageMeta | None = None
    error: str | None = None
    timings: dict[str, float] = field(default_factory=dict)


def load_one(index: int, item: ImageSource | np.ndarray | str | os.PathLike, preset: Preset) -> LoadedImage:
    """Decode (if a path) and resize one input; errors are captured, not raised."""
    name: str | None
    if isinstance(item, np.ndarray):
        name = None
    elif isinstance(item, ImageSource):
        name = item.file_name
    else:
        name = str(item)
    loaded = LoadedImage(index=index, name=name)
    if isinstance(item, ImageSource) and item.error is not None:
        loaded.error = item.error
        return loaded
    try:
        start = time.perf_counter()
        if isinstance(item, np.ndarray):
            image = as_bgr_uint8(item)
        else:
            image = read_image(item.path if isinstance(item, ImageSource) else Path(item))
        decoded = time.perf_counter()
        loaded.resized, loaded.meta = resize(image, preset)
        loaded.timings = {"decode": decoded - start, "preprocess": time.perf_counter() - decoded}
    except (ImageReadError, ValueError, OSError) as exc:
        loaded.error = str(exc)
    return loaded


def as_bgr_uint8(array: np.ndarray) -> np.ndarray:
    """Validate an in-memory image: ``[H, W, 3]`` BGR uint8 (OpenCV's layout); grey ``[H, W]`` is expanded."""
    if array.dtype != np.uint8:
        raise ValueError(f"image arrays must be uint8, got {array.dtype}")
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"image arrays must be [H, W, 3] BGR, got shape {tuple(array.shape)}")
    return array


def iter_loaded(items: Sequence, preset: Preset, workers: int = 2, prefetch: int = 16) -> Iterator[LoadedImage]:
    """Decode and resize inputs in a thread pool (OpenCV releases the GIL), yielding in input order."""
    if workers <= 0:
        for i, item in enumerate(items):
            yield load_one(i, item, preset)
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending = []
        for i, item in enumerate(items):
            pending.append(pool.submit(load_one, i, item, preset))
            if len(pending) >= prefetch:
                yield pending.pop(0).result()
        for fut in pending:
            yield fut.result()


def split_detections(dets: Detections, metas: list[ImageMeta], names: list[str | None]) -> list[ImageResult]:
    """Fixed-shape batch detections -> one :class:`ImageResult` per image."""
    out = []
    boxes, scores, labels, num = (np.asarray(t) for t in dets)  # torch tensors on the host, or numpy arrays
    for i, meta in enumerate(metas):
        n = int(num[i])
        out.append(ImageResult(
            boxes=boxes[i, :n].astype(np.float32), scores=scores[i, :n].astype(np.float32),
            labels=labels[i, :n].astype(np.int64), ori_shape=meta.ori_shape, file_name=names[i],
        ))
    return out


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
        **backend_options,
    ) -> "Detector":
        """A PyTorch detector from an mmdetection checkpoint (the official one, downloaded, if ``path`` is None).

        ``backend_options`` go to :class:`~paadet.runtime.torch_backend.TorchBackend` (e.g.
        ``optimize=True`` on a CPU, ``channels_last=True`` on CUDA).

        ``preset`` None: the one the checkpoint was trained at (``meta.preset``, written by ``paadet
        train``), else ``default_preset``.
        """
        from .checkpoint import load_checkpoint
        from .hub import resolve_checkpoint
        from .model.loading import load_network
        from .runtime.torch_backend import TorchBackend

        checkpoint = load_checkpoint(resolve_checkpoint(path))
        chosen = get_preset(preset) if preset is not None else checkpoint.preset or get_preset(default_preset)
        backend = TorchBackend(
            load_network(checkpoint), preset=chosen, device=device, fp16=fp16,
            postprocess=PostprocessConfig(score_voting=score_voting), **backend_options,
        )
        return cls(backend, batch_size=batch_size, workers=workers)

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

    def run(self, loaded: Iterable[LoadedImage], timer: StageTimer | None = None) -> Iterator[tuple[LoadedImage, ImageResult | None]]:
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
        self._pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="paadet-infer") if self.concurrency > 1 else None
        self._in_flight: list[tuple[list[LoadedImage], Future]] = []

    def __enter__(self) -> "_BatchRunner":
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
        yield from zip(batch, split_detections(dets, [b.meta for b in batch], [b.name for b in batch]))

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
