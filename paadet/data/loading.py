"""Decoding and resizing a dataset's images ahead of the network, in worker threads or processes.

:func:`iter_images` runs its workers as threads (the default, fastest here: OpenCV releases the GIL
while decoding and resizing, and nothing is pickled) or as the worker processes of a
``torch.utils.data.DataLoader`` (torch is imported only then: evaluating an exported graph needs none).
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Literal

from ..detector import LoadedImage, iter_loaded, load_one
from ..preprocess import Preset
from .coco import LOADERS
from .images import ImageSource


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
        ImageDataset(sources, preset), batch_size=None, shuffle=False, num_workers=workers,
        collate_fn=_identity, prefetch_factor=max(1, prefetch // workers), persistent_workers=False,
    )
    yield from data_loader
