"""COCO's 80 detection classes in the order of the model's labels, their category ids, and :class:`ClassList`,
the class list that travels with a model (COCO's 80 by default)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

CLASS_NAMES: tuple[str, ...] = (
    "person",
    "bicycle",
    "car",
    "motorcycle",
    "airplane",
    "bus",
    "train",
    "truck",
    "boat",
    "traffic light",
    "fire hydrant",
    "stop sign",
    "parking meter",
    "bench",
    "bird",
    "cat",
    "dog",
    "horse",
    "sheep",
    "cow",
    "elephant",
    "bear",
    "zebra",
    "giraffe",
    "backpack",
    "umbrella",
    "handbag",
    "tie",
    "suitcase",
    "frisbee",
    "skis",
    "snowboard",
    "sports ball",
    "kite",
    "baseball bat",
    "baseball glove",
    "skateboard",
    "surfboard",
    "tennis racket",
    "bottle",
    "wine glass",
    "cup",
    "fork",
    "knife",
    "spoon",
    "bowl",
    "banana",
    "apple",
    "sandwich",
    "orange",
    "broccoli",
    "carrot",
    "hot dog",
    "pizza",
    "donut",
    "cake",
    "chair",
    "couch",
    "potted plant",
    "bed",
    "dining table",
    "toilet",
    "tv",
    "laptop",
    "mouse",
    "remote",
    "keyboard",
    "cell phone",
    "microwave",
    "oven",
    "toaster",
    "sink",
    "refrigerator",
    "book",
    "clock",
    "vase",
    "scissors",
    "teddy bear",
    "hair drier",
    "toothbrush",
)

CATEGORY_IDS: tuple[int, ...] = (
    *range(1, 12),
    *range(13, 26),
    27,
    28,
    *range(31, 45),
    *range(46, 66),
    67,
    70,
    *range(72, 83),
    *range(84, 91),
)

assert len(CLASS_NAMES) == 80 and len(CATEGORY_IDS) == 80

LABEL_OF_CATEGORY: dict[int, int] = {cat: label for label, cat in enumerate(CATEGORY_IDS)}


@dataclass(frozen=True)
class ClassList:
    """The classes a model detects: label ``i`` is ``names[i]``, written to COCO files as ``category_ids[i]``.

    It travels with the model: a checkpoint written by ``paadet train`` stores it in
    ``meta["dataset_meta"]`` (``classes``, ``category_ids``), an exported graph in its metadata; a model
    without one is COCO's 80 (:data:`COCO_CLASSES`).
    """

    names: tuple[str, ...]
    category_ids: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.names) != len(self.category_ids):
            raise ValueError(f"{len(self.names)} class names but {len(self.category_ids)} category ids")
        if not self.names:
            raise ValueError("a class list needs at least one class")
        if len(set(self.category_ids)) != len(self.category_ids):
            raise ValueError(f"category ids must be distinct, got {list(self.category_ids)}")

    def __len__(self) -> int:
        return len(self.names)

    def to_meta(self) -> dict[str, list]:
        """``{"classes": [...], "category_ids": [...]}``: plain values for a checkpoint's ``dataset_meta``."""
        return {"classes": list(self.names), "category_ids": list(self.category_ids)}

    @classmethod
    def from_meta(cls, meta: Any, num_classes: int | None = None) -> ClassList:
        """The class list in a checkpoint's ``meta`` (mmdetection's ``dataset_meta.classes``; ids optional).

        Without class names: COCO's 80 when ``num_classes`` is 80 or unknown, else ``class_0 ..`` with ids
        ``1..N``. Names without ids get ids ``1..N`` (COCO's own when they are COCO's 80 names).
        """
        dataset_meta = meta.get("dataset_meta") if isinstance(meta, dict) else None
        names = dataset_meta.get("classes") if isinstance(dataset_meta, dict) else None
        if not names:
            if num_classes in (None, len(CLASS_NAMES)):
                return COCO_CLASSES
            return cls(tuple(f"class_{i}" for i in range(num_classes)), tuple(range(1, num_classes + 1)))
        names = tuple(str(n) for n in names)
        ids = dataset_meta.get("category_ids")
        if ids is None:
            ids = CATEGORY_IDS if names == CLASS_NAMES else tuple(range(1, len(names) + 1))
        return cls(names, tuple(int(i) for i in ids))


COCO_CLASSES = ClassList(CLASS_NAMES, CATEGORY_IDS)
"""COCO's 80 detection classes: the official checkpoint's."""
