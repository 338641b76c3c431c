"""What a paadet ONNX export says about itself (ONNX ``metadata_props``), and reading it back.

One key, ``paadet``, holds a JSON object: format version, paadet version, graph kind (``full``: pixels
to detections; ``raw``: the network's 15 maps), the backbone's depth (50 or 101), the preset, the input
size (``null`` = dynamic), the batch (``null`` = dynamic), precision, score voting and the post-processing
settings. Readable individual keys (``paadet_graph``, ``paadet_architecture``, ``paadet_preset``...) are
written too, for Netron and friends.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from paadet.classes import COCO_CLASSES, ClassList
from paadet.errors import PaadetError
from paadet.preprocess import Preset

METADATA_KEY = "paadet"
FORMAT_VERSION = 2
"""2: ``depth`` recorded (R-50 or R-101). Format 1 files (written before R-101) read as R-50."""


def architecture_name(depth: int) -> str:
    """The network's name for reports and metadata: ``PAA R50-FPN`` or ``PAA R101-FPN``."""
    return f"PAA R{depth}-FPN"


class ExportFormatError(PaadetError):
    """An ONNX file that is not a (readable, compatible) paadet export; the message names the file."""


@dataclass(frozen=True)
class ExportInfo:
    """Facts about an exported graph.

    Attributes:
        graph: ``full`` or ``raw``.
        preset: the pre-processing preset the graph was exported for.
        input_size: ``(height, width)`` of the graph's image input, or ``None`` when dynamic.
        batch: static batch size, or ``None`` when dynamic.
        precision: ``fp32`` or ``fp16`` (the network's; post-processing is always fp32).
        score_voting: whether score voting is inside the graph (full graphs).
        opset: ONNX opset of the default domain.
        version: paadet version that exported it.
        postprocess: the :class:`~paadet.postprocess.PostprocessConfig` fields (full graphs).
        classes: the model's classes (names and COCO category ids; COCO's 80 for graphs exported before
            class lists were recorded).
        depth: the backbone's depth, 50 or 101 (50 for graphs exported before it was recorded).
    """

    graph: str
    preset: Preset
    input_size: tuple[int, int] | None
    batch: int | None
    precision: str
    score_voting: bool
    opset: int
    version: str
    postprocess: dict = field(default_factory=dict)
    classes: ClassList = COCO_CLASSES
    depth: int = 50

    @property
    def architecture(self) -> str:
        """``PAA R50-FPN`` or ``PAA R101-FPN``."""
        return architecture_name(self.depth)

    def to_json(self) -> str:
        data = asdict(self)
        data["classes"] = self.classes.to_meta()
        data["format"] = FORMAT_VERSION
        return json.dumps(data, sort_keys=True)

    def metadata_props(self) -> dict[str, str]:
        """All keys written to the ONNX model."""
        size = "x".join(map(str, self.input_size)) if self.input_size else "dynamic"
        return {
            METADATA_KEY: self.to_json(),
            "paadet_version": self.version,
            "paadet_graph": self.graph,
            "paadet_architecture": self.architecture,
            "paadet_preset": self.preset.name,
            "paadet_input_size": size,
            "paadet_batch": str(self.batch) if self.batch else "dynamic",
            "paadet_precision": self.precision,
            "paadet_score_voting": str(self.score_voting).lower(),
            "paadet_classes": json.dumps(list(self.classes.names)),
        }

    @classmethod
    def from_metadata(cls, props: dict[str, str], path: str) -> ExportInfo:
        """Parse the ``paadet`` key of ``props`` (a model's metadata); ``path`` is for error messages."""
        if METADATA_KEY not in props:
            raise ExportFormatError(
                f"{path}: not a paadet export (no '{METADATA_KEY}' metadata); make one with `paadet export`"
            )
        try:
            data = json.loads(props[METADATA_KEY])
            fmt = int(data.pop("format"))
            if fmt > FORMAT_VERSION:
                raise ExportFormatError(
                    f"{path}: paadet export format {fmt} is newer than this paadet reads ({FORMAT_VERSION}); "
                    "upgrade paadet"
                )
            p = data.pop("preset")
            preset = Preset(
                name=str(p["name"]),
                scale=tuple(p["scale"]),
                size_divisor=p["size_divisor"],
                fixed_size=tuple(p["fixed_size"]) if p["fixed_size"] else None,
            )
            size = data.pop("input_size")
            classes = ClassList.from_meta({"dataset_meta": data.pop("classes", None)})
            depth = int(data.pop("depth", 50))
            return cls(preset=preset, input_size=tuple(size) if size else None, classes=classes, depth=depth, **data)
        except ExportFormatError:
            raise
        except (ValueError, KeyError, TypeError, RecursionError) as exc:
            reason = "nested too deeply" if isinstance(exc, RecursionError) else f"{type(exc).__name__}: {exc}"
            raise ExportFormatError(f"{path}: malformed paadet metadata ({reason}); re-export it") from None

    def describe(self) -> str:
        """One line: ``PAA R50-FPN, full fp32 graph, preset 800, input 800x800, batch 1, score voting on``."""
        size = "x".join(map(str, self.input_size)) if self.input_size else "dynamic"
        batch = self.batch if self.batch else "dynamic"
        text = f"{self.architecture}, {self.graph} {self.precision} graph, preset {self.preset.name}, input {size}"
        text += f", batch {batch}"
        if self.graph == "full":
            text += f", score voting {'on' if self.score_voting else 'off'}"
        return text


def same_preset(a: Preset, b: Preset) -> bool:
    """Whether two presets size images identically (names aside)."""
    return (tuple(a.scale), a.size_divisor, a.fixed_size and tuple(a.fixed_size)) == (
        tuple(b.scale),
        b.size_divisor,
        b.fixed_size and tuple(b.fixed_size),
    )


def load_export(path: str | os.PathLike, load_external_data: bool = True):
    """``(onnx.ModelProto, ExportInfo)`` of a ``paadet export`` graph file, read once, without running it.

    Raises:
        ExportFormatError: a missing file, one that is not an ONNX model, or not a paadet export.
    """
    import onnx

    if not Path(path).is_file():
        raise ExportFormatError(f"{path}: ONNX model file not found")
    try:
        proto = onnx.load(os.fspath(path), load_external_data=load_external_data)
    except Exception as exc:  # onnx raises DecodeError and others for a file that is not a model
        raise ExportFormatError(f"{path}: cannot be read as an ONNX model ({type(exc).__name__})") from exc
    return proto, ExportInfo.from_metadata({p.key: p.value for p in proto.metadata_props}, os.fspath(path))


def read_export_info(path: str | os.PathLike) -> ExportInfo:
    """The :class:`ExportInfo` of a ``paadet export`` graph file, read without running it.

    Raises:
        ExportFormatError: a missing file, one that is not an ONNX model, or not a paadet export.
    """
    return load_export(path, load_external_data=False)[1]
