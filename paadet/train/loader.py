"""Batching and sampling a training set as mmdetection 3.3 does (``DetDataPreprocessor``'s padding, mmengine's
``DefaultSampler``, mmdet's ``AspectRatioBatchSampler``), with the images decoded ahead in threads or processes.

Batching (``mmdet/models/data_preprocessors/data_preprocessor.py``, mmengine ``stack_batch``): zero
padding after normalisation at the bottom and right, to the batch's max height and width each rounded
up to 32; each image's own ``pad_shape`` is ``(ceil(h/32)*32, ceil(w/32)*32)``.

Sampling (mmengine ``dataset/sampler.py`` ``DefaultSampler``; mmdet
``datasets/samplers/batch_sampler.py`` ``AspectRatioBatchSampler``): ``randperm`` of a
``torch.Generator`` seeded with ``seed + epoch``, padded by repetition to a multiple of the world
size, rank ``r`` taking ``indices[r::world_size]``. That is exactly
``torch.utils.data.distributed.DistributedSampler`` (used here). The batch sampler then groups
portrait (``width < height``) and landscape images into separate batches, and yields the leftovers
of both groups together at the end (implemented; ``aspect_ratio_grouping=False`` turns it off; with
batch size 1 it changes nothing).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.utils.data
from torch import Tensor
from torch.utils.data.distributed import DistributedSampler

from paadet.data.coco import LOADERS
from paadet.train.dataset import SIZE_DIVISOR, CocoTrainDataset, TrainSample


@dataclass
class TrainBatch:
    """A padded batch of the samples that could be loaded.

    ``B`` is the number of usable samples; it can be 0 when every sample of the batch failed to load:
    then ``images`` is ``None`` and every list is empty except ``skipped``.

    Attributes:
        images: ``[B, 3, H, W]`` float32, ``H``/``W`` the batch max rounded up to 32, zeros after
            normalisation at the bottom and right; ``None`` when ``B == 0``.
        gt_boxes: ``B`` tensors ``[M_i, 4]`` float32 xyxy in the resized frame.
        gt_labels: ``B`` tensors ``[M_i]`` int64.
        pad_shapes: each image's own ``(ceil(h/32)*32, ceil(w/32)*32)`` (for the anchors' valid flags).
        img_shapes: each image's ``(h, w)`` before padding.
        file_names: the images, in batch order.
        skipped: ``(file_name, reason)`` of the samples left out.
        ori_shapes: each image's decoded ``(H, W)``.
        scale_factors: each image's ``(w_scale, h_scale)``.
        flipped: whether each image was flipped.
        indices: each image's dataset index.
    """

    images: Tensor | None
    gt_boxes: list[Tensor]
    gt_labels: list[Tensor]
    pad_shapes: list[tuple[int, int]]
    img_shapes: list[tuple[int, int]]
    file_names: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    ori_shapes: list[tuple[int, int]] = field(default_factory=list)
    scale_factors: list[tuple[float, float]] = field(default_factory=list)
    flipped: list[bool] = field(default_factory=list)
    indices: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.file_names)

    @property
    def batch_input_shape(self) -> tuple[int, int] | None:
        """``(H, W)`` of the padded batch, or ``None`` when it is empty."""
        return None if self.images is None else (int(self.images.shape[-2]), int(self.images.shape[-1]))


def _round_up(value: int, divisor: int) -> int:
    return -(-value // divisor) * divisor


def collate_train(samples: Sequence[TrainSample], *, size_divisor: int = SIZE_DIVISOR) -> TrainBatch:
    """Pad the usable samples into one batch; samples with an ``error`` go to ``skipped``.

    The batch is ``[B, 3, H, W]`` with ``H``/``W`` the largest height/width rounded up to
    ``size_divisor``, zero-filled (after normalisation) at the bottom and right of each image.
    """
    usable = [s for s in samples if s.error is None]
    skipped = [(s.file_name, s.error) for s in samples if s.error is not None]
    pad_shapes = [(_round_up(s.img_shape[0], size_divisor), _round_up(s.img_shape[1], size_divisor)) for s in usable]
    images = None
    if usable:
        height, width = max(p[0] for p in pad_shapes), max(p[1] for p in pad_shapes)
        images = usable[0].image.new_zeros((len(usable), 3, height, width))
        for i, s in enumerate(usable):
            h, w = s.img_shape
            images[i, :, :h, :w] = s.image
    return TrainBatch(
        images=images,
        gt_boxes=[s.boxes for s in usable],
        gt_labels=[s.labels for s in usable],
        pad_shapes=pad_shapes,
        img_shapes=[tuple(s.img_shape) for s in usable],
        file_names=[s.file_name for s in usable],
        skipped=skipped,
        ori_shapes=[tuple(s.ori_shape) for s in usable],
        scale_factors=[tuple(s.scale_factor) for s in usable],
        flipped=[s.flipped for s in usable],
        indices=[s.index for s in usable],
    )


def epoch_indices(
    dataset_len: int,
    *,
    shuffle: bool = True,
    seed: int = 0,
    epoch: int = 0,
    rank: int = 0,
    world_size: int = 1,
) -> list[int]:
    """This rank's sample order for an epoch: ``DistributedSampler`` (= mmengine's ``DefaultSampler``)."""

    class _Sized:
        def __len__(self) -> int:
            return dataset_len

    sampler = DistributedSampler(
        _Sized(), num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed, drop_last=False
    )
    sampler.set_epoch(epoch)
    return list(sampler)


def group_batches(
    indices: Sequence[int],
    batch_size: int,
    *,
    portrait: Sequence[bool] | None = None,
) -> list[list[int]]:
    """Cut an index order into batches, as mmdetection's ``AspectRatioBatchSampler`` does.

    With ``portrait`` (``width < height`` per dataset index), portrait and landscape images fill two
    buckets and a bucket is emitted as soon as it holds ``batch_size``; the leftovers of both buckets
    (portrait first) are emitted at the end in chunks of ``batch_size``. Without it, plain
    consecutive chunks (the last one may be short).
    """
    if portrait is None:
        return [list(indices[i : i + batch_size]) for i in range(0, len(indices), batch_size)]
    batches: list[list[int]] = []
    buckets: tuple[list[int], list[int]] = ([], [])
    for idx in indices:
        bucket = buckets[0 if portrait[idx] else 1]
        bucket.append(idx)
        if len(bucket) == batch_size:
            batches.append(bucket[:])
            bucket.clear()
    left = buckets[0] + buckets[1]
    batches.extend(left[i : i + batch_size] for i in range(0, len(left), batch_size))
    return batches


class _EpochView(torch.utils.data.Dataset):
    """``dataset.load(i, epoch)`` as a map-style dataset, for DataLoader worker processes."""

    def __init__(self, dataset: CocoTrainDataset, epoch: int) -> None:
        self.dataset, self.epoch = dataset, epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> TrainSample:
        return self.dataset.load(index, self.epoch)


class TrainLoader:
    """One epoch of batches for one rank; iterate it once or several times (same batches each time).

    Attributes:
        batches: the dataset indices of each remaining batch (after ``start_batch``).
        total_batches: batches in the whole epoch for this rank (``start_batch`` included).
        start_batch: batches skipped at the start.
    """

    def __init__(
        self,
        dataset: CocoTrainDataset,
        batches: list[list[int]],
        *,
        epoch: int,
        start_batch: int,
        total_batches: int,
        workers: int,
        loader: str,
        prefetch_batches: int,
    ) -> None:
        self.dataset, self.batches, self.epoch = dataset, batches, epoch
        self.start_batch, self.total_batches = start_batch, total_batches
        self.workers, self.loader, self.prefetch_batches = workers, loader, prefetch_batches

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[TrainBatch]:
        if not self.batches:
            return iter(())
        if self.loader == "processes" and self.workers > 0:
            return iter(
                torch.utils.data.DataLoader(
                    _EpochView(self.dataset, self.epoch),
                    batch_sampler=self.batches,
                    num_workers=self.workers,
                    collate_fn=collate_train,
                    prefetch_factor=max(1, self.prefetch_batches),
                    persistent_workers=False,
                )
            )
        return self._iter_threads()

    def _iter_threads(self) -> Iterator[TrainBatch]:
        load, epoch = self.dataset.load, self.epoch
        if self.workers <= 0:
            for batch in self.batches:
                yield collate_train([load(i, epoch) for i in batch])
            return
        window = max(self.workers, self.prefetch_batches * max(len(b) for b in self.batches))
        flat = [(b, i) for b, batch in enumerate(self.batches) for i in batch]
        pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="paadet-train-data")
        try:
            pending: deque[tuple[int, Future]] = deque()
            position = 0
            for b, batch in enumerate(self.batches):
                while position < len(flat) and len(pending) < window + len(batch):
                    pending.append((flat[position][0], pool.submit(load, flat[position][1], epoch)))
                    position += 1
                samples = []
                while pending and pending[0][0] == b:
                    samples.append(pending.popleft()[1].result())
                yield collate_train(samples)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


def build_train_loader(
    dataset: CocoTrainDataset,
    *,
    batch_size: int,
    shuffle: bool = True,
    seed: int = 0,
    epoch: int = 0,
    workers: int = 2,
    rank: int = 0,
    world_size: int = 1,
    start_batch: int = 0,
    aspect_ratio_grouping: bool = True,
    loader: Literal["threads", "processes"] = "threads",
    prefetch_batches: int = 2,
) -> TrainLoader:
    """The batches of one epoch for one rank, loaded ahead of the training step.

    The order is a fixed function of ``(seed, epoch, rank, world_size)`` (see :func:`epoch_indices`),
    and each sample's flip of ``(dataset.seed, epoch, index)``; neither depends on ``workers`` or
    ``loader``, so a run resumed with ``start_batch`` continues exactly where it stopped. Also sets
    ``dataset.epoch`` (so ``dataset[i]`` gives this epoch's flips).

    Args:
        dataset: the training set.
        batch_size: images per batch on this process.
        shuffle: shuffle with a ``torch.Generator`` seeded ``seed + epoch`` (else dataset order).
        seed: seed of the order.
        epoch: the epoch (changes the order and the flips).
        workers: parallel loaders; 0 loads in the calling thread.
        rank, world_size: this process's share for DDP (indices padded by repetition to a multiple
            of ``world_size``, rank ``r`` takes every ``world_size``-th from ``r``).
        start_batch: batches of this epoch already done (resuming mid-epoch): they are not loaded.
        aspect_ratio_grouping: mmdetection's ``AspectRatioBatchSampler`` (see :func:`group_batches`).
        loader: ``threads`` (default: a thread pool, faster here since OpenCV and numpy release the
            GIL and nothing is pickled) or ``processes`` (a ``DataLoader`` with ``workers`` processes).
        prefetch_batches: batches loaded ahead.

    Raises:
        ValueError: a bad batch size, rank, loader, or a ``start_batch`` past the epoch's end.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size), got rank {rank} of world_size {world_size}")
    if loader not in LOADERS:
        raise ValueError(f"unknown loader {loader!r}; choose one of {', '.join(LOADERS)}")
    indices = epoch_indices(len(dataset), shuffle=shuffle, seed=seed, epoch=epoch, rank=rank, world_size=world_size)
    portrait = [entry.width < entry.height for entry in dataset.images] if aspect_ratio_grouping else None
    batches = group_batches(indices, batch_size, portrait=portrait)
    if not 0 <= start_batch <= len(batches):
        raise ValueError(f"start_batch {start_batch} is outside this epoch's {len(batches)} batches")
    dataset.set_epoch(epoch)
    return TrainLoader(
        dataset,
        batches[start_batch:],
        epoch=epoch,
        start_batch=start_batch,
        total_batches=len(batches),
        workers=max(0, workers),
        loader=loader,
        prefetch_batches=max(1, prefetch_batches),
    )


def batches_per_epoch(num_images: int, batch_size: int, world_size: int = 1) -> int:
    """Batches each rank runs in an epoch: ``ceil(ceil(num_images / world_size) / batch_size)``."""
    return math.ceil(math.ceil(num_images / world_size) / batch_size)
