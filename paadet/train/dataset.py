"""A training set's samples as mmdetection 3.3's PAA train pipeline makes them: decoded, resized, flipped,
normalised (``LoadImageFromFile, LoadAnnotations, Resize((1333, 800), keep_ratio), RandomFlip(0.5)``, and the
normalisation of ``DetDataPreprocessor``); with two scales, ``RandomResize([(1333, 640), (1333, 800)],
keep_ratio=True)`` instead of ``Resize`` (the ms-3x recipe, :func:`random_resize_scale`).

Per sample (``mmdet/datasets/transforms/transforms.py`` ``Resize``, ``RandomFlip``;
``mmdet/structures/bbox/horizontal_boxes.py`` ``rescale_``, ``clip_``, ``flip_``):

* decode with :func:`paadet.data.images.read_image` (mmcv ``imfrombytes``, cv2, BGR ``uint8``);
* with a scale range, the image's scale drawn as mmcv's ``RandomResize._random_sample`` draws it
  (:func:`random_resize_scale`), from a generator seeded by ``(seed, epoch, index)`` (:func:`scale_draw_seed`);
* keep-ratio bilinear resize on ``uint8`` (:func:`paadet.preprocess.resize`, = mmcv ``imrescale``);
  ``scale_factor = (new_w / w, new_h / h)`` of the *decoded* image; boxes times
  ``float32([sw, sh, sw, sh])`` in float32, then clipped to ``[0, new_w] x [0, new_h]``
  (``clip_object_border=True``);
* horizontal flip of the resized image; boxes ``x1' = new_w - x2, x2' = new_w - x1`` (float32);
* :func:`paadet.preprocess.normalize_numpy` (``normalize_pad`` with the unpadded shape, in numpy): RGB,
  ``(x - mean) / std``
  in float32.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.utils.data
from torch import Tensor

from paadet.data.coco import DatasetError, read_json, validate_annotations
from paadet.data.images import ImageReadError, read_image
from paadet.preprocess import Preset, normalize_numpy, resize
from paadet.train.annotations import (
    DROP_NO_ANNOTATIONS,
    DROP_TOO_SMALL,
    TrainImage,
    check_image_sizes,
    parse_annotations,
)
from paadet.train.config import Scale

SIZE_DIVISOR = 32
"""DetDataPreprocessor's ``pad_size_divisor`` in the PAA config (the training resize pads to it)."""


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
        scale: the :data:`~paadet.train.config.Scale` it was resized to fit (drawn, with a scale range).
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
    scale: Scale = (0, 0)


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


SCALE_STREAM = 1
"""The last entry of the seed of :func:`scale_draw_seed`, which keeps the scale draws apart from the flips'."""


def scale_draw_seed(seed: int, epoch: int, index: int) -> int:
    """The 32-bit seed of sample ``index``'s scale draw in ``epoch``: ``SeedSequence((seed, epoch, index, 1))``'s
    first word, a fixed function of its arguments (the same on every machine, worker and rank)."""
    return int(np.random.SeedSequence((seed, epoch, index, SCALE_STREAM)).generate_state(1)[0])


def random_resize_scale(scales: tuple[Scale, Scale], rng: np.random.RandomState) -> Scale:
    """One draw of mmcv 2.x's ``RandomResize._random_sample(scales)`` (``mmcv/transforms/processing.py``).

    Each position is drawn on its own, first then second, as ``rng.randint(low, high + 1)``, the bounds being
    the two scales' minimum and maximum at that position: for ``[(1333, 640), (1333, 800)]`` the first is always
    1333 and the second uniform over the integers 640..800, both ends included. mmcv draws from numpy's global
    ``RandomState``; here ``rng``, a ``RandomState`` too, so that one seeded alike gives the same numbers. With
    ``keep_ratio=True`` the draw is then a plain keep-ratio :data:`~paadet.train.config.Scale`: its larger number
    bounds the long side and its smaller the short side (``rescale_size``), whichever position they came from.
    """
    first = (scales[0][0], scales[1][0])
    second = (scales[0][1], scales[1][1])
    edge_0 = int(rng.randint(min(first), max(first) + 1))
    edge_1 = int(rng.randint(min(second), max(second) + 1))
    return edge_0, edge_1


class CocoTrainDataset(torch.utils.data.Dataset):
    """A COCO ``instances`` file and its image folder as mmdetection's training dataset.

    Args:
        ann_file: the annotation file.
        image_dir: the folder the ``file_name`` entries are relative to.
        scale: ``(long_max, short_max)`` of the keep-ratio resize, or two such pairs: the range each image's
            scale is drawn from per epoch (:func:`random_resize_scale`).
        flip_prob: probability of the horizontal flip.
        seed: seed of :func:`flip_decision` and of the scale draws.
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
        scale: Scale | tuple[Scale, Scale] = (1333, 800),
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
        check_image_sizes(data, self.ann_file)
        self.classes, self.category_ids, self.images, self.dropped = parse_annotations(
            data, min_size=min_size, filter_empty_gt=filter_empty_gt
        )
        if not self.classes:
            raise DatasetError(f"{self.ann_file}: no categories listed")
        if not self.images:
            raise DatasetError(
                f"{self.ann_file}: no training image left: {len(data['images'])} listed, "
                f"{sum(r == DROP_NO_ANNOTATIONS for _, r in self.dropped)} without annotations, "
                f"{sum(r == DROP_TOO_SMALL for _, r in self.dropped)} smaller than {min_size} px"
            )
        values = tuple(scale)
        multi = all(isinstance(v, (tuple, list)) for v in values)
        self.scales: tuple[Scale, ...] = (
            tuple(tuple(int(x) for x in v) for v in values) if multi else (tuple(int(v) for v in values),)
        )  # type: ignore[assignment]
        if len(self.scales) not in (1, 2):
            raise ValueError(f"scale must be one (long, short) pair or two, got {scale}")
        self.scale = self.scales[0] if len(self.scales) == 1 else self.scales
        self.flip_prob = float(flip_prob)
        self.seed = int(seed)
        self.epoch = 0
        self._preset = Preset("train", self.scales[0], size_divisor=SIZE_DIVISOR)

    @property
    def file_names(self) -> list[str]:
        return [entry.file_name for entry in self.images]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.images)

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose flips (and scales) ``dataset[i]`` gives."""
        self.epoch = int(epoch)

    def sample_scale(self, index: int, epoch: int) -> Scale:
        """The scale image ``index`` is resized to fit in ``epoch``: the fixed one, or its draw from the range."""
        if len(self.scales) == 1:
            return self.scales[0]
        rng = np.random.RandomState(scale_draw_seed(self.seed, epoch, index))
        return random_resize_scale(self.scales, rng)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> TrainSample:
        return self.load(index, self.epoch)

    def load(self, index: int, epoch: int) -> TrainSample:
        """Decode, resize (to :meth:`sample_scale`), flip (per :func:`flip_decision`) and normalise image ``index``
        for ``epoch``.

        An image that cannot be read or resized gives a sample with ``error`` set; it never raises.
        """
        entry = self.images[index]
        flipped = flip_decision(self.seed, epoch, index, self.flip_prob)
        scale = self.sample_scale(index, epoch)
        preset = self._preset if scale == self._preset.scale else Preset("train", scale, size_divisor=SIZE_DIVISOR)
        path = self.image_dir / entry.file_name
        try:
            bgr = read_image(path)
            resized, meta = resize(bgr, preset)
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
            image=torch.from_numpy(normalize_numpy(resized)),
            boxes=boxes,
            labels=torch.from_numpy(entry.labels.copy()),
            file_name=entry.file_name,
            img_shape=(new_h, new_w),
            ori_shape=meta.ori_shape,
            scale_factor=meta.scale_factor,
            flipped=flipped,
            error=None,
            index=index,
            scale=scale,
        )


def _failed(entry: TrainImage, index: int, reason: str) -> TrainSample:
    return TrainSample(
        image=None,
        boxes=torch.zeros((0, 4), dtype=torch.float32),
        labels=torch.zeros((0,), dtype=torch.int64),
        file_name=entry.file_name,
        img_shape=(0, 0),
        ori_shape=(0, 0),
        scale_factor=(1.0, 1.0),
        flipped=False,
        error=reason,
        index=index,
    )
