"""The image an export is traced and checked on: a generated one, resized as the graph's preset resizes."""

from __future__ import annotations

import dataclasses

from paadet.errors import PaadetError
from paadet.preprocess import Preset, resize


class ExportError(PaadetError):
    """Export failed or was asked something impossible; the message is one line."""


def sample_image(preset: Preset, input_size: tuple[int, int] | None, seed: int = 0):
    """A generated BGR image resized for ``preset`` (fitting ``input_size``), and its meta."""
    from paadet.data.synthetic import synthetic_image

    h, w = input_size if input_size is not None else (480, 640)
    image = synthetic_image(max(h * 3 // 4, 32), max(w, 32), seed=seed)
    resized, meta = resize(image, preset)
    if input_size is not None:
        if meta.img_shape[0] > h or meta.img_shape[1] > w:
            raise ExportError(f"preset {preset.name} resizes images beyond --input-size {h}x{w}")
        meta = dataclasses.replace(meta, pad_shape=tuple(input_size))
    return resized, meta
