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


def _color(label: int) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb((label * 0.618034) % 1.0, 0.85, 0.95)
    return int(b * 255), int(g * 255), int(r * 255)


def draw_detections(
    image: np.ndarray,
    boxes: np.ndarray,
    scores: np.ndarray,
    labels: np.ndarray,
    score_thr: float = 0.3,
    class_names: Sequence[str] = CLASS_NAMES,
) -> tuple[np.ndarray, int]:
    """A copy of a BGR ``uint8`` image with labelled boxes (xyxy) for detections scoring at least ``score_thr``.

    Labels are drawn inside the image: above the box where there is room, else inside its top edge,
    shifted left where the text would run off the right side. Returns the image and the number of boxes drawn.
    """
    out = image.copy()
    height, width = out.shape[:2]
    thickness = max(1, round(max(height, width) / 500))
    drawn = 0
    for box, score, label in zip(boxes, scores, labels, strict=False):
        if score < score_thr:
            continue
        x1, y1, x2, y2 = (round(float(v)) for v in box)
        color = _color(int(label))
        cv2.rectangle(out, (x1, y1), (x2, y2), color, thickness)
        name = class_names[int(label)] if 0 <= int(label) < len(class_names) else str(int(label))
        text = f"{name} {score:.2f}"
        (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, 0.5, 1)
        tx = min(max(x1, 0), max(width - tw, 0))
        ty = y1 if y1 - th - base >= 0 else max(y1, 0) + th + base  # bottom of the label band
        ty = min(ty, height)
        cv2.rectangle(out, (tx, ty - th - base), (tx + tw, ty), color, -1)
        cv2.putText(out, text, (tx, ty - base), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
        drawn += 1
    return out, drawn


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
