"""ONNX export of PAA: one graph from uint8 pixels to final detections (score voting included), or the raw network.

The exporter (torch) is imported on first use: reading an export's metadata, as the ONNX Runtime and
OpenVINO backends do, needs no torch.
"""

from paadet.export.sample import ExportError
from paadet.runtime.graph_info import ExportFormatError, ExportInfo

__all__ = ["DEFAULT_OPSET", "ExportError", "ExportFormatError", "ExportInfo", "ExportReport", "export_onnx"]

_EXPORTER_NAMES = ("DEFAULT_OPSET", "ExportReport", "export_onnx")


def __getattr__(name: str):
    if name in _EXPORTER_NAMES:
        from paadet.export import exporter

        return getattr(exporter, name)
    raise AttributeError(f"module 'paadet.export' has no attribute {name!r}")
