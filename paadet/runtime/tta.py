"""Test-time augmentation's views: the scales and flips at which a detector runs each image (no torch here).

``--tta`` runs every image at several scales, each as it is and mirrored left to right, maps every view's
candidates back to the original image and merges them with one NMS and PAA's score voting
(:class:`~paadet.runtime.tta_backend.TTABackend`; the choice of merge is explained in ``docs/tta.md``).

A scale is either a factor of the preset's scale (``0.8``: a preset fitting 1333x800 becomes 1066x640) or a
size ``LONGxSHORT`` (``1333x640``), resized as mmdetection's keep-ratio ``Resize`` does. The default,
:data:`DEFAULT_SCALES` with flips, is mmdetection's own TTA pattern (three scales around the training scale,
each flipped) with the scales closer together, as suits a model trained at one scale.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from paadet.preprocess import Preset

Scale = float | tuple[int, int]
"""A factor of the preset's scale, or an absolute ``(long, short)`` fit."""

DEFAULT_SCALES: tuple[Scale, ...] = (0.8, 1.0, 1.2)
"""``--tta`` alone: 0.8, 1 and 1.2 times the preset's scale, each as is and flipped (6 views)."""
MAX_FACTOR = 4.0
"""The largest factor ``--tta-scales`` takes (a view's input grows with its square)."""


def _show(scale: Scale) -> str:
    if isinstance(scale, tuple):
        return f"{scale[0]}x{scale[1]}"
    return f"{scale:g}"


def format_scales(scales: tuple[Scale, ...]) -> str:
    """Scales as ``--tta-scales`` writes them: ``0.8,1,1.2`` or ``1333x640,1333x800``."""
    return ",".join(_show(s) for s in scales)


def parse_scales(text: str) -> tuple[Scale, ...]:
    """``--tta-scales`` text -> scales: comma-separated factors (``0.8``) or sizes (``1333x640``).

    Raises:
        ValueError: an empty list or an item that is neither (one line, naming it).
    """
    scales: list[Scale] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        if "x" in item.lower():
            long_text, _, short_text = item.lower().partition("x")
            try:
                scales.append((int(long_text), int(short_text)))
            except ValueError:
                raise ValueError(f"--tta-scales: {item!r} is not a size LONGxSHORT (e.g. 1333x800)") from None
        else:
            try:
                scales.append(float(item))
            except ValueError:
                raise ValueError(
                    f"--tta-scales: {item!r} is neither a factor of the preset's scale (e.g. 0.8) nor a size "
                    "LONGxSHORT (e.g. 1333x800)"
                ) from None
    if not scales:
        raise ValueError(f"--tta-scales: no scale in {text!r}")
    return TTAOptions(tuple(scales)).scales


@dataclass(frozen=True)
class View:
    """One view of an image: resized by ``preset`` (keep-ratio), then mirrored left to right if ``flip``."""

    preset: Preset
    flip: bool

    @property
    def name(self) -> str:
        return f"{self.preset.scale[0]}x{self.preset.scale[1]}" + (" flipped" if self.flip else "")


@dataclass(frozen=True)
class TTAOptions:
    """Test-time augmentation settings (a :class:`~paadet.runtime.spec.DetectorSpec` field).

    Attributes:
        scales: factors of the preset's scale, or ``(long, short)`` sizes.
        flip: also run each scale mirrored left to right.

    Raises:
        ValueError: no scale, a factor that is not in ``(0, MAX_FACTOR]``, a size under 1 pixel.
    """

    scales: tuple[Scale, ...] = DEFAULT_SCALES
    flip: bool = True

    def __post_init__(self) -> None:
        if not self.scales:
            raise ValueError("--tta-scales: give at least one scale")
        for scale in self.scales:
            if isinstance(scale, (tuple, list)):
                if len(scale) != 2 or min(int(v) for v in scale) < 1:
                    raise ValueError(f"--tta-scales: a size needs two sides >= 1, got {_show(tuple(scale))}")
            elif not (math.isfinite(scale) and 0 < scale <= MAX_FACTOR):
                raise ValueError(f"--tta-scales: a factor must be in (0, {MAX_FACTOR:g}], got {scale}")

    def sizes(self, base: Preset) -> list[tuple[int, int]]:
        """The ``(long, short)`` fit of each scale for ``base``, without repeats, in the order given."""
        out: list[tuple[int, int]] = []
        for scale in self.scales:
            if isinstance(scale, (tuple, list)):
                size = (int(scale[0]), int(scale[1]))
            else:
                size = (max(1, int(base.scale[0] * scale + 0.5)), max(1, int(base.scale[1] * scale + 0.5)))
            if size not in out:
                out.append(size)
        return out

    def views(self, base: Preset) -> list[View]:
        """Every view for the preset ``base``: each size as it is, then flipped (with ``flip``).

        A size equal to ``base``'s scale uses ``base`` itself (its padding too, fixed or not), so that one view at
        factor 1 without flip is exactly the detection without TTA; the other sizes pad to a multiple of
        ``base.size_divisor`` (32 for a fixed-size preset).
        """
        views = []
        for size in self.sizes(base):
            if size == tuple(base.scale):
                preset = base
            else:
                preset = Preset(f"{size[0]}x{size[1]}", size, size_divisor=base.size_divisor or 32)
            views.append(View(preset, False))
            if self.flip:
                views.append(View(preset, True))
        return views

    def describe(self) -> str:
        """``scales 0.8,1,1.2 (of the preset) x {as is, flipped}``."""
        return f"scales {format_scales(self.scales)} x " + ("{as is, flipped}" if self.flip else "{as is}")

    def to_dict(self) -> dict[str, Any]:
        """Plain values (a run's fingerprint)."""
        return {"scales": [list(s) if isinstance(s, tuple) else s for s in self.scales], "flip": self.flip}


def source_preset(base: Preset) -> Preset:
    """What a TTA detector loads: every image at its own size (each view is resized from it), padded as ``base``
    pads (the loader groups images of one padded size)."""
    return Preset(f"native ({base.name} views)", base.scale, size_divisor=base.size_divisor or 32, native=True)
