"""Test-time pre-processing, as mmdetection 3.3 does it: keep-ratio resize, normalise, pad.

Images are BGR ``uint8`` arrays ``[H, W, 3]`` (OpenCV's colour decoding). Resizing uses OpenCV's
bilinear interpolation on the ``uint8`` image, then BGR -> RGB, ``(x - mean) / std`` in float32, and
zero padding (after normalisation) at the bottom and right.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import cv2
import numpy as np

if TYPE_CHECKING:  # torch is imported where it is used, so that the command line starts fast
    from torch import Tensor

MEAN_RGB = (123.675, 116.28, 103.53)
STD_RGB = (58.395, 57.12, 57.375)


@dataclass(frozen=True)
class Preset:
    """How an image is sized for the network.

    Attributes:
        name: preset name on the command line.
        scale: ``(long_max, short_max)``: the resized image fits ``long_max`` on its long side and
            ``short_max`` on its short side.
        size_divisor: pad each image to a multiple of this (``None`` with ``fixed_size``).
        fixed_size: pad every image to exactly ``(height, width)`` instead (static-shape engines).
        native: keep each image at its own size (``scale`` is then ignored): what test-time augmentation
            (:mod:`paadet.runtime.tta`) loads, since it resizes every view from the decoded image itself.
    """

    name: str
    scale: tuple[int, int]
    size_divisor: int | None = 32
    fixed_size: tuple[int, int] | None = None
    native: bool = False

    def to_meta(self) -> dict:
        """Plain values (as a checkpoint's ``meta.preset`` and an export's metadata hold them)."""
        return {
            "name": self.name,
            "scale": list(self.scale),
            "size_divisor": self.size_divisor,
            "fixed_size": list(self.fixed_size) if self.fixed_size else None,
        }

    @classmethod
    def from_meta(cls, data: dict) -> Preset:
        """The inverse of :meth:`to_meta`; raises ``ValueError`` for malformed values."""
        try:
            scale = tuple(int(v) for v in data["scale"])
            divisor = data.get("size_divisor", 32)
            fixed = data.get("fixed_size")
            preset = cls(
                name=str(data.get("name", "checkpoint")),
                scale=scale,  # type: ignore[arg-type]
                size_divisor=int(divisor) if divisor is not None else None,
                fixed_size=tuple(int(v) for v in fixed) if fixed else None,
            )  # type: ignore[arg-type]
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed preset {data!r}: {exc}") from None
        if (
            len(preset.scale) != 2
            or min(preset.scale) < 1
            or (preset.size_divisor is None and preset.fixed_size is None)
        ):
            raise ValueError(f"malformed preset {data!r}")
        return preset

    def padded_shape(self, height: int, width: int) -> tuple[int, int]:
        """Padded input size for a resized image of ``height x width``."""
        if self.fixed_size is not None:
            fh, fw = self.fixed_size
            if height > fh or width > fw:
                raise ValueError(f"resized image {height}x{width} exceeds the fixed input {fh}x{fw}")
            return fh, fw
        d = self.size_divisor or 1
        return -(-height // d) * d, -(-width // d) * d


PRESETS: dict[str, Preset] = {
    "mmdet": Preset("mmdet", (1333, 800), size_divisor=32),
    "800": Preset("800", (800, 800), size_divisor=None, fixed_size=(800, 800)),
}


def get_preset(preset: str | Preset) -> Preset:
    """Look a preset up by name (``mmdet`` or ``800``); a :class:`Preset` passes through."""
    if isinstance(preset, Preset):
        return preset
    try:
        return PRESETS[str(preset)]
    except KeyError:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}") from None


@dataclass(frozen=True)
class ImageMeta:
    """Geometry of one pre-processed image.

    Attributes:
        ori_shape: ``(height, width)`` of the decoded image.
        img_shape: ``(height, width)`` after resizing, before padding; boxes are clipped to it.
        scale_factor: ``(w_scale, h_scale)`` = resized / original size.
        pad_shape: ``(height, width)`` of the padded network input.
    """

    ori_shape: tuple[int, int]
    img_shape: tuple[int, int]
    scale_factor: tuple[float, float]
    pad_shape: tuple[int, int]


def rescale_size(height: int, width: int, scale: tuple[int, int]) -> tuple[int, int]:
    """Keep-ratio target size ``(new_h, new_w)`` for ``scale = (long_max, short_max)`` (mmcv's ``rescale_size``)."""
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    long_max, short_max = max(scale), min(scale)
    factor = min(long_max / max(height, width), short_max / min(height, width))
    new_h, new_w = int(height * float(factor) + 0.5), int(width * float(factor) + 0.5)
    if new_h < 1 or new_w < 1:
        raise ValueError(f"image {height}x{width} is too thin: it would resize to {new_h}x{new_w}")
    return new_h, new_w


def resize(image: np.ndarray, preset: str | Preset) -> tuple[np.ndarray, ImageMeta]:
    """Keep-ratio bilinear resize of a BGR ``uint8`` image ``[H, W, 3]``; returns the image and its meta (a
    ``native`` preset returns the image itself, at scale 1)."""
    preset = get_preset(preset)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an [H, W, 3] image, got shape {tuple(image.shape)}")
    h, w = image.shape[:2]
    if preset.native:
        new_h, new_w, resized = h, w, image
    else:
        new_h, new_w = rescale_size(h, w, preset.scale)
        resized = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    meta = ImageMeta(
        ori_shape=(h, w),
        img_shape=(new_h, new_w),
        scale_factor=(new_w / w, new_h / h),
        pad_shape=preset.padded_shape(new_h, new_w),
    )
    return resized, meta


def normalize_pad(resized: np.ndarray | Tensor, pad_shape: tuple[int, int]) -> Tensor:
    """BGR ``uint8`` ``[h, w, 3]`` -> normalised RGB float32 ``[3, pad_h, pad_w]``, zero-padded bottom/right."""
    import torch

    t = torch.as_tensor(resized)
    t = t.permute(2, 0, 1)[[2, 1, 0]].float()
    mean = torch.tensor(MEAN_RGB, dtype=torch.float32, device=t.device).view(3, 1, 1)
    std = torch.tensor(STD_RGB, dtype=torch.float32, device=t.device).view(3, 1, 1)
    t = (t - mean) / std
    h, w = t.shape[-2:]
    pad_h, pad_w = pad_shape
    if pad_h < h or pad_w < w:
        raise ValueError(f"pad shape {pad_h}x{pad_w} is smaller than the image {h}x{w}")
    if (pad_h, pad_w) != (h, w):
        t = torch.nn.functional.pad(t, (0, pad_w - w, 0, pad_h - h), value=0.0)
    return t


_MEAN_CHW = np.array(MEAN_RGB, dtype=np.float32).reshape(3, 1, 1)
_STD_CHW = np.array(STD_RGB, dtype=np.float32).reshape(3, 1, 1)


def normalize_numpy(resized: np.ndarray) -> np.ndarray:
    """BGR ``uint8`` ``[h, w, 3]`` -> normalised RGB float32 ``[3, h, w]`` (C-contiguous), bit-identical to
    :func:`normalize_pad` with no padding, but computed by numpy.

    ``paadet train``'s loader threads call this: a torch kernel big enough to run in parallel (this one)
    started from a new thread starts that thread's own OpenMP team, whose spinning threads then compete with
    the training step for the cores (on 2 cores, 2 loader threads made a 160x160 iteration 25 % slower: 0.73
    against 0.59 s with no loader thread). Inference keeps :func:`normalize_pad` (torch's threads, on the
    device of the batch).
    """
    rgb = resized[:, :, ::-1].transpose(2, 0, 1).astype(np.float32, order="C")
    return (rgb - _MEAN_CHW) / _STD_CHW


def preprocess(image: np.ndarray, preset: str | Preset = "mmdet") -> tuple[Tensor, ImageMeta]:
    """Resize, normalise and pad one BGR ``uint8`` image: ``[3, pad_h, pad_w]`` float32 and its meta."""
    resized, meta = resize(image, preset)
    return normalize_pad(resized, meta.pad_shape), meta


def collate(tensors: list[Tensor], metas: list[ImageMeta]) -> tuple[Tensor, Tensor, Tensor]:
    """Stack images of one padded size into a batch.

    Returns ``images [B, 3, H, W]``, ``img_shapes [B, 2]`` (h, w) and ``scale_factors [B, 2]``
    (w_scale, h_scale; float32 as mmdetection's ``new_tensor`` makes them).
    """
    import torch

    if len(tensors) != len(metas):
        raise ValueError(f"got {len(tensors)} images but {len(metas)} metas")
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) != 1:
        raise ValueError(f"a batch needs images of one padded size, got {sorted(shapes)}")
    images = torch.stack(tensors)
    img_shapes = torch.tensor([m.img_shape for m in metas], dtype=torch.float32)
    scale_factors = torch.tensor([m.scale_factor for m in metas], dtype=torch.float32)
    return images, img_shapes, scale_factors
