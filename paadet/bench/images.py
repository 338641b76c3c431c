"""The images a benchmark times: the user's folder, or reproducible generated JPEGs, decoded and resized as
``paadet predict`` does."""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np

from paadet.data.images import list_images, read_image
from paadet.preprocess import ImageMeta, Preset, resize
from paadet.runtime.base import StageTimer

GENERATED_SIZES = ((480, 640), (427, 640), (640, 480), (480, 640))  # (height, width): COCO's usual shapes
MAX_GENERATED = 64


def write_generated_images(folder: str | os.PathLike, count: int, quality: int = 90) -> list[Path]:
    """Write ``count`` reproducible synthetic JPEGs in COCO's usual sizes; returns their paths."""
    from paadet.data.synthetic import synthetic_image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        h, w = GENERATED_SIZES[i % len(GENERATED_SIZES)]
        path = folder / f"bench_{i:04d}.jpg"
        if not cv2.imwrite(str(path), synthetic_image(h, w, seed=i), [cv2.IMWRITE_JPEG_QUALITY, quality]):
            raise OSError(f"cannot write the generated image {path}")
        paths.append(path)
    return paths


def image_files(images: str | os.PathLike | None, needed: int, tmp: str) -> tuple[list[Path], str]:
    """The files to time (every file of ``images``; else ``needed`` generated ones, at most
    :data:`MAX_GENERATED`) and a description of their source. The timing loops cycle through them.

    Raises:
        ValueError: ``images`` is not a folder or holds no image files.
    """
    if images is None:
        unique = write_generated_images(tmp, min(needed, MAX_GENERATED))
        sizes = ", ".join(f"{w}x{h}" for h, w in sorted(set(GENERATED_SIZES)))
        source = f"generated: {len(unique)} synthetic JPEGs ({sizes})"
    else:
        folder = Path(images)
        if not folder.is_dir():
            raise ValueError(f"--images {images}: no such folder")
        unique = [s.path for s in list_images(folder)]
        if not unique:
            raise ValueError(f"--images {images}: no image files in this folder")
        source = f"{folder}: {len(unique)} files"
    return unique, source


def default_decode_threads() -> int:
    """Host threads that decode and resize a batch's images in ``e2e`` (OpenCV releases the GIL): up to 8."""
    return max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


def load_batch(
    paths: Sequence[Path], preset: Preset, timer: StageTimer, pool: ThreadPoolExecutor | None = None
) -> tuple[list[np.ndarray], list[ImageMeta]]:
    """Decode and resize a batch on the host (OpenCV, as ``paadet predict``), on ``pool``'s threads if given,
    timing each step."""
    run = pool.map if pool is not None else map
    with timer.stage("decode"):
        decoded = list(run(read_image, paths))
    with timer.stage("preprocess"):
        pairs = list(run(lambda img: resize(img, preset), decoded))
    return [p[0] for p in pairs], [p[1] for p in pairs]
