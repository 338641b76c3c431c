"""The COCO annotations of a training set, parsed as mmdetection 3.3's PAA config parses them.

The rules, and where they were read in the mmdet 3.3.0 wheel (the data path as a whole is described in
:mod:`paadet.train.dataset` and :mod:`paadet.train.loader`):

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

Differences from mmdetection, on purpose:

* Flips are not drawn from numpy's global RNG (``RandomFlip`` calls ``np.random.choice``) but from
  :func:`flip_decision` ``(seed, epoch, index)``, so a resumed run sees the same flips.
* An unreadable image does not raise (mmengine's ``BaseDataset`` would re-draw a random index only
  when a transform returns ``None``, and ``LoadImageFromFile`` raises): its :class:`TrainSample`
  carries ``error`` and :func:`collate_train` lists it in ``TrainBatch.skipped``.
* A missing ``area`` is taken as ``w * h`` (by :func:`paadet.data.coco.validate_annotations`), and a
  category without a ``name`` is named by its id; mmdet raises ``KeyError`` on both.
* Values mmdet would misread are refused before training, in one line naming the file, the annotation and
  the value (:func:`paadet.data.coco.validate_annotations`): mmdet takes any truthy ``iscrowd`` or
  ``ignore`` as set, so ``"0"`` would silently drop the box; here they must be 0 or 1 (an integer or a
  bool). Boxes, areas and image sizes must be finite numbers (``w, h, area >= 0``; sizes > 0).
* A dataset left with no image after filtering is a :class:`DatasetError`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from paadet.data.coco import DatasetError, is_finite_number

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


def check_image_sizes(data: dict, path: Path) -> None:
    """Every image has the ``width`` and ``height`` training filters on: finite numbers > 0.

    Raises:
        DatasetError: the first image without them, naming ``path``, the image id and the value.
    """
    for image in data["images"]:
        for key in ("width", "height"):
            value = image.get(key)
            if not is_finite_number(value) or not value > 0:
                raise DatasetError(
                    f"{path}: image {image['id']} needs a positive '{key}' (training filters on it), got {value!r}"
                )


def parse_annotations(
    data: dict,
    *,
    min_size: float = 32,
    filter_empty_gt: bool = True,
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
        kept.append(
            TrainImage(
                index=len(kept),
                image_id=img_id,
                file_name=info["file_name"],
                width=width,
                height=height,
                boxes=np.array(boxes, dtype=np.float32).reshape(-1, 4),
                labels=np.array(labels, dtype=np.int64),
                num_crowd=num_crowd,
            )
        )
    return classes, category_ids, kept, dropped
