"""The PAA model zoo: mmdetection's seven published PAA checkpoints by name, their training recipes, and the cache.

Each :class:`ModelEntry` carries its metadata (torchvision's style): backbone depth, training recipe, published box
AP, the download URL and the sha256 prefix that the file name encodes. The names are mmdetection 3.x's config names
(``paa_r101_fpn_ms-3x_coco``); :func:`get_model` also takes mmdetection 2.x's name (``paa_r101_fpn_mstrain_3x_coco``,
the URL's folder and the name in 3.3's ``metafile.yml``) and the file name. The facts are those of mmdetection
3.3's ``configs/paa/`` (``metafile.yml`` and the configs; the AP without score voting is from its README).

:data:`RECIPES` are the training schedules of the configs (``paadet train --recipe``): epochs, the epochs after
which the lr drops tenfold, and the training resize. Nothing here imports torch: ``paadet models`` lists the zoo
and the cache without it. Downloading is :mod:`paadet.hub`'s.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from types import MappingProxyType
from typing import Any
from urllib.parse import urlsplit

from paadet.errors import PaadetError

__all__ = [
    "DEFAULT_MODEL",
    "MODELS",
    "PARAMETERS",
    "RECIPES",
    "STATE_DICT_BYTES",
    "ModelEntry",
    "Recipe",
    "UnknownModelError",
    "cache_dir",
    "find_model",
    "get_model",
    "model_names",
]


@dataclass(frozen=True)
class Recipe:
    """A training schedule of mmdetection's PAA configs (SGD, lr 0.01 for 16 images, 500 warm-up iterations).

    Attributes:
        name: ``1x``, ``1.5x``, ``2x`` or ``ms-3x``.
        epochs: epochs in all.
        lr_steps: epochs after which the lr is multiplied by 0.1 (mmdetection's ``MultiStepLR`` milestones).
        train_scales: ``(long, short)`` sizes of the keep-ratio training resize: one pair is a fixed scale
            (``Resize(scale=(1333, 800), keep_ratio=True)``), two pairs the bounds that ``RandomResize`` draws
            each image's scale between.
    """

    name: str
    epochs: int
    lr_steps: tuple[int, ...]
    train_scales: tuple[tuple[int, int], ...]

    @property
    def multi_scale(self) -> bool:
        """Whether each image's training scale is drawn (``RandomResize``) rather than fixed."""
        return len(self.train_scales) > 1


_SINGLE_SCALE = ((1333, 800),)
RECIPES: MappingProxyType[str, Recipe] = MappingProxyType(
    {
        r.name: r
        for r in (
            Recipe("1x", 12, (8, 11), _SINGLE_SCALE),
            Recipe("1.5x", 18, (12, 16), _SINGLE_SCALE),
            Recipe("2x", 24, (16, 22), _SINGLE_SCALE),
            Recipe("ms-3x", 36, (28, 34), ((1333, 640), (1333, 800))),
        )
    }
)
"""Every recipe by name, in the order of :func:`model_names`' schedules."""

PARAMETERS: MappingProxyType[int, int] = MappingProxyType({50: 32_295_322, 101: 51_287_450})
"""Parameters of the PAA network by backbone depth (COCO's 80 classes)."""

STATE_DICT_BYTES: MappingProxyType[int, int] = MappingProxyType({50: 129_394_192, 101: 205_572_008})
"""Bytes of a PAA state dict in float32 by backbone depth (COCO's 80 classes; parameters, BatchNorm statistics
and counters): the bulk of a checkpoint file, whose size is this plus a small pickle and meta overhead. Computed
from :class:`paadet.model.PAANet` (``tests/test_zoo.py`` checks it); not measured on the downloads, which could
not be reached from the build machine."""

_DOWNLOAD_ROOT = "https://download.openmmlab.com/mmdetection/v2.0/paa"
_FILE_RE = re.compile(r"^(?P<folder>[\w.-]+?)_(?P<date>\d{8})(?:_\d{6})?-(?P<sha>[0-9a-f]{8})\.pth$")
"""mmdetection's published file names: ``<2.x name>_<date>[_<time>]-<sha256 prefix>.pth``."""


@dataclass(frozen=True)
class ModelEntry:
    """One published PAA checkpoint and what is known of it.

    Attributes:
        name: mmdetection 3.x's config name, e.g. ``paa_r101_fpn_ms-3x_coco``.
        depth: the ResNet backbone's depth, 50 or 101.
        recipe: the name of its training :class:`Recipe` in :data:`RECIPES`.
        box_ap: COCO val2017 box AP published with score voting (mmdetection's default test setting).
        box_ap_no_voting: the same without score voting, where published (else None).
        url: the download address (``metafile.yml``'s ``Weights``).
    """

    name: str
    depth: int
    recipe: str
    box_ap: float
    box_ap_no_voting: float | None
    url: str

    @property
    def file_name(self) -> str:
        """The checkpoint's file name, the URL's last component (``paa_r50_fpn_1x_coco_20200821-936edec3.pth``)."""
        return PurePosixPath(urlsplit(self.url).path).name

    @property
    def legacy_name(self) -> str:
        """mmdetection 2.x's name, the URL's folder and ``metafile.yml``'s ``Name``: ``paa_r50_fpn_mstrain_3x_coco``."""
        return _file_match(self.file_name).group("folder")

    @property
    def sha256_prefix(self) -> str:
        """The first 8 hex digits of the file's sha256, as its name states (checked on download and load)."""
        return _file_match(self.file_name).group("sha")

    @property
    def backbone(self) -> str:
        """``R-50`` or ``R-101``."""
        return f"R-{self.depth}"

    @property
    def schedule(self) -> Recipe:
        """The training recipe (epochs, lr steps, training scales)."""
        return RECIPES[self.recipe]

    @property
    def epochs(self) -> int:
        return self.schedule.epochs

    @property
    def lr_steps(self) -> tuple[int, ...]:
        return self.schedule.lr_steps

    @property
    def train_scales(self) -> tuple[tuple[int, int], ...]:
        return self.schedule.train_scales

    @property
    def estimated_bytes(self) -> int:
        """The download's approximate size: its float32 state dict (:data:`STATE_DICT_BYTES`), not a measurement."""
        return STATE_DICT_BYTES[self.depth]

    def cached_path(self) -> Path:
        """Where the file is (or would be) cached: ``cache_dir() / file_name``."""
        return cache_dir() / self.file_name

    def to_json(self) -> dict[str, Any]:
        """Every fact of the entry as JSON values, with whether it is cached now (``paadet models --json``)."""
        path = self.cached_path()
        return {
            "name": self.name,
            "legacy_name": self.legacy_name,
            "backbone": self.backbone,
            "depth": self.depth,
            "recipe": self.recipe,
            "epochs": self.epochs,
            "lr_steps": list(self.lr_steps),
            "train_scales": [list(scale) for scale in self.train_scales],
            "box_ap": self.box_ap,
            "box_ap_no_voting": self.box_ap_no_voting,
            "url": self.url,
            "file_name": self.file_name,
            "sha256_prefix": self.sha256_prefix,
            "parameters": PARAMETERS[self.depth],
            "estimated_bytes": self.estimated_bytes,
            "cached": path.is_file(),
            "cached_path": str(path),
        }


def _file_match(file_name: str) -> re.Match[str]:
    match = _FILE_RE.match(file_name)
    if match is None:  # the table below is wrong, not the user's input
        raise AssertionError(f"{file_name} does not follow mmdetection's <name>_<date>-<sha256>.pth")
    return match


def _entry(name: str, depth: int, recipe: str, ap: float, ap_no_voting: float | None, file_name: str) -> ModelEntry:
    folder = _file_match(file_name).group("folder")
    return ModelEntry(name, depth, recipe, ap, ap_no_voting, f"{_DOWNLOAD_ROOT}/{folder}/{file_name}")


MODELS: MappingProxyType[str, ModelEntry] = MappingProxyType(
    {
        e.name: e
        for e in (
            _entry("paa_r50_fpn_1x_coco", 50, "1x", 40.4, 40.2, "paa_r50_fpn_1x_coco_20200821-936edec3.pth"),
            _entry("paa_r50_fpn_1.5x_coco", 50, "1.5x", 41.4, 41.2, "paa_r50_fpn_1.5x_coco_20200823-805d6078.pth"),
            _entry("paa_r50_fpn_2x_coco", 50, "2x", 41.6, None, "paa_r50_fpn_2x_coco_20200821-c98bfc4e.pth"),
            _entry(
                "paa_r50_fpn_ms-3x_coco",
                50,
                "ms-3x",
                43.3,
                None,
                "paa_r50_fpn_mstrain_3x_coco_20210121_145722-06a6880b.pth",
            ),
            _entry("paa_r101_fpn_1x_coco", 101, "1x", 42.6, 42.4, "paa_r101_fpn_1x_coco_20200821-0a1825a4.pth"),
            _entry("paa_r101_fpn_2x_coco", 101, "2x", 43.5, None, "paa_r101_fpn_2x_coco_20200821-6829f96b.pth"),
            _entry(
                "paa_r101_fpn_ms-3x_coco",
                101,
                "ms-3x",
                45.1,
                None,
                "paa_r101_fpn_mstrain_3x_coco_20210122_084202-83250d22.pth",
            ),
        )
    }
)
"""The seven checkpoints by name, R-50 then R-101, shorter schedules first."""

DEFAULT_MODEL = "paa_r50_fpn_1x_coco"
"""The checkpoint used when none is named (``--checkpoint`` left out)."""

_ALIASES: MappingProxyType[str, str] = MappingProxyType(
    {alias: e.name for e in MODELS.values() for alias in (e.name, e.legacy_name, e.file_name)}
)


class UnknownModelError(PaadetError, LookupError):
    """A name that is not one of :data:`MODELS` (the message lists the known ones)."""


def model_names() -> tuple[str, ...]:
    """The names of :data:`MODELS`, in order."""
    return tuple(MODELS)


def find_model(name: str | os.PathLike[str]) -> ModelEntry | None:
    """The entry called ``name`` (3.x name, 2.x name or file name, exactly), or None."""
    key = _ALIASES.get(os.fspath(name))
    return MODELS[key] if key is not None else None


def get_model(name: str) -> ModelEntry:
    """The entry called ``name`` (as :func:`find_model`).

    Raises:
        UnknownModelError: one line listing the known names.
    """
    entry = find_model(name)
    if entry is None:
        raise UnknownModelError(f"{name}: not a PAA model name; known: {', '.join(model_names())}")
    return entry


def cache_dir() -> Path:
    """Where checkpoints are cached: ``$PAADET_CACHE``, else ``$XDG_CACHE_HOME/paadet``, else ``~/.cache/paadet``."""
    override = os.environ.get("PAADET_CACHE")
    if override:
        return Path(override).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "paadet"
