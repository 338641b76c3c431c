"""Decoding and resizing images ahead of the network, in worker threads or processes.

:class:`LoadedImage` is an input after decoding and resizing (or the reason it could not be read);
:func:`iter_loaded` makes them in a thread pool, in input order. :func:`iter_images` runs its workers as
threads (the default, fastest here: OpenCV releases the GIL while decoding and resizing, and nothing is
pickled) or as the worker processes of a ``torch.utils.data.DataLoader`` (torch is imported only then:
evaluating an exported graph needs none).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from paadet.data.coco import LOADERS
from paadet.data.images import ImageReadError, ImageSource, read_image
from paadet.preprocess import ImageMeta, Preset, resize


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


class ImageDataset:
    """Decode + resize as a map-style dataset (``__len__`` and ``__getitem__``, all a ``DataLoader`` needs),
    for a ``DataLoader`` with worker processes."""

    def __init__(self, sources: Sequence[ImageSource], preset: Preset) -> None:
        self.sources = list(sources)
        self.preset = preset

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, index: int) -> LoadedImage:
        return load_one(index, self.sources[index], self.preset)


def _identity(item: LoadedImage) -> LoadedImage:
    return item


def iter_images(
    sources: Sequence[ImageSource],
    preset: Preset,
    workers: int = 2,
    loader: Literal["threads", "processes"] = "threads",
    prefetch: int = 16,
) -> Iterator[LoadedImage]:
    """Decode and resize ``sources`` ahead of the network, yielding :class:`LoadedImage` in order.

    Args:
        sources: the images.
        preset: the resize preset.
        workers: parallel workers (0: decode in the calling thread).
        loader: ``threads`` (:func:`paadet.detector.iter_loaded`) or ``processes`` (a
            ``torch.utils.data.DataLoader`` over :class:`ImageDataset`).
        prefetch: images decoded ahead (threads), or per worker ``prefetch // workers`` (processes).
    """
    if loader not in LOADERS:
        raise ValueError(f"unknown loader {loader!r}; choose one of {', '.join(LOADERS)}")
    if loader == "threads" or workers <= 0:
        yield from iter_loaded(sources, preset, workers=workers, prefetch=prefetch)
        return
    import torch.utils.data

    data_loader = torch.utils.data.DataLoader(
        ImageDataset(sources, preset),
        batch_size=None,
        shuffle=False,
        num_workers=workers,
        collate_fn=_identity,
        prefetch_factor=max(1, prefetch // workers),
        persistent_workers=False,
    )
    yield from data_loader
