"""The example images of the evaluation pictures: which images are shown, and each one drawn twice, its ground
truth beside its detections, coloured by what the matching (:mod:`paadet.evaluation.matching`) made of each box.

Colours: green, a box found by a detection of its category (and that detection); orange, a box taken by a
detection of another category (and that detection); red, a box missed, or a detection that matched nothing (a
false positive). Ground-truth labels are the category's name; detection labels add the score.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from paadet.data.images import ImageReadError, read_image
from paadet.evaluation.matching import CONFUSED, FOUND, TP, ImageMatch

__all__ = ["STATUS_COLORS", "Example", "draw_pair", "pick_examples"]

STATUS_COLORS: dict[str, tuple[int, int, int]] = {"good": (40, 170, 40), CONFUSED: (0, 140, 255), "bad": (40, 40, 220)}
"""BGR colours: a box found or a correct detection; a class confusion; a box missed or a false positive."""


@dataclass(frozen=True)
class Example:
    """An image chosen for the grid.

    Attributes:
        match: its boxes after matching.
        kind: ``worst`` (among the images with the most boxes missed) or ``sample`` (evenly spread over the rest).
        file_name: its ``file_name`` in the annotation file.
    """

    match: ImageMatch
    kind: str
    file_name: str


def pick_examples(
    matches: Sequence[ImageMatch], file_names: dict[Any, str], worst: int = 4, samples: int = 4
) -> list[Example]:
    """The ``worst`` images with the most boxes missed (those with none missed are not "worst"; ties: the larger
    share missed, then the earlier image), then ``samples`` of the other images, evenly spaced in id order."""
    ranked = sorted(
        (m for m in matches if m.missed > 0),
        key=lambda m: (-m.missed, -m.missed / max(len(m.gt_status), 1)),
    )[:worst]
    chosen = {id(m) for m in ranked}
    rest = [m for m in matches if id(m) not in chosen]
    picks = [] if not rest or samples < 1 else np.unique(np.linspace(0, len(rest) - 1, samples).round().astype(int))
    out = [Example(m, "worst", file_names[m.image_id]) for m in ranked]
    return out + [Example(rest[i], "sample", file_names[rest[i].image_id]) for i in picks]


def _box_color(status: str) -> tuple[int, int, int]:
    if status in (FOUND, TP):
        return STATUS_COLORS["good"]
    return STATUS_COLORS[CONFUSED] if status == CONFUSED else STATUS_COLORS["bad"]


def _draw_boxes(
    image: np.ndarray, boxes: np.ndarray, texts: Sequence[str], statuses: Sequence[str], scale: float
) -> np.ndarray:
    """Boxes (``[N, 4]`` xywh in the original image's pixels) drawn on ``image`` (already resized by ``scale``)."""
    out = image.copy()
    height, width = out.shape[:2]
    for box, text, status in zip(boxes, texts, statuses, strict=True):
        x, y, w, h = (float(v) * scale for v in box)
        x1, y1, x2, y2 = round(x), round(y), round(x + w), round(y + h)
        color = _box_color(status)
        cv2.rectangle(out, (x1, y1), (x2, y2), color, 2)
        (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, 0.45, 1)
        tx = min(max(x1, 0), max(width - tw - 2, 0))
        ty = y1 if y1 - th - base >= 0 else min(max(y1, 0) + th + base, height)
        cv2.rectangle(out, (tx, ty - th - base), (tx + tw + 2, ty), color, -1)
        cv2.putText(out, text, (tx + 1, ty - base), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 255), 1, cv2.LINE_AA)
    return out


def draw_pair(
    example: Example, image_dir: Path | None, names: dict[Any, str], max_side: int = 480
) -> tuple[np.ndarray, np.ndarray, str | None]:
    """The image with its ground truth, and with its detections, as RGB ``uint8`` arrays whose longer side is
    ``max_side``; the third value is why the image could not be read (then both are grey placeholders)."""
    error = None
    image = None
    if image_dir is None:
        error = "no image folder given"
    else:
        try:
            image = read_image(image_dir / example.file_name)
        except ImageReadError as exc:
            error = str(exc)
    if image is None:
        blank = np.full((max_side * 3 // 4, max_side, 3), 200, np.uint8)
        return blank, blank, error
    scale = max_side / max(image.shape[:2])
    size = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale)))
    image = cv2.resize(image, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    m = example.match
    gt = _draw_boxes(image, m.gt_boxes, [names[c] for c in m.gt_labels], m.gt_status, scale)
    dt_texts = [f"{names[c]} {s:.2f}" for c, s in zip(m.dt_labels, m.dt_scores, strict=True)]
    dt = _draw_boxes(image, m.dt_boxes, dt_texts, m.dt_status, scale)
    return gt[:, :, ::-1], dt[:, :, ::-1], None
