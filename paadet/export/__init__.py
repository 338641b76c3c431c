"""ONNX export of PAA: one graph from uint8 pixels to final detections (score voting included), or the raw network."""
from .exporter import DEFAULT_OPSET, ExportError, ExportReport, export_onnx
from .metadata import ExportFormatError, ExportInfo

__all__ = ["DEFAULT_OPSET", "ExportError", "ExportFormatError", "ExportInfo", "ExportReport", "export_onnx"]
