"""The ONNX Runtime backend: runs a graph made by ``paadet export``.

A full graph does everything after resizing (normalisation, network, decoding, NMS, score voting),
so this backend only pads images into the graph's input and converts the outputs. A raw graph (the
network's 15 maps) is supported too: normalisation and post-processing then run in PyTorch on the CPU.
What it shares with the OpenVINO backend is :class:`~paadet.runtime.exported_graph.ExportedGraphBackend`.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from paadet.errors import one_line
from paadet.preprocess import Preset
from paadet.runtime.exported_graph import ExportedGraphBackend, OnnxModelError, check_graph_preset
from paadet.runtime.graph_info import ExportFormatError, ExportInfo
from paadet.runtime.spec import ONNXRUNTIME

__all__ = ["OnnxModelError", "OnnxRuntimeBackend", "choose_providers", "parse_providers"]

PREFERRED_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


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


class OnnxRuntimeBackend(ExportedGraphBackend):
    """Runs a paadet ONNX export with ONNX Runtime.

    Args:
        session: the ONNX Runtime session.
        info: the export's metadata.
        path: the graph's file (for messages).
        preset: the preset to pre-process with (must size images as the graph's preset does).
    """

    name = ONNXRUNTIME

    def __init__(self, session, info: ExportInfo, path: str, preset: Preset | None = None) -> None:
        super().__init__(info, path, preset)
        self.session = session
        self.input_names = [i.name for i in session.get_inputs()]
        self.output_names = [o.name for o in session.get_outputs()]

    @classmethod
    def from_file(
        cls,
        path: str | os.PathLike,
        providers: list[str] | None = None,
        preset: str | Preset | None = None,
        session_options=None,
    ) -> OnnxRuntimeBackend:
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
        return cls(session, info, path, check_graph_preset(path, info, preset))

    @property
    def providers(self) -> list[str]:
        return list(self.session.get_providers())

    def _run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(self.output_names, feeds)

    def _runtime_facts(self) -> dict:
        return {"providers": self.providers}
