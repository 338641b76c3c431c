"""COCO-format datasets: finding the files, loading and checking the annotations, loading images.

A dataset is an annotation file in COCO's ``instances`` format plus a folder of images whose
``file_name`` entries are relative to it. Two ways to name one:

* a root in the seed's layout: ``ROOT/annotations/instances_val2017.json`` with the images in
  ``ROOT/images/val2017/`` (the ultralytics labels zip + val2017.zip) or ``ROOT/val2017/`` (the
  official zips unpacked side by side);
* an annotation file and an image folder, named separately.

Every problem with the files is a :class:`DatasetError` whose one-line message names the file.

Images are decoded and resized ahead of the network by :func:`paadet.data.pipeline.iter_images`.
This module imports no torch, so the commands check their datasets at once.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pycocotools.coco import COCO

from paadet.classes import COCO_CLASSES, ClassList
from paadet.console import listed
from paadet.data.images import ImageSource
from paadet.errors import PaadetError

VAL2017_ANNOTATIONS = Path("annotations", "instances_val2017.json")
"""The annotation file under an evaluation ``--data`` root (see :func:`layout_paths`)."""

LOADERS = ("threads", "processes")
"""How :func:`iter_images` runs its workers."""


class DatasetError(PaadetError):
    """An annotation file, image folder or dataset that cannot be evaluated; the message names the file."""


def layout_paths(split: str = "val2017") -> tuple[Path, tuple[Path, ...]]:
    """The annotation file and the candidate image folders of a split, relative to a dataset root."""
    return Path("annotations", f"instances_{split}.json"), (Path("images", split), Path(split))


def resolve_layout(root: str | os.PathLike, split: str = "val2017") -> tuple[Path, Path]:
    """The annotation file and image folder of a dataset root in the seed's layout, for ``split``
    (``ROOT/annotations/instances_SPLIT.json``, images in ``ROOT/images/SPLIT/`` or ``ROOT/SPLIT/``).

    Raises:
        DatasetError: the root, its annotation file or both candidate image folders are missing.
    """
    root = Path(root)
    annotations, image_dirs = layout_paths(split)
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset folder not found")
    ann_file = root / annotations
    if ann_file.is_dir():
        raise DatasetError(
            f"{ann_file}: the annotation file is a folder (expected a JSON file at ROOT/{annotations.as_posix()})"
        )
    if not ann_file.is_file():
        raise DatasetError(f"{ann_file}: annotation file not found (expected the layout ROOT/{annotations.as_posix()})")
    for candidate in image_dirs:
        if (root / candidate).is_dir():
            return ann_file, root / candidate
    tried = " or ".join(str(root / c) for c in image_dirs)
    raise DatasetError(f"{tried}: image folder not found")


def read_json(path: str | os.PathLike, what: str) -> Any:
    """Parse a JSON file, turning every failure into a one-line :class:`DatasetError` naming it.

    Python's JSON reader takes ``NaN``, ``Infinity`` and numbers too large for a float (``1e999`` is infinite);
    the validators below refuse them where a number must be finite.
    """
    path = Path(path)
    if path.is_dir():
        raise DatasetError(f"{path}: {what} is a directory, not a JSON file")
    try:
        with open(path, "rb") as f:
            return json.load(f)
    except FileNotFoundError:
        raise DatasetError(f"{path}: {what} not found") from None
    except PermissionError:
        raise DatasetError(f"{path}: {what} is not readable (permission denied)") from None
    except json.JSONDecodeError as exc:
        raise DatasetError(
            f"{path}: {what} is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})"
        ) from None
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{path}: {what} is not valid JSON (not UTF-8 text: {exc.reason})") from None
    except RecursionError:
        raise DatasetError(
            f"{path}: {what} is nested too deeply to read (arrays or objects inside each other beyond "
            f"Python's recursion limit, {sys.getrecursionlimit()})"
        ) from None
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read {what} ({exc.strerror or exc})") from None


def is_number(value: Any) -> bool:
    """A JSON number (not a bool); it may be NaN or infinite (see :func:`is_finite_number`)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_finite_number(value: Any) -> bool:
    """A JSON number that is neither NaN nor infinite (an integer of any size is finite)."""
    return is_number(value) and (isinstance(value, int) or math.isfinite(value))


def is_coco_id(value: Any) -> bool:
    """A usable COCO id: a string or a finite number (pycocotools only uses ids as dict keys; NaN is no key)."""
    return isinstance(value, str) or is_finite_number(value)


def is_flag(value: Any) -> bool:
    """A 0/1 flag as pycocotools and mmdetection test it: 0, 1, true or false (``"0"`` or 2.5 would be truthy)."""
    return isinstance(value, int) and value in (0, 1)


def shown(value: Any, limit: int = 120) -> str:
    """``value`` as JSON text (``"0"`` with its quotes, ``NaN``, ``null``), cut at ``limit`` characters."""
    try:
        text = json.dumps(value)
    except (RecursionError, TypeError, ValueError):
        text = f"(a {type(value).__name__} nested too deeply to show)"
    return text if len(text) <= limit else text[: limit - 3] + "..."


FLAG_RULE = "must be 0 or 1 (an integer, or true/false)"


def _check_annotation(ann: dict, fail: Callable[[str], DatasetError]) -> None:
    """The fields of one annotation that pycocotools' box evaluation (and mmdetection's parser) reads."""
    which = f"annotation {shown(ann['id'])}"
    if not is_coco_id(ann.get("image_id")) or not is_coco_id(ann.get("category_id")):
        raise fail(f"{which} needs an 'image_id' and a 'category_id' (strings or finite numbers)")
    bbox = ann.get("bbox")
    if not isinstance(bbox, list) or len(bbox) != 4 or not all(is_number(v) for v in bbox):
        raise fail(f"{which} needs a 'bbox' of four numbers [x, y, w, h], got {shown(bbox)}")
    if not all(is_finite_number(v) for v in bbox):
        raise fail(f"{which} has a non-finite 'bbox' {shown(bbox)}; every value must be a finite number")
    if bbox[2] < 0 or bbox[3] < 0:
        raise fail(f"{which} has a 'bbox' of negative width or height {shown(bbox)}; w and h must be >= 0")
    if "area" not in ann:
        ann["area"] = float(bbox[2]) * float(bbox[3])
    elif not is_finite_number(ann["area"]) or ann["area"] < 0:
        raise fail(f"{which}: 'area' must be a finite number >= 0, got {shown(ann['area'])}")
    if "iscrowd" not in ann:
        ann["iscrowd"] = 0  # COCOeval reads it (int(o['iscrowd'])); absent means an ordinary box
    elif not is_flag(ann["iscrowd"]):
        raise fail(f"{which}: 'iscrowd' {FLAG_RULE}, got {shown(ann['iscrowd'])}")
    if "ignore" in ann and not is_flag(ann["ignore"]):
        raise fail(f"{which}: 'ignore' {FLAG_RULE}, got {shown(ann['ignore'])}")


def validate_annotations(data: Any, path: str | os.PathLike, need_file_names: bool = True) -> list[str]:
    """Check a parsed COCO ``instances`` file for what box evaluation and training read; returns warnings.

    Errors are what would make pycocotools fail or silently score the wrong boxes, checked field by
    field as pycocotools' ``COCO`` index, ``loadRes`` and ``COCOeval`` (bbox) and mmdetection's parser
    read them:

    * ``images``, ``annotations``, ``categories``: lists;
    * each image and category: a unique ``id`` (a string or a finite number); with ``need_file_names``
      (when images are to be read) an image's ``file_name`` (a string); an image's ``width`` and
      ``height``, where given, finite numbers > 0; a category's ``name``, where given, a string;
    * each annotation: a unique ``id``, an ``image_id`` and ``category_id``, a ``bbox`` of four finite
      numbers with ``w, h >= 0``, an ``area`` (finite, >= 0), an ``iscrowd`` of 0 or 1 (an integer or a
      bool: pycocotools takes any truthy value, ``"0"`` included, as a crowd), and mmdetection's
      ``ignore`` likewise where given.

    Annotations on image or category ids that are not listed are ignored by pycocotools: a warning.
    A missing ``area`` is filled in as the box's ``w * h`` (pycocotools needs it for the size
    ranges); a missing ``iscrowd`` is filled in as 0. The dict is modified in place.

    Raises:
        DatasetError: the first problem found, naming ``path`` (and the image, category or annotation id,
            the field and its value).
    """

    def fail(reason: str) -> DatasetError:
        return DatasetError(f"{path}: {reason}")

    if not isinstance(data, dict):
        raise fail(f"not a COCO annotation file (top level is a JSON {type(data).__name__}, expected an object)")
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise fail(f"not a COCO annotation file (no {key!r} list)")
        if not isinstance(data[key], list):
            raise fail(f"{key!r} must be a list, got a JSON {type(data[key]).__name__}")
    image_ids: set[Any] = set()
    for i, image in enumerate(data["images"]):
        if not isinstance(image, dict) or not is_coco_id(image.get("id")):
            raise fail(f"images[{i}] needs an 'id', got {shown(image)}")
        if need_file_names and not isinstance(image.get("file_name"), str):
            raise fail(f"image {image['id']} has no 'file_name' (the image file, relative to the image folder)")
        if image["id"] in image_ids:
            raise fail(f"image id {image['id']} is listed twice")
        for key in ("width", "height"):
            if key in image and not (is_finite_number(image[key]) and image[key] > 0):
                raise fail(f"image {shown(image['id'])}: '{key}' must be a finite number > 0, got {shown(image[key])}")
        image_ids.add(image["id"])
    category_ids: set[Any] = set()
    for i, cat in enumerate(data["categories"]):
        if not isinstance(cat, dict) or not is_coco_id(cat.get("id")):
            raise fail(f"categories[{i}] needs an 'id', got {shown(cat)}")
        if cat["id"] in category_ids:
            raise fail(f"category id {cat['id']} is listed twice")
        if "name" in cat and not isinstance(cat["name"], str):
            raise fail(f"category {shown(cat['id'])}: 'name' must be a string, got {shown(cat['name'])}")
        category_ids.add(cat["id"])
    ann_ids: set[Any] = set()
    orphans: list[Any] = []
    for i, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict):
            raise fail(f"annotations[{i}] is not an object")
        if not is_coco_id(ann.get("id")):
            raise fail(f"annotations[{i}] has no 'id'")
        if ann["id"] in ann_ids:
            raise fail(f"annotation id {ann['id']} is used twice")
        ann_ids.add(ann["id"])
        _check_annotation(ann, fail)
        if ann["image_id"] not in image_ids or ann["category_id"] not in category_ids:
            orphans.append(ann["id"])
    warnings = []
    if orphans:
        warnings.append(
            f"{path}: {len(orphans)} annotations are on image or category ids that are not listed "
            f"(ids {listed(orphans)}); they are ignored, as pycocotools ignores them"
        )
    return warnings


def coco_from_dict(data: dict) -> COCO:
    """A pycocotools ``COCO`` over an already parsed annotation dict (its index messages silenced)."""
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def load_coco(path: str | os.PathLike, need_file_names: bool = True) -> tuple[COCO, list[str]]:
    """Read, check (:func:`validate_annotations`) and index a COCO annotation file; returns it and warnings."""
    data = read_json(path, "annotation file")
    warnings = validate_annotations(data, path, need_file_names)
    return coco_from_dict(data), warnings


def _normalise_name(name: str) -> str:
    return " ".join(name.lower().replace("_", " ").split())


def check_categories(coco: COCO, path: str | os.PathLike, classes: ClassList = COCO_CLASSES) -> list[str]:
    """Check that the model's categories fit a dataset; returns warnings (one line each).

    The model predicts ``classes.category_ids`` (COCO's 80 ids for the official checkpoint). If none of
    the dataset's category ids is one of them, nothing can match: that is an error. If only some are,
    the others get no detections (AP 0 for them, averaged in as pycocotools does): a warning names them.
    A shared id whose name differs is a warning too (the numbering may be another's).

    Raises:
        DatasetError: the dataset has no categories, or none with one of the model's ids.
    """
    cats = coco.dataset["categories"]
    if not cats:
        raise DatasetError(f"{path}: no categories listed")
    coco80 = classes == COCO_CLASSES
    known = set(classes.category_ids)
    foreign = sorted(c["id"] for c in cats if c["id"] not in known)
    if len(foreign) == len(cats):
        whose = (
            "COCO's 80 that the model predicts (1-90 with gaps)"
            if coco80
            else f"the {len(classes)} the model predicts ({listed(list(classes.category_ids))})"
        )
        raise DatasetError(
            f"{path}: none of the category ids ({listed(foreign)}) is one of {whose}; "
            f"map the categories to the model's ids first"
        )
    warnings = []
    if foreign:
        warnings.append(
            f"{path}: {len(foreign)} of {len(cats)} category ids are not the model's ({listed(foreign)}); "
            f"the model never predicts them, so they score AP 0 and lower the mean"
        )
    name_of = dict(zip(classes.category_ids, classes.names, strict=False))
    renamed = [
        f"{c['id']} '{c['name']}' (model: '{name_of[c['id']]}')"
        for c in cats
        if c["id"] in known
        and isinstance(c.get("name"), str)
        and _normalise_name(c["name"]) != _normalise_name(name_of[c["id"]])
    ]
    if renamed:
        warnings.append(
            f"{path}: {len(renamed)} category ids are named differently from the model's: {listed(renamed)}"
        )
    return warnings


@dataclass(frozen=True)
class ImageEntry:
    """One image of a dataset.

    Attributes:
        image_id: COCO image id.
        file_name: as listed in the annotation file (relative to the image folder).
        path: where to read it.
    """

    image_id: int
    file_name: str
    path: Path

    def source(self) -> ImageSource:
        return ImageSource(self.path, self.file_name)


@dataclass
class CocoDataset:
    """An indexed, checked COCO dataset and the images chosen from it.

    Attributes:
        ann_file: the annotation file.
        image_dir: the folder the ``file_name`` entries are relative to.
        coco: the pycocotools index of the annotations.
        images: the images to evaluate, by ascending image id.
        warnings: one-line warnings found while loading (categories).
    """

    ann_file: Path
    image_dir: Path
    coco: COCO
    images: list[ImageEntry]
    warnings: list[str] = field(default_factory=list)

    @property
    def image_ids(self) -> list[int]:
        return [e.image_id for e in self.images]

    @classmethod
    def load(
        cls,
        ann_file: str | os.PathLike,
        image_dir: str | os.PathLike,
        limit: int | None = None,
        check_model_categories: bool = True,
        classes: ClassList = COCO_CLASSES,
    ) -> CocoDataset:
        """Load a dataset; ``limit`` keeps the first N images by image id.

        With ``check_model_categories``, the dataset's categories are checked against ``classes`` (the
        model's; see :func:`check_categories`).

        Raises:
            DatasetError: a missing image folder, a bad annotation file, no images (after
                ``limit``), or categories the model cannot predict.
        """
        ann_file, image_dir = Path(ann_file), Path(image_dir)
        if limit is not None and limit < 1:
            raise DatasetError(f"--limit must be at least 1, got {limit}")
        if not image_dir.is_dir():
            raise DatasetError(f"{image_dir}: image folder not found")
        coco, warnings = load_coco(ann_file)
        if not coco.dataset["images"]:
            raise DatasetError(f"{ann_file}: the dataset is empty (no images listed)")
        if check_model_categories:
            warnings += check_categories(coco, ann_file, classes)
        ids = sorted(coco.imgs)
        if limit is not None:
            ids = ids[:limit]
        images = [ImageEntry(i, coco.imgs[i]["file_name"], image_dir / coco.imgs[i]["file_name"]) for i in ids]
        return cls(ann_file, image_dir, coco, images, warnings)

    def check_model_categories(self, classes: ClassList) -> None:
        """Check the dataset's categories against the model's ``classes`` (see :func:`check_categories`); the
        warnings are added to :attr:`warnings`.

        Raises:
            DatasetError: none of the dataset's categories is one the model predicts.
        """
        self.warnings += check_categories(self.coco, self.ann_file, classes)

    def check_images_present(self) -> None:
        """Raise unless at least one selected image is on disk (a wrong ``--images`` folder, found before any work).

        Raises:
            DatasetError: none of the selected images exists under ``image_dir``.
        """
        if not any(entry.path.is_file() for entry in self.images):
            raise DatasetError(
                f"{self.image_dir}: none of the {len(self.images)} images that {self.ann_file} lists is there "
                f"(first: {self.images[0].file_name}); is --images the folder its file_name entries are relative to?"
            )

    @classmethod
    def from_root(
        cls, root: str | os.PathLike, limit: int | None = None, check_model_categories: bool = True
    ) -> CocoDataset:
        """Load a dataset in the seed's layout (see :func:`resolve_layout`)."""
        ann_file, image_dir = resolve_layout(root)
        return cls.load(ann_file, image_dir, limit=limit, check_model_categories=check_model_categories)

    def category_names(self) -> dict[int, str]:
        """Category id -> name (the id as text where the file gives no name)."""
        return {c["id"]: str(c.get("name", c["id"])) for c in self.coco.dataset["categories"]}

    def annotation_summary(self) -> str:
        """``N images, M boxes, K categories`` for the selected images."""
        counts = Counter(a["image_id"] for a in self.coco.dataset["annotations"])
        boxes = sum(counts[i] for i in self.image_ids)
        return f"{len(self.images)} images, {boxes} boxes, {len(self.coco.cats)} categories"
