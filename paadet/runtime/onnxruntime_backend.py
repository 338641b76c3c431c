"""The ONNX Runtime backend: runs a graph made by ``paadet export``.

A full graph does everything after resizing (normalisation, network, decoding, NMS, score voting),
so this backend only pads images into the graph's input and converts the outputs. A raw graph (the
network's 15 maps) is supported too: normalisation and post-processing then run in PyTorch on the CPU.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from ..errors import PaadetError, one_line
from ..export.metadata import ExportFormatError, ExportInfo, same_preset
from ..postprocess import Detections, PAAPostprocess, PostprocessConfig
from ..preprocess import ImageMeta, Preset, get_preset, normalize_pad
from .base import Backend, StageTimer

PREFERRED_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


class OnnxModelError(PaadetError):
    """An ONNX graph that cannot be used as asked (wrong preset, size, batch, provider); names the file."""


def choose_providers(requested: list[str] | None = None) -> list[str]:
    """Execution providers to use: ``requested`` (all must be installed) or the best installed of
    TensorRT > CUDA > CPU (CPU always last as the fallback)."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if requested:
        missing = [p for p in requested if p not in available]
        if missing:
            raise OnnxModelError(
                f"ONNX Runtime provider(s) {', '.join(missing)} not installed; available: {', '.join(available)}"
            )
        return list(requested)
    return [p for p in PREFERRED_PROVIDERS if p in available] or list(available)


def parse_providers(text: str | None) -> list[str] | None:
    """``--providers`` text (comma-separated) -> a provider list; None or empty -> None (the default choice)."""
    providers = [p.strip() for p in (text or "").split(",") if p.strip()]
    return providers or None


class OnnxRuntimeBackend(Backend):
    """Runs a paadet ONNX export with ONNX Runtime.

    Args:
        session: the ONNX Runtime session.
        info: the export's metadata.
        path: the graph's file (for messages).
        preset: the preset to pre-process with (must size images as the graph's preset does).
    """

    name = "onnxruntime"

    def __init__(self, session, info: ExportInfo, path: str, preset: Preset | None = None) -> None:
        self.session = session
        self.info = info
        self.path = path
        self.preset = preset or info.preset
        self.fixed_batch = info.batch
        self.classes = info.classes
        self.input_names = [i.name for i in session.get_inputs()]
        self.output_names = [o.name for o in session.get_outputs()]
        self._post = PAAPostprocess(PostprocessConfig.from_dict(info.postprocess)) if info.graph == "raw" else None

    @classmethod
    def from_file(
        cls,
        path: str | os.PathLike,
        providers: list[str] | None = None,
        preset: str | Preset | None = None,
        session_options=None,
    ) -> "OnnxRuntimeBackend":
        """Open ``path`` (a ``paadet export`` graph) on the chosen providers.

        Args:
            path: the ``.onnx`` file.
            providers: ONNX Runtime execution providers in priority order; default TensorRT > CUDA > CPU
                among those installed.
            preset: the preset the caller pre-processes with; must match the graph's (default: the graph's).
            session_options: ``onnxruntime.SessionOptions`` (default: all graph optimisations).

        Raises:
            ExportFormatError: unreadable file or not a paadet export.
            OnnxModelError: preset that does not fit the graph, or a provider that is not installed.
        """
        import onnxruntime as ort

        path = str(path)
        if not Path(path).is_file():
            raise ExportFormatError(f"{path}: ONNX model file not found")
        chosen = choose_providers(providers)
        if session_options is None:
            session_options = ort.SessionOptions()
            session_options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            session = ort.InferenceSession(path, sess_options=session_options, providers=chosen)
        except Exception as exc:  # ORT raises its own exception types (InvalidProtobuf, Fail, ...)
            raise ExportFormatError(
                f"{path}: cannot be read as an ONNX model ({type(exc).__name__}: {one_line(exc)[:300]})"
            ) from exc
        info = ExportInfo.from_metadata(dict(session.get_modelmeta().custom_metadata_map), path)
        if preset is not None:
            preset = get_preset(preset)
            if not same_preset(preset, info.preset):
                raise OnnxModelError(
                    f"{path}: exported for preset {info.preset.name} (scale {info.preset.scale}, "
                    f"{_padding(info.preset)}), not preset {preset.name} (scale {preset.scale}, {_padding(preset)}); "
                    f"use --preset {info.preset.name} or re-export with --preset {preset.name}"
                )
        return cls(session, info, path, preset)

    @property
    def providers(self) -> list[str]:
        return list(self.session.get_providers())

    def input_shape_for(self, metas: list[ImageMeta]) -> tuple[int, int]:
        """The padded ``(height, width)`` to feed for a batch; raises OnnxModelError if an image does not fit."""
        pad_shapes = {m.pad_shape for m in metas}
        if len(pad_shapes) != 1:
            raise ValueError(f"a batch needs images of one padded size, got {sorted(pad_shapes)}")
        if self.info.input_size is None:
            return pad_shapes.pop()
        gh, gw = self.info.input_size
        for m in metas:
            h, w = m.img_shape
            if h > gh or w > gw:
                raise OnnxModelError(
                    f"{self.path}: image resized to {h}x{w} does not fit the graph's fixed input {gh}x{gw}; "
                    f"re-export with a larger --input-size or a dynamic size"
                )
        return gh, gw

    def _check_batch(self, n: int) -> int:
        """Rows to feed for ``n`` images (the static batch, or ``n``)."""
        if self.fixed_batch is None:
            return n
        if n > self.fixed_batch:
            raise OnnxModelError(
                f"{self.path}: {n} images in one call but the graph has a static batch of {self.fixed_batch}; "
                f"use --batch-size {self.fixed_batch} or less, or re-export with --dynamic-batch"
            )
        return self.fixed_batch

    def infer(self, images: list[np.ndarray], metas: list[ImageMeta], timer: StageTimer | None = None) -> Detections:
        """Detect on resized BGR ``uint8`` images ``[h, w, 3]`` of one padded size; CPU tensors out."""
        timer = timer or StageTimer()
        n = len(images)
        if n == 0:
            raise ValueError("infer needs at least one image")
        rows = self._check_batch(n)
        if self.info.graph == "raw":
            return self._infer_raw(images, metas, rows, timer)
        with timer.stage("preprocess"):
            height, width = self.input_shape_for(metas)
            batch = np.zeros((rows, height, width, 3), np.uint8)
            img_shapes = np.ones((rows, 2), np.float32)
            scale_factors = np.ones((rows, 2), np.float32)
            for i, (img, m) in enumerate(zip(images, metas)):
                h, w = img.shape[:2]
                batch[i, :h, :w] = img
                img_shapes[i] = m.img_shape
                scale_factors[i] = m.scale_factor
            feeds = dict(zip(self.input_names, (batch, img_shapes, scale_factors)))
        with timer.stage("network"):
            boxes, scores, labels, num_dets = self.session.run(self.output_names, feeds)
        with timer.stage("postprocess"):
            dets = Detections(
                torch.from_numpy(np.ascontiguousarray(boxes[:n], np.float32)),
                torch.from_numpy(np.ascontiguousarray(scores[:n], np.float32)),
                torch.from_numpy(np.ascontiguousarray(labels[:n], np.int64)),
                torch.from_numpy(np.ascontiguousarray(num_dets[:n], np.int64)),
            )
        return dets

    def _infer_raw(self, images: list[np.ndarray], metas: list[ImageMeta], rows: int, timer: StageTimer) -> Detections:
        """Raw graph: normalise and pad in PyTorch, run the network, post-process in PyTorch."""
        n = len(images)
        with timer.stage("preprocess"):
            height, width = self.input_shape_for(metas)
            batch = torch.zeros(rows, 3, height, width)
            for i, (img, m) in enumerate(zip(images, metas)):
                batch[i] = normalize_pad(torch.from_numpy(np.ascontiguousarray(img)), (height, width))
            feeds = {self.input_names[0]: batch.numpy()}
        with timer.stage("network"):
            maps = [torch.from_numpy(m[:n]) for m in self.session.run(self.output_names, feeds)]
        with timer.stage("postprocess"):
            img_shapes = torch.tensor([m.img_shape for m in metas], dtype=torch.float32)
            scale_factors = torch.tensor([m.scale_factor for m in metas], dtype=torch.float32)
            dets = self._post(maps[0:5], maps[5:10], maps[10:15], img_shapes, scale_factors)
        return dets

    def describe(self) -> dict:
        info = super().describe()
        info.update(
            model=self.path,
            providers=self.providers,
            precision=self.info.precision,
            graph=("full: normalisation, network, decoding, NMS and score voting all run inside the graph "
                   "(the postprocess stage only converts outputs)") if self.info.graph == "full"
            else "raw: network only; normalisation and post-processing in PyTorch on the CPU",
            score_voting=self.info.score_voting,
            batch=self.fixed_batch or "dynamic",
            input_size="x".join(map(str, self.info.input_size)) if self.info.input_size else "dynamic",
        )
        return info


def _padding(preset: Preset) -> str:
    if preset.fixed_size is not None:
        return f"fixed {preset.fixed_size[0]}x{preset.fixed_size[1]}"
    return f"padded to /{preset.size_divisor}"
