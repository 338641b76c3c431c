"""The COCO training data path of mmdetection 3.3's PAA config: parsing, per-sample transforms, batching.

Everything here reproduces ``configs/_base_/datasets/coco_detection.py`` (train pipeline
``LoadImageFromFile, LoadAnnotations(with_bbox), Resize((1333, 800), keep_ratio), RandomFlip(0.5),
PackDetInputs``; ``filter_cfg=dict(filter_empty_gt=True, min_size=32)``; ``DefaultSampler(shuffle)``
with ``AspectRatioBatchSampler``) and the training half of ``DetDataPreprocessor`` (BGR -> RGB,
normalise, zero-pad to a multiple of 32). The rules, and where they were read in the mmdet 3.3.0 and
mmengine 0.10.4 wheels:

Parsing (``mmdet/datasets/coco.py``: ``load_data_list``, ``parse_data_info``, ``filter_data``):

* Classes. mmdet's labels are ``cat2label = {id: i for i, id in enumerate(coco.get_cat_ids(
  cat_names=classes))}``, and pycocotools' ``getCatIds`` returns the ids of the file's
  ``categories`` list *in file order* (filtered by name), whatever the order of ``classes``. With
  ``classes`` = the file's category names, label ``i`` is therefore the ``i``-th category listed in
  the file (not sorted by id). :attr:`CocoTrainDataset.classes` / ``category_ids`` are that list.
* Images in the file's order (``getImgIds`` = the ``imgs`` dict, filled in file order); each
  image's annotations in the file's order.
* An annotation is dropped when ``ann.get('ignore')`` is truthy; when its box has no overlap with
  the image (``inter_w * inter_h == 0`` with ``inter_w = max(0, min(x1 + w, width) - max(x1, 0))``,
  from the annotation file's ``width``/``height``); when ``area <= 0 or w < 1 or h < 1``; or when
  its ``category_id`` is not a listed category. Kept boxes become ``[x1, y1, x1 + w, y1 + h]``
  (float32, as ``LoadAnnotations`` builds ``HorizontalBoxes``).
* ``iscrowd`` boxes get ``ignore_flag=1``; ``PackDetInputs`` moves them to ``ignored_instances``,
  which PAA never reads (``ignore_iof_thr=-1``), so they are simply left out of the targets.
* ``filter_empty_gt``: an image is kept when its id is in ``cat_img_map`` of some listed category,
  i.e. when *any* annotation (crowd, ignored, degenerate, all included) names it with a listed
  category. So an image whose only boxes are crowd or degenerate stays, with 0 GT.
* ``min_size``: an image is kept when ``min(width, height) >= min_size``, with the annotation
  file's ``width``/``height``.

Per sample (``mmdet/datasets/transforms/transforms.py`` ``Resize``, ``RandomFlip``;
``mmdet/structures/bbox/horizontal_boxes.py`` ``rescale_``, ``clip_``, ``flip_``):

* decode with :func:`paadet.data.images.read_image` (mmcv ``imfrombytes``, cv2, BGR ``uint8``);
* keep-ratio bilinear resize on ``uint8`` (:func:`paadet.preprocess.resize`, = mmcv ``imrescale``);
  ``scale_factor = (new_w / w, new_h / h)`` of the *decoded* image; boxes times
  ``float32([sw, sh, sw, sh])`` in float32, then clipped to ``[0, new_w] x [0, new_h]``
  (``clip_object_border=True``);
* horizontal flip of the resized image; boxes ``x1' = new_w - x2, x2' = new_w - x1`` (float32);
* :func:`paadet.preprocess.normalize_numpy` (``normalize_pad`` with the unpadded shape, in numpy): RGB, ``(x - mean) / std``
  in float32.

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

Differences from mmdetection, on purpose:

* Flips are not drawn from numpy's global RNG (``RandomFlip`` calls ``np.random.choice``) but from
  :func:`flip_decision` ``(seed, epoch, index)``, so a resumed run sees the same flips.
* An unreadable image does not raise (mmengine's ``BaseDataset`` would re-draw a random index only
  when a transform returns ``None``, and ``LoadImageFromFile`` raises): its :class:`TrainSample`
  carries ``error`` and :func:`collate_train` lists it in ``TrainBatch.skipped``.
* A missing ``area`` is taken as ``w * h`` (by :func:`paadet.data.coco.validate_annotations`), and a
  category without a ``name`` is named by its id; mmdet raises ``KeyError`` on both.
* A dataset left with no image after filtering is a :class:`DatasetError`.
"""
from __future__ import annotations

import math
import os
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
import torch
import torch.utils.data
from torch import Tensor
from torch.utils.data.distributed import DistributedSampler

from ..data.coco import LOADERS, DatasetError, is_number, read_json, validate_annotations
from ..data.images import ImageReadError, read_image
from ..preprocess import Preset, normalize_numpy, resize

SIZE_DIVISOR = 32
"""DetDataPreprocessor's ``pad_size_divisor`` in the PAA config."""

DROP_NO_ANNOTATIONS = "no annotations"
DROP_TOO_SMALL = "smaller than min_size"


@dataclass(frozen=True)
class TrainImage:
    """One image kept for training, with its parsed targets in the original pixel frame.

    Attributes:
        index: position in :attr:`CocoTrainDataset.images`.
        image_id: COCO image id.
        file_name: as listed (relative to the image folder).
        width, height: from the annotation file (used for filtering and aspect-ratio grouping).
        boxes: ``[M, 4]`` float32 ``x1, y1, x2, y2`` (crowd boxes excluded).
        labels: ``[M]`` int64 in ``0..C-1`` (position of the category in the file's list).
        num_crowd: crowd boxes that passed the box rules (ignored instances; no effect on PAA).
    """

    index: int
    image_id: Any
    file_name: str
    width: float
    height: float
    boxes: np.ndarray
    labels: np.ndarray
    num_crowd: int = 0


@dataclass
class TrainSample:
    """One transformed training image.

    Attributes:
        image: ``[3, h, w]`` float32 normalised RGB, unpadded (``None`` when ``error`` is set).
        boxes: ``[M, 4]`` float32 ``x1, y1, x2, y2`` in the resized (and flipped) frame.
        labels: ``[M]`` int64 in ``0..C-1``, in the annotation file's category order.
        file_name: as listed in the annotation file.
        img_shape: ``(h, w)`` after resizing; ``(0, 0)`` on error.
        ori_shape: ``(H, W)`` of the decoded image; ``(0, 0)`` on error.
        scale_factor: ``(w_scale, h_scale)`` = resized / decoded size.
        flipped: whether the horizontal flip was applied.
        error: why the image could not be used (one line naming the file), else ``None``.
        index: the dataset index the sample was loaded from.
    """

    image: Tensor | None
    boxes: Tensor
    labels: Tensor
    file_name: str
    img_shape: tuple[int, int]
    ori_shape: tuple[int, int]
    scale_factor: tuple[float, float]
    flipped: bool
    error: str | None = None
    index: int = -1


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


def flip_decision(seed: int, epoch: int, index: int, flip_prob: float) -> bool:
    """Whether sample ``index`` is flipped in ``epoch``: a fixed function of its arguments.

    A uniform draw from ``numpy.random.default_rng((seed, epoch, index))`` compared with
    ``flip_prob`` (0 never flips, 1 always does); the same on every machine, worker and rank.
    """
    if flip_prob <= 0.0:
        return False
    if flip_prob >= 1.0:
        return True
    return bool(np.random.default_rng((seed, epoch, index)).random() < flip_prob)


def _check_image_sizes(data: dict, path: Path) -> None:
    for image in data["images"]:
        for key in ("width", "height"):
            value = image.get(key)
            if not is_number(value) or not value > 0:
                raise DatasetError(
                    f"{path}: image {image['id']} needs a positive '{key}' (training filters on it), got {value!r}")


def parse_annotations(
    data: dict, *, min_size: float = 32, filter_empty_gt: bool = True,
) -> tuple[tuple[str, ...], tuple[Any, ...], list[TrainImage], list[tuple[str, str]]]:
    """mmdetection's ``parse_data_info`` + ``filter_data`` on a validated annotation dict.

    Returns:
        ``(classes, category_ids, images, dropped)``: the category names and ids in file order, the
        kept images in file order, and ``(file_name, reason)`` for each image filtered out.
    """
    cats = data["categories"]
    category_ids = tuple(c["id"] for c in cats)
    classes = tuple(str(c["name"]) if isinstance(c.get("name"), str) else str(c["id"]) for c in cats)
    label_of = {cid: i for i, cid in enumerate(category_ids)}
    anns_of: dict[Any, list[dict]] = {}
    with_listed_category: set[Any] = set()
    for ann in data["annotations"]:
        anns_of.setdefault(ann["image_id"], []).append(ann)
        if ann["category_id"] in label_of:
            with_listed_category.add(ann["image_id"])

    kept: list[TrainImage] = []
    dropped: list[tuple[str, str]] = []
    for info in data["images"]:
        img_id, width, height = info["id"], info["width"], info["height"]
        if filter_empty_gt and img_id not in with_listed_category:
            dropped.append((info["file_name"], DROP_NO_ANNOTATIONS))
            continue
        if not min(width, height) >= min_size:
            dropped.append((info["file_name"], DROP_TOO_SMALL))
            continue
        boxes: list[list[float]] = []
        labels: list[int] = []
        num_crowd = 0
        for ann in anns_of.get(img_id, []):
            if ann.get("ignore", False):
                continue
            x1, y1, w, h = ann["bbox"]
            inter_w = max(0, min(x1 + w, width) - max(x1, 0))
            inter_h = max(0, min(y1 + h, height) - max(y1, 0))
            if inter_w * inter_h == 0:
                continue
            if ann["area"] <= 0 or w < 1 or h < 1:
                continue
            if ann["category_id"] not in label_of:
                continue
            if ann.get("iscrowd", False):
                num_crowd += 1
                continue
            boxes.append([x1, y1, x1 + w, y1 + h])
            labels.append(label_of[ann["category_id"]])
        kept.append(TrainImage(
            index=len(kept), image_id=img_id, file_name=info["file_name"], width=width, height=height,
            boxes=np.array(boxes, dtype=np.float32).reshape(-1, 4), labels=np.array(labels, dtype=np.int64),
            num_crowd=num_crowd,
        ))
    return classes, category_ids, kept, dropped


class CocoTrainDataset(torch.utils.data.Dataset):
    """A COCO ``instances`` file and its image folder as mmdetection's training dataset.

    Args:
        ann_file: the annotation file.
        image_dir: the folder the ``file_name`` entries are relative to.
        scale: ``(long_max, short_max)`` of the keep-ratio resize.
        flip_prob: probability of the horizontal flip.
        seed: seed of :func:`flip_decision`.
        min_size: images with ``min(width, height) < min_size`` (annotation sizes) are skipped.
        filter_empty_gt: skip images that no annotation of a listed category names.

    Attributes:
        classes: category names in the annotation file's order; label ``i`` is ``classes[i]``.
        category_ids: the matching COCO category ids.
        images: the kept :class:`TrainImage` entries, in the annotation file's order.
        file_names: their file names.
        dropped: ``(file_name, reason)`` of the images filtered out.
        warnings: one-line warnings from the annotation file (annotations on unlisted ids).
        epoch: the epoch whose flips ``dataset[i]`` gives (see :meth:`set_epoch`).

    Raises:
        DatasetError: the image folder is missing, the annotation file is malformed (one line naming
            it), or no image is left after filtering.
    """

    def __init__(
        self,
        ann_file: str | os.PathLike,
        image_dir: str | os.PathLike,
        *,
        scale: tuple[int, int] = (1333, 800),
        flip_prob: float = 0.5,
        seed: int = 0,
        min_size: float = 32,
        filter_empty_gt: bool = True,
    ) -> None:
        self.ann_file, self.image_dir = Path(ann_file), Path(image_dir)
        if not 0.0 <= flip_prob <= 1.0:
            raise ValueError(f"flip_prob must be in [0, 1], got {flip_prob}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if not self.image_dir.is_dir():
            raise DatasetError(f"{self.image_dir}: image folder not found")
        data = read_json(self.ann_file, "annotation file")
        self.warnings = validate_annotations(data, self.ann_file, need_file_names=True)
        _check_image_sizes(data, self.ann_file)
        self.classes, self.category_ids, self.images, self.dropped = parse_annotations(
            data, min_size=min_size, filter_empty_gt=filter_empty_gt)
        if not self.classes:
            raise DatasetError(f"{self.ann_file}: no categories listed")
        if not self.images:
            raise DatasetError(
                f"{self.ann_file}: no training image left: {len(data['images'])} listed, "
                f"{sum(r == DROP_NO_ANNOTATIONS for _, r in self.dropped)} without annotations, "
                f"{sum(r == DROP_TOO_SMALL for _, r in self.dropped)} smaller than {min_size} px")
        self.scale = tuple(scale)
        self.flip_prob = float(flip_prob)
        self.seed = int(seed)
        self.epoch = 0
        self._preset = Preset("train", self.scale, size_divisor=SIZE_DIVISOR)

    @property
    def file_names(self) -> list[str]:
        return [entry.file_name for entry in self.images]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.images)

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose flips ``dataset[i]`` gives."""
        self.epoch = int(epoch)

    def __getitem__(self, index: int) -> TrainSample:
        return self.load(index, self.epoch)

    def load(self, index: int, epoch: int) -> TrainSample:
        """Decode, resize, flip (per :func:`flip_decision`) and normalise image ``index`` for ``epoch``.

        An image that cannot be read or resized gives a sample with ``error`` set; it never raises.
        """
        entry = self.images[index]
        flipped = flip_decision(self.seed, epoch, index, self.flip_prob)
        path = self.image_dir / entry.file_name
        try:
            bgr = read_image(path)
            resized, meta = resize(bgr, self._preset)
        except ImageReadError as exc:
            return _failed(entry, index, str(exc))
        except ValueError as exc:  # an image too thin to resize
            return _failed(entry, index, f"cannot resize image {path}: {exc}")
        new_h, new_w = meta.img_shape
        boxes = torch.from_numpy(entry.boxes) * torch.tensor(meta.scale_factor, dtype=torch.float32).repeat(2)
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, new_w)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, new_h)
        if flipped:
            resized = cv2.flip(resized, 1)
            boxes = torch.stack([new_w - boxes[:, 2], boxes[:, 1], new_w - boxes[:, 0], boxes[:, 3]], dim=1)
        return TrainSample(
            image=torch.from_numpy(normalize_numpy(resized)), boxes=boxes, labels=torch.from_numpy(entry.labels.copy()),
            file_name=entry.file_name, img_shape=(new_h, new_w), ori_shape=meta.ori_shape,
            scale_factor=meta.scale_factor, flipped=flipped, error=None, index=index,
        )


def _failed(entry: TrainImage, index: int, reason: str) -> TrainSample:
    return TrainSample(
        image=None, boxes=torch.zeros((0, 4), dtype=torch.float32), labels=torch.zeros((0,), dtype=torch.int64),
        file_name=entry.file_name, img_shape=(0, 0), ori_shape=(0, 0), scale_factor=(1.0, 1.0),
        flipped=False, error=reason, index=index,
    )


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
    dataset_len: int, *, shuffle: bool = True, seed: int = 0, epoch: int = 0, rank: int = 0, world_size: int = 1,
) -> list[int]:
    """This rank's sample order for an epoch: ``DistributedSampler`` (= mmengine's ``DefaultSampler``)."""
    class _Sized:
        def __len__(self) -> int:
            return dataset_len

    sampler = DistributedSampler(_Sized(), num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed, drop_last=False)
    sampler.set_epoch(epoch)
    return list(sampler)


def group_batches(
    indices: Sequence[int], batch_size: int, *, portrait: Sequence[bool] | None = None,
) -> list[list[int]]:
    """Cut an index order into batches, as mmdetection's ``AspectRatioBatchSampler`` does.

    With ``portrait`` (``width < height`` per dataset index), portrait and landscape images fill two
    buckets and a bucket is emitted as soon as it holds ``batch_size``; the leftovers of both buckets
    (portrait first) are emitted at the end in chunks of ``batch_size``. Without it, plain
    consecutive chunks (the last one may be short).
    """
    if portrait is None:
        return [list(indices[i:i + batch_size]) for i in range(0, len(indices), batch_size)]
    batches: list[list[int]] = []
    buckets: tuple[list[int], list[int]] = ([], [])
    for idx in indices:
        bucket = buckets[0 if portrait[idx] else 1]
        bucket.append(idx)
        if len(bucket) == batch_size:
            batches.append(bucket[:])
            bucket.clear()
    left = buckets[0] + buckets[1]
    batches.extend(left[i:i + batch_size] for i in range(0, len(left), batch_size))
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
        self, dataset: CocoTrainDataset, batches: list[list[int]], *, epoch: int, start_batch: int,
        total_batches: int, workers: int, loader: str, prefetch_batches: int,
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
            return iter(torch.utils.data.DataLoader(
                _EpochView(self.dataset, self.epoch), batch_sampler=self.batches, num_workers=self.workers,
                collate_fn=collate_train, prefetch_factor=max(1, self.prefetch_batches), persistent_workers=False,
            ))
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
        dataset, batches[start_batch:], epoch=epoch, start_batch=start_batch, total_batches=len(batches),
        workers=max(0, workers), loader=loader, prefetch_batches=max(1, prefetch_batches),
    )


def batches_per_epoch(num_images: int, batch_size: int, world_size: int = 1) -> int:
    """Batches each rank runs in an epoch: ``ceil(ceil(num_images / world_size) / batch_size)``."""
    return math.ceil(math.ceil(num_images / world_size) / batch_size)
