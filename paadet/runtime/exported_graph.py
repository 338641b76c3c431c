"""What every runtime of a ``paadet export`` graph shares: its inputs, its outputs and its checks.

A full graph does everything after resizing (normalisation, network, decoding, NMS, score voting), so a
backend only pads images into the graph's input and converts the outputs. A raw graph (the network's 15
maps) is supported too: normalisation and post-processing then run in PyTorch on the CPU. The ONNX
Runtime and OpenVINO backends differ only in how they run the graph (:meth:`ExportedGraphBackend._run`).

A full graph's path imports no torch: its detections are numpy arrays (:mod:`paadet.detections`), which
saves a command about a second of start-up. Only a raw graph imports torch, when the backend is built.
"""

from __future__ import annotations

import numpy as np

from paadet.detections import Detections, PostprocessConfig
from paadet.errors import PaadetError
from paadet.preprocess import ImageMeta, Preset, get_preset, normalize_pad
from paadet.runtime.base import Backend, StageTimer
from paadet.runtime.graph_info import ExportInfo, same_preset

__all__ = ["ExportedGraphBackend", "OnnxModelError", "check_graph_preset"]


class OnnxModelError(PaadetError):
    """An ONNX graph that cannot be used as asked (wrong preset, size, batch, provider); names the file."""


def _padding(preset: Preset) -> str:
    if preset.fixed_size is not None:
        return f"fixed {preset.fixed_size[0]}x{preset.fixed_size[1]}"
    return f"padded to /{preset.size_divisor}"


def check_graph_preset(
    path: str, info: ExportInfo, preset: str | Preset | None, error: type[Exception] = OnnxModelError
) -> Preset | None:
    """``preset`` as a :class:`Preset` (None stays None: the graph's), refused with ``error`` if it does not
    size images as the graph's preset does."""
    if preset is None:
        return None
    preset = get_preset(preset)
    if not same_preset(preset, info.preset):
        raise error(
            f"{path}: exported for preset {info.preset.name} (scale {info.preset.scale}, "
            f"{_padding(info.preset)}), not preset {preset.name} (scale {preset.scale}, {_padding(preset)}); "
            f"use --preset {info.preset.name} or re-export with --preset {preset.name}"
        )
    return preset


class ExportedGraphBackend(Backend):
    """A ``paadet export`` graph run by some runtime; subclasses set ``input_names`` / ``output_names`` and
    implement :meth:`_run`.

    Args:
        info: the export's metadata.
        path: the graph's file (for messages).
        preset: the preset to pre-process with (must size images as the graph's preset does).
    """

    model_error: type[Exception] = OnnxModelError
    """What a graph that cannot take a batch raises (it names the file)."""

    input_names: list[str]
    output_names: list[str]

    def __init__(self, info: ExportInfo, path: str, preset: Preset | None = None) -> None:
        self.info = info
        self.path = path
        self.preset = preset or info.preset
        self.fixed_batch = info.batch
        self.classes = info.classes
        self._post = None
        if info.graph == "raw":  # post-processed in PyTorch: the only part of this path that needs torch
            from paadet.postprocess import PAAPostprocess

            self._post = PAAPostprocess(PostprocessConfig.from_dict(info.postprocess))

    def _run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """The graph's outputs, in its output order, for ``feeds``."""
        raise NotImplementedError

    def input_shape_for(self, metas: list[ImageMeta]) -> tuple[int, int]:
        """The padded ``(height, width)`` to feed for a batch; raises ``model_error`` if an image does not fit."""
        pad_shapes = {m.pad_shape for m in metas}
        if len(pad_shapes) != 1:
            raise ValueError(f"a batch needs images of one padded size, got {sorted(pad_shapes)}")
        if self.info.input_size is None:
            return pad_shapes.pop()
        gh, gw = self.info.input_size
        for m in metas:
            h, w = m.img_shape
            if h > gh or w > gw:
                raise self.model_error(
                    f"{self.path}: image resized to {h}x{w} does not fit the graph's fixed input {gh}x{gw}; "
                    f"re-export with a larger --input-size or a dynamic size"
                )
        return gh, gw

    def _check_batch(self, n: int) -> int:
        """Rows to feed for ``n`` images (the static batch, or ``n``)."""
        if self.fixed_batch is None:
            return n
        if n > self.fixed_batch:
            raise self.model_error(
                f"{self.path}: {n} images in one call but the graph has a static batch of {self.fixed_batch}; "
                f"use --batch-size {self.fixed_batch} or less, or re-export with --dynamic-batch"
            )
        return self.fixed_batch

    def feeds(self, images: list[np.ndarray], metas: list[ImageMeta], rows: int | None = None) -> dict[str, np.ndarray]:
        """A full graph's inputs for resized BGR ``uint8`` images: the zero-padded NHWC ``uint8`` batch
        ``[rows, H, W, 3]``, ``img_shapes`` and ``scale_factors`` ``[rows, 2]`` (``rows``: the static batch or
        ``len(images)``). Also what ``paadet quantize`` calibrates on."""
        if self.info.graph != "full":
            raise ValueError(f"{self.path}: feeds() builds a full graph's inputs; this is a {self.info.graph} graph")
        rows = rows if rows is not None else self._check_batch(len(images))
        height, width = self.input_shape_for(metas)
        batch = np.zeros((rows, height, width, 3), np.uint8)
        img_shapes = np.ones((rows, 2), np.float32)
        scale_factors = np.ones((rows, 2), np.float32)
        for i, (img, m) in enumerate(zip(images, metas, strict=False)):
            h, w = img.shape[:2]
            batch[i, :h, :w] = img
            img_shapes[i] = m.img_shape
            scale_factors[i] = m.scale_factor
        return dict(zip(self.input_names, (batch, img_shapes, scale_factors), strict=False))

    def infer(self, images: list[np.ndarray], metas: list[ImageMeta], timer: StageTimer | None = None) -> Detections:
        """Detect on resized BGR ``uint8`` images ``[h, w, 3]`` of one padded size; numpy arrays out from a
        full graph, CPU tensors from a raw one."""
        timer = timer or StageTimer()
        n = len(images)
        if n == 0:
            raise ValueError("infer needs at least one image")
        rows = self._check_batch(n)
        if self.info.graph == "raw":
            return self._infer_raw(images, metas, rows, timer)
        with timer.stage("preprocess"):
            feeds = self.feeds(images, metas, rows)
        with timer.stage("network"):
            boxes, scores, labels, num_dets = self._run(feeds)
        with timer.stage("postprocess"):
            dets = Detections(
                np.ascontiguousarray(boxes[:n], np.float32),
                np.ascontiguousarray(scores[:n], np.float32),
                np.ascontiguousarray(labels[:n], np.int64),
                np.ascontiguousarray(num_dets[:n], np.int64),
            )
        return dets

    def _infer_raw(self, images: list[np.ndarray], metas: list[ImageMeta], rows: int, timer: StageTimer) -> Detections:
        """Raw graph: normalise and pad in PyTorch, run the network, post-process in PyTorch."""
        import torch

        n = len(images)
        with timer.stage("preprocess"):
            height, width = self.input_shape_for(metas)
            batch = torch.zeros(rows, 3, height, width)
            for i, img in enumerate(images):
                batch[i] = normalize_pad(torch.from_numpy(np.ascontiguousarray(img)), (height, width))
            feeds = {self.input_names[0]: batch.numpy()}
        with timer.stage("network"):
            maps = [torch.from_numpy(m[:n]) for m in self._run(feeds)]
        with timer.stage("postprocess"):
            img_shapes = torch.tensor([m.img_shape for m in metas], dtype=torch.float32)
            scale_factors = torch.tensor([m.scale_factor for m in metas], dtype=torch.float32)
            dets = self._post(maps[0:5], maps[5:10], maps[10:15], img_shapes, scale_factors)
        return dets

    def _runtime_facts(self) -> dict:
        """The runtime's own entries of :meth:`describe`, listed right after the model file."""
        return {}

    def describe(self) -> dict:
        info = super().describe()
        info["model"] = self.path
        info["architecture"] = self.info.architecture
        info.update(self._runtime_facts())
        info.setdefault("precision", self.info.precision)
        info.update(
            graph=(
                "full: normalisation, network, decoding, NMS and score voting all run inside the graph "
                "(the postprocess stage only converts outputs)"
            )
            if self.info.graph == "full"
            else "raw: network only; normalisation and post-processing in PyTorch on the CPU",
            score_voting=self.info.score_voting,
            batch=self.fixed_batch or "dynamic",
            input_size="x".join(map(str, self.info.input_size)) if self.info.input_size else "dynamic",
        )
        return info
