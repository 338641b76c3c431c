"""The classes a model predicts, read from its file without building it (for start-up checks)."""
from __future__ import annotations

import os

from ..coco import COCO_CLASSES, ClassList
from ..errors import PaadetError


def model_classes(backend: str = "torch", checkpoint: str | os.PathLike | None = None,
                  model: str | os.PathLike | None = None) -> ClassList:
    """The classes of the model a backend would run.

    The official checkpoint (``checkpoint`` None) is COCO's 80; a checkpoint file's come from its meta, an
    ONNX graph's (or an OpenVINO IR's) from its metadata. A file that cannot be read gives COCO's 80 here and is left for the
    backend to report when it loads it.
    """
    from ..export.metadata import read_export_info

    try:
        if backend == "torch" and checkpoint is not None:
            from ..checkpoint import load_checkpoint  # torch: imported for checkpoints only

            return load_checkpoint(checkpoint).classes
        if backend == "onnxruntime" and model is not None:
            return read_export_info(model).classes
        if backend == "openvino" and model is not None:
            from .openvino_backend import read_export_info_any

            return read_export_info_any(model).classes
    except PaadetError:
        pass
    return COCO_CLASSES
