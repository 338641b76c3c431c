"""What every runtime backend provides, and a stage timer that is honest about GPU work."""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import numpy as np

from paadet.classes import COCO_CLASSES, ClassList
from paadet.detections import Detections
from paadet.preprocess import ImageMeta, Preset

if TYPE_CHECKING:
    import torch

STAGES = ("decode", "preprocess", "network", "postprocess")


class StageTimer:
    """Accumulates wall time per named stage.

    With a CUDA ``device`` the timer synchronises the device at both ends of each stage, so queued
    kernels are charged to the stage that launched them. Several threads may time stages at once (a
    backend running batches concurrently): each stage's total is then the sum of the threads' times, which
    can exceed the wall time.
    """

    def __init__(self, device: torch.device | str | None = None) -> None:
        self.totals: dict[str, float] = defaultdict(float)
        self.device = device
        self._lock = threading.Lock()
        self._cuda = device is not None and str(device).split(":")[0] == "cuda"  # no torch import otherwise

    def _sync(self) -> None:
        if self._cuda:
            import torch

            torch.cuda.synchronize(self.device)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.add(name, time.perf_counter() - start)

    def add(self, name: str, seconds: float) -> None:
        with self._lock:
            self.totals[name] += seconds

    def merge(self, other: StageTimer) -> None:
        for name, seconds in list(other.totals.items()):
            self.add(name, seconds)

    def ms_per_image(self, num_images: int) -> dict[str, float]:
        """Milliseconds per image for each stage seen (in :data:`STAGES` order first)."""
        n = max(num_images, 1)
        names = [s for s in STAGES if s in self.totals] + [s for s in self.totals if s not in STAGES]
        return {name: 1000.0 * self.totals[name] / n for name in names}

    def summary(self, num_images: int) -> str:
        parts = [f"{name} {ms:.1f}" for name, ms in self.ms_per_image(num_images).items()]
        return "ms/image: " + ", ".join(parts)


class Backend(ABC):
    """Runs the detector on batches of resized images of one padded size.

    Attributes:
        name: backend name (``torch``, ``onnxruntime``).
        preset: the pre-processing preset the backend was built for.
        fixed_batch: batch size a static graph requires (the backend pads short batches), or None.
        classes: the model's classes (label i is ``classes.names[i]``, COCO id ``classes.category_ids[i]``).
        concurrency: how many :meth:`infer` calls may usefully run at once from different threads (1: one
            at a time; OpenVINO with several streams: one per stream). The :class:`~paadet.detector.Detector`
            keeps that many batches in flight.
    """

    name: str = "base"
    preset: Preset
    fixed_batch: int | None = None
    classes: ClassList = COCO_CLASSES
    concurrency: int = 1

    @abstractmethod
    def infer(self, images: list[np.ndarray], metas: list[ImageMeta], timer: StageTimer | None = None) -> Detections:
        """Detect on resized BGR ``uint8`` images ``[h, w, 3]`` that share ``metas[i].pad_shape``.

        Normalisation and padding happen here (on the backend's device). Returns host arrays (torch
        tensors or numpy arrays, see :mod:`paadet.detections`), boxes in original-image pixels. Adds ``preprocess``,
        ``network`` and ``postprocess`` times to
        ``timer`` when given.
        """

    def describe(self) -> dict:
        """Short facts for reports (backend, device, precision...)."""
        return {"backend": self.name, "preset": self.preset.name}
