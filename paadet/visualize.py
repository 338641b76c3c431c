"""Drawing detections on images, and where ``paadet predict --save-vis`` writes them.

:func:`vis_targets` maps every input to a file under the folder asked for: absolute paths and ``..``
cannot escape it, inputs that share a name get distinct files, and no target is ever one of the
inputs (the original photos are never overwritten).
"""

from __future__ import annotations

import colorsys
import os
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

import cv2
import numpy as np

from paadet.classes import CLASS_NAMES
from paadet.fileio import OutputPathError

VIS_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".mp4"})
"""Suffixes a drawn copy keeps (OpenCV encodes the images; ``.mp4`` is the annotated video of a video source, see
:meth:`paadet.sources.VideoSource.vis_name`); any other input gets ``.jpg`` appended."""

_PARENT = "__"
"""What a ``..`` component of an input's name becomes under the visualisation folder."""


MIN_CANVAS = 640
"""Images whose longer side is shorter than this are drawn enlarged (an integer factor) so that labels can be read."""
SAME_BOX_IOU = 0.9
"""Detections whose boxes overlap at least this much share one box and one label (``cat 0.52 | dog 0.31``)."""
_FONT = cv2.FONT_HERSHEY_SIMPLEX


def _color(label: int) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb((label * 0.618034) % 1.0, 0.85, 0.95)
    return int(b * 255), int(g * 255), int(r * 255)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def _overlaps(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def group_boxes(boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, score_thr: float) -> list[list[int]]:
    """The detections scoring at least ``score_thr``, grouped by box: each group is the indices of detections
    whose boxes overlap the group's first (highest-scoring) box by :data:`SAME_BOX_IOU` or more, best first."""
    order = [int(i) for i in np.argsort(-np.asarray(scores), kind="stable") if scores[i] >= score_thr]
    groups: list[list[int]] = []
    for i in order:
        for group in groups:
            if _iou(boxes[group[0]], boxes[i]) >= SAME_BOX_IOU:
                group.append(i)
                break
        else:
            groups.append([i])
    return groups


def place_labels(
    boxes: Sequence[tuple[int, int, int, int]], sizes: Sequence[tuple[int, int]], width: int, height: int
) -> list[tuple[int, int, int, int] | None]:
    """Where each box's label goes (``x1, y1, x2, y2`` of its band), in priority order, so that no two labels
    overlap: above the box's top-left corner, inside it, below it, then inside its bottom edge; shifted left to
    stay inside the image. ``None``: no free place (the box is drawn without its label)."""
    placed: list[tuple[int, int, int, int]] = []
    out: list[tuple[int, int, int, int] | None] = []
    for (x1, y1, _x2, y2), (tw, th) in zip(boxes, sizes, strict=True):
        tx = min(max(x1, 0), max(width - tw, 0))
        spot = None
        for top in (y1 - th, y1, y2, y2 - th):
            top = min(max(top, 0), max(height - th, 0))
            rect = (tx, top, tx + tw, top + th)
            if not any(_overlaps(rect, other) for other in placed):
                spot = rect
                break
        if spot is not None:
            placed.append(spot)
        out.append(spot)
    return out


def draw_detections(
    image: np.ndarray,
    boxes: np.ndarray,
    scores: np.ndarray,
    labels: np.ndarray,
    score_thr: float = 0.3,
    class_names: Sequence[str] = CLASS_NAMES,
    min_canvas: int = 0,
) -> tuple[np.ndarray, int]:
    """A copy of a BGR ``uint8`` image with labelled boxes (xyxy) for detections scoring at least ``score_thr``.

    Readable at any size: an image whose longer side is under ``min_canvas`` is enlarged by an integer factor
    (boxes with it; 0 keeps the size, as a video's frames need); line width and font grow with the canvas;
    detections that share a box (:data:`SAME_BOX_IOU`) get one box and one label listing their classes; labels
    never cover each other (:func:`place_labels`: a label with no free place is left out, its box drawn).
    Returns the image and the number of detections drawn.
    """
    height, width = image.shape[:2]
    factor = max(1, -(-min_canvas // max(height, width, 1))) if min_canvas else 1
    out = (
        cv2.resize(image, (width * factor, height * factor), interpolation=cv2.INTER_LINEAR)
        if factor > 1
        else image.copy()
    )
    height, width = out.shape[:2]
    side = max(height, width)
    thickness = max(1, round(side / 500))
    font_scale = max(0.45, side / 2000)
    font_thickness = max(1, round(font_scale * 1.5))
    groups = group_boxes(boxes, scores, labels, score_thr)
    rects, texts, colors, sizes = [], [], [], []
    for group in groups:
        x1, y1, x2, y2 = (round(float(v) * factor) for v in boxes[group[0]])
        names = []
        for i in group[:3]:
            label = int(labels[i])
            name = class_names[label] if 0 <= label < len(class_names) else str(label)
            names.append(f"{name} {float(scores[i]):.2f}")
        text = " | ".join(names) + (f" +{len(group) - 3}" if len(group) > 3 else "")
        (tw, th), base = cv2.getTextSize(text, _FONT, font_scale, font_thickness)
        rects.append((x1, y1, x2, y2))
        texts.append((text, th))
        colors.append(_color(int(labels[group[0]])))
        sizes.append((tw + 4, th + base + 4))
    for (x1, y1, x2, y2), color in zip(rects, colors, strict=True):
        cv2.rectangle(out, (x1, y1), (x2, y2), color, thickness)
    for spot, (text, th), color in zip(place_labels(rects, sizes, width, height), texts, colors, strict=True):
        if spot is None:
            continue
        lx1, ly1, lx2, ly2 = spot
        cv2.rectangle(out, (lx1, ly1), (lx2, ly2), color, -1)
        cv2.putText(out, text, (lx1 + 2, ly1 + 2 + th), _FONT, font_scale, (0, 0, 0), font_thickness, cv2.LINE_AA)
    return out, sum(len(group) for group in groups)


def safe_relative(name: str) -> PurePosixPath:
    """An input's report name as a relative path that stays inside any folder it is joined to.

    The root of an absolute path is dropped (``/abs/a.jpg`` -> ``abs/a.jpg``), ``.`` parts are dropped
    and ``..`` parts become ``__`` (``../photos/a.jpg`` -> ``__/photos/a.jpg``); a suffix OpenCV cannot
    encode gets ``.jpg`` appended.
    """
    parts = [p for p in PurePosixPath(name.replace(os.sep, "/")).parts if p not in ("/", ".", "")]
    parts = [_PARENT if p == ".." else p for p in parts] or ["image"]
    rel = PurePosixPath(*parts)
    if rel.suffix.lower() not in VIS_EXTENSIONS:
        rel = rel.with_name(rel.name + ".jpg")
    return rel


def vis_targets(
    file_names: Sequence[str], inputs: Sequence[str | os.PathLike], folder: str | os.PathLike
) -> list[Path]:
    """Where each input's drawn copy goes: distinct files under ``folder``, none of them an input.

    Args:
        file_names: the inputs' distinct report names (``ImageSource.file_name``).
        inputs: the input files themselves (to refuse writing onto one).
        folder: the ``--save-vis`` folder.

    Raises:
        OutputPathError: a target would be one of the inputs, or would leave ``folder`` (a symlink inside it).
    """
    folder = Path(folder)
    root = os.path.realpath(folder)
    originals = {os.path.realpath(p) for p in inputs}
    taken: set[str] = set()
    targets = []
    for name in file_names:
        rel = safe_relative(name)
        candidate, n = rel, 1
        while str(candidate).lower() in taken:  # also distinct on case-insensitive file systems
            n += 1
            candidate = rel.with_name(f"{rel.stem}-{n}{rel.suffix}")
        taken.add(str(candidate).lower())
        target = folder / candidate
        real = os.path.realpath(target)
        if real in originals:
            raise OutputPathError(
                f"{folder}: --save-vis would overwrite the input {name} with its drawn copy; "
                "choose a folder outside the inputs"
            )
        if os.path.commonpath([root, real]) != root:
            raise OutputPathError(f"{target}: --save-vis target leaves {folder} (a symlink inside it)")
        targets.append(target)
    return targets
