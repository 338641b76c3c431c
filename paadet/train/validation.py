"""Validation during training: paadet's COCO evaluator on the in-memory network."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from paadet.data.coco import CocoDataset
from paadet.detector import Detector
from paadet.evaluation.run import evaluate_detector
from paadet.model import PAANet
from paadet.preprocess import PRESETS, Preset
from paadet.runtime.torch_backend import TorchBackend

__all__ = ["ValidationResult", "load_validation_set", "validate"]


@dataclass
class ValidationResult:
    """The COCO metrics of one validation (``stats``: AP, AP50, ... as fractions), the image count and seconds."""

    stats: dict[str, float]
    images: int
    unreadable: int
    seconds: float

    @property
    def ap(self) -> float:
        return self.stats["AP"]

    def to_row(self) -> dict[str, Any]:
        return {
            "val": dict(self.stats),
            "val_images": self.images,
            "val_unreadable": self.unreadable,
            "val_time": self.seconds,
        }


def load_validation_set(ann_file: str | os.PathLike, image_dir: str | os.PathLike) -> CocoDataset:
    """The validation set, checked once at the start of the run (its category ids are the training set's)."""
    return CocoDataset.load(ann_file, image_dir, check_model_categories=False)


def validate(
    net: PAANet,
    dataset: CocoDataset,
    *,
    device: str | torch.device = "cpu",
    scale: tuple[int, int] = (1333, 800),
    batch_size: int = 1,
    workers: int = 2,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> ValidationResult:
    """Evaluate ``net`` (its ``classes`` give the category ids) on ``dataset`` with
    :func:`paadet.evaluation.run.evaluate_detector`, as ``paadet eval`` would (score voting on), with the images
    resized to the training ``scale`` as mmdetection's test pipeline does (1333x800: the ``mmdet`` preset).

    The network is left in eval mode; the caller switches it back to training.
    """
    start = time.perf_counter()
    preset = (
        PRESETS["mmdet"] if tuple(scale) == PRESETS["mmdet"].scale else Preset(f"{scale[0]}x{scale[1]}", tuple(scale))
    )
    detector = Detector(TorchBackend(net, preset=preset, device=device), batch_size=batch_size, workers=workers)
    kwargs = {} if log is None else {"log": log}
    report = evaluate_detector(detector, dataset, output_dir=None, progress=progress, workers=workers, **kwargs)
    return ValidationResult(
        dict(report.metrics.stats),
        report.images["evaluated"],
        report.images["missing"] + report.images["unreadable"],
        time.perf_counter() - start,
    )
