"""What each worker builds its detector from, and the identity of the weights a run's results come from."""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import one_line
from ..preprocess import Preset, get_preset
from .errors import BatchError


@dataclass
class ModelSpec:
    """What each worker builds its detector from: the arguments of :func:`paadet.commands.common.build_detector`.

    ``preset`` may be a preset name or a :class:`~paadet.preprocess.Preset`. With GPUs per worker,
    ``device`` ``cuda:N`` means the worker's own GPU (Ray makes it the only visible one).
    """

    backend: str = "torch"
    checkpoint: str | None = None
    model: str | None = None
    providers: str | None = None
    preset: str | Preset | None = None
    device: str = "cpu"
    batch_size: int | None = None
    fp16: bool = False
    score_voting: bool = True
    workers: int = 2
    optimize: bool = False
    bf16: bool = False
    precision: str | None = None
    streams: int | None = None

    def kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``build_detector`` (the preset object kept as is)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def fingerprint(self) -> dict[str, Any]:
        """The settings that decide the detections (JSON-normalised); a resumed run must use the same ones.

        The weights file is named here by path; its contents are identified by :func:`weights_identity`.
        """
        return json.loads(json.dumps({
            "backend": self.backend,
            "checkpoint": os.path.abspath(self.checkpoint) if self.checkpoint else None,
            "model": os.path.abspath(self.model) if self.model else None,
            "preset": dataclasses.asdict(get_preset(self.preset)) if self.preset is not None else None,
            "fp16": self.fp16,
            "score_voting": self.score_voting,
            "optimize": self.optimize,
            **({"bf16": True} if self.bf16 else {}),  # absent when off: runs from before the flag resume
            **({"precision": self.precision} if self.precision not in (None, "f32") else {}),  # OpenVINO bf16
        }))

    @property
    def weights_file(self) -> str | None:
        """The file that holds the weights: ``checkpoint`` (torch) or ``model`` (ONNX Runtime, OpenVINO)."""
        return self.checkpoint if self.backend == "torch" else self.model

    @property
    def weights_flag(self) -> str:
        return "--checkpoint" if self.backend == "torch" else "--model"


def weights_identity(spec: ModelSpec) -> dict[str, str] | None:
    """``{"file": absolute path, "sha256": hex}`` of the spec's weights file, hashed here (on the driver), once.

    None for the torch backend without ``--checkpoint``: the official file, whose name carries the
    prefix of its SHA-256, which is checked whenever it is loaded.

    Raises:
        BatchError: the file does not exist or cannot be read (before any work).
    """
    from ..fileio import sha256_file

    file = spec.weights_file
    if file is None:
        return None
    path = Path(file)
    if not path.is_file():
        raise BatchError(f"{file}: {spec.weights_flag} file not found" if not path.exists()
                         else f"{file}: {spec.weights_flag} is not a file")
    try:
        digest = sha256_file(path)
    except OSError as exc:
        raise BatchError(one_line(f"{file}: cannot read {spec.weights_flag}: {exc.strerror or exc}")) from None
    return {"file": os.path.abspath(file), "sha256": digest}
