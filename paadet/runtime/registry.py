"""The backend registry: how each backend is opened and built from a :class:`~paadet.runtime.spec.DetectorSpec`.

Two steps, so that a command reads a model's file once and can check its inputs against it before the
network is built:

* :func:`open_model` reads what the weights file says about itself (for the torch backend the checkpoint, for
  a graph backend the export's metadata, read by the runtime's own session): the classes, the preset it
  records, its static batch. It raises one line naming the file when the file cannot be used.
* :func:`build_backend` builds the runtime from the spec and that opened file, refusing what the file cannot
  honour (``--fp16`` on an fp32 graph, a batch beyond its static one...).

Every backend is named here once (:data:`BACKENDS`); the rules on which options go together are
:mod:`paadet.runtime.spec`'s. The backends' modules are imported on first use, so that opening a graph for
ONNX Runtime or OpenVINO imports no torch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from paadet.classes import ClassList
from paadet.preprocess import Preset, get_preset
from paadet.runtime.spec import ONNXRUNTIME, OPENVINO, TITLES, TORCH, DetectorSpec, device_type, normalize_precision
from paadet.zoo import find_model

if TYPE_CHECKING:
    from paadet.checkpoint import Checkpoint
    from paadet.model.paa import PAANet
    from paadet.runtime.base import Backend
    from paadet.runtime.graph_info import ExportInfo


@dataclass
class OpenedModel:
    """A model's file, read once: what it says about itself, and what the builder needs of it.

    Attributes:
        spec: the spec it was opened for.
        path: the weights file (the official checkpoint's cached file when the spec names none).
        classes: the classes it predicts.
        preset: the preset it records (a trained checkpoint's input scale, a graph's preset), or None.
        batch: a graph's static batch, or None.
        checkpoint: the torch backend's checkpoint contents (None for a graph).
        info: a graph's metadata (None for a checkpoint).
        backend: a graph's runtime, opened with it (its session reads the metadata: the file is parsed once).
    """

    spec: DetectorSpec
    path: Path
    classes: ClassList
    preset: Preset | None = None
    batch: int | None = None
    checkpoint: Checkpoint | None = None
    info: ExportInfo | None = None
    backend: Backend | None = None
    _sha256: str | None = field(default=None, repr=False)

    def sha256(self) -> str:
        """The file's SHA-256 (hashed on first use)."""
        if self._sha256 is None:
            from paadet.fileio import sha256_file

            self._sha256 = sha256_file(self.path)
        return self._sha256


@dataclass(frozen=True)
class BackendEntry:
    """One backend: its name, what it is called, how it is installed, and how it is opened and built."""

    name: str
    install: str | None
    open: Callable[[DetectorSpec], OpenedModel]
    build: Callable[[OpenedModel], Backend]

    @property
    def title(self) -> str:
        return TITLES[self.name]


# ---------------------------------------------------------------------------------------------- torch


def _open_checkpoint(spec: DetectorSpec) -> OpenedModel:
    from paadet.checkpoint import load_checkpoint
    from paadet.hub import resolve_checkpoint

    checkpoint = load_checkpoint(resolve_checkpoint(spec.checkpoint))
    return OpenedModel(spec, checkpoint.path, checkpoint.classes, preset=checkpoint.preset, checkpoint=checkpoint)


def _torch_preset(spec: DetectorSpec, recorded: Preset | None) -> Preset:
    """The torch backend's preset when ``--preset`` is not given: the checkpoint's training scale, else the default."""
    return recorded or get_preset(spec.default_preset)


def with_explicit_preset(spec: DetectorSpec) -> DetectorSpec:
    """``spec`` with the torch backend's default preset made explicit (a graph keeps None: the graph's own).

    The checkpoint file is read for the preset it records; the official checkpoint (``checkpoint`` None)
    records none. A run resumed with or without ``--preset`` is then the same run (``paadet batch``
    fingerprints the spec).
    """
    if spec.preset is not None or spec.uses_graph:
        return spec
    recorded = _open_checkpoint(spec).preset if spec.checkpoint is not None else None
    return spec.replace(preset=recorded or spec.default_preset)


def with_checkpoint_file(spec: DetectorSpec) -> DetectorSpec:
    """``spec`` with a model name in ``checkpoint`` (``paa_r101_fpn_ms-3x_coco``) replaced by its cached file,
    downloaded first if missing (:func:`paadet.hub.resolve_checkpoint`); any other spec unchanged.

    For the jobs that name the weights by their file: ``paadet batch`` hashes it and checks that every node
    runs the same one; ``paadet bench`` reports it (and exports it for a graph backend).
    """
    if spec.checkpoint is None or Path(spec.checkpoint).expanduser().is_file():
        return spec
    if find_model(spec.checkpoint) is None:
        return spec  # not a name: the missing file is reported where it is opened, as before
    from paadet.hub import resolve_checkpoint

    return spec.replace(checkpoint=str(resolve_checkpoint(spec.checkpoint)))


def torch_backend(net: PAANet, spec: DetectorSpec, preset: Preset) -> Backend:
    """The torch backend running ``net`` with ``spec``'s options (the CUDA ones resolved for its device), under
    test-time augmentation when ``spec.tta`` is set (:class:`~paadet.runtime.tta_backend.TTABackend`, whose
    views are based on ``preset``)."""
    from paadet.detections import PostprocessConfig
    from paadet.runtime.torch_backend import TorchBackend

    on_gpu = device_type(spec.device or "cpu") == "cuda"
    backend = TorchBackend(
        net,
        preset=preset,
        device=spec.device or "cpu",
        fp16=spec.fp16,
        postprocess=PostprocessConfig(score_voting=spec.score_voting),
        optimize=spec.optimize,
        bf16=spec.bf16,
        **spec.cuda.backend_kwargs(on_gpu),
    )
    if spec.tta is None:
        return backend
    from paadet.runtime.tta_backend import TTABackend

    return TTABackend(backend, spec.tta)


def _build_torch(opened: OpenedModel) -> Backend:
    from paadet.model.build import load_network

    spec = opened.spec
    preset = get_preset(spec.preset) if spec.preset is not None else _torch_preset(spec, opened.preset)
    return torch_backend(load_network(opened.checkpoint), spec, preset)


# ---------------------------------------------------------------------------------------------- graphs


def _graph_file(spec: DetectorSpec) -> Path:
    from paadet.runtime.graph_info import ExportFormatError

    if spec.model is None:
        raise ValueError(f"--backend {spec.backend} needs --model FILE.onnx (make one with `paadet export`)")
    path = Path(spec.model)
    if not path.is_file():
        raise ExportFormatError(
            f"{spec.model}: ONNX model file not found" if not path.exists() else f"{spec.model}: --model is not a file"
        )
    return path


def _opened_graph(spec: DetectorSpec, backend: Backend) -> OpenedModel:
    info = backend.info  # type: ignore[attr-defined]
    return OpenedModel(
        spec,
        Path(backend.path),
        info.classes,
        preset=info.preset,  # type: ignore[attr-defined]
        batch=info.batch,
        info=info,
        backend=backend,
    )


def _open_onnx(spec: DetectorSpec) -> OpenedModel:
    """A graph is opened by its runtime (which reads the metadata from its own session: the file is parsed once)."""
    from paadet.runtime.onnxruntime_backend import OnnxRuntimeBackend, parse_providers

    backend = OnnxRuntimeBackend.from_file(
        _graph_file(spec),
        providers=parse_providers(spec.providers),
        preset=get_preset(spec.preset) if spec.preset is not None else None,
    )
    return _opened_graph(spec, backend)


def _open_openvino(spec: DetectorSpec) -> OpenedModel:
    from paadet.runtime.openvino_backend import OpenVinoBackend

    backend = OpenVinoBackend.from_file(
        _graph_file(spec),
        preset=get_preset(spec.preset) if spec.preset is not None else None,
        precision=normalize_precision(spec.precision),
        streams=spec.streams or 1,
    )
    return _opened_graph(spec, backend)


def check_graph_against_spec(backend: Backend, spec: DetectorSpec) -> None:
    """Refuse what a graph cannot honour: ``--fp16`` on an fp32 graph, ``--no-score-voting`` on a graph with
    score voting inside, a batch beyond its static one (one line, naming the file)."""
    info, model = backend.info, spec.model  # type: ignore[attr-defined]
    if spec.fp16 and info.precision != "fp16":
        raise ValueError(
            f"--fp16 given but {model} is an {info.precision} graph; re-export it with `paadet export --fp16`"
        )
    if not spec.score_voting and info.graph == "full" and info.score_voting:
        raise ValueError(
            f"--no-score-voting given but {model} has score voting inside; "
            "re-export it with `paadet export --no-score-voting`"
        )
    fixed = backend.fixed_batch
    if spec.batch_size is not None and fixed is not None and spec.batch_size > fixed:
        raise ValueError(
            f"{model}: --batch-size {spec.batch_size} asked, but the graph has a static batch of "
            f"{fixed}; use --batch-size {fixed} or less, or re-export with `paadet export --dynamic-batch`"
        )


def _build_graph(opened: OpenedModel) -> Backend:
    check_graph_against_spec(opened.backend, opened.spec)
    return opened.backend


BACKENDS: dict[str, BackendEntry] = {
    TORCH: BackendEntry(TORCH, None, _open_checkpoint, _build_torch),
    ONNXRUNTIME: BackendEntry(ONNXRUNTIME, "pip install onnxruntime", _open_onnx, _build_graph),
    OPENVINO: BackendEntry(OPENVINO, 'pip install "paadet[openvino]"', _open_openvino, _build_graph),
}
"""Every backend, by name (the names are :data:`paadet.runtime.spec.BACKEND_NAMES`)."""


def backend_entry(name: str) -> BackendEntry:
    """The registry's entry for ``name``; ``ValueError`` naming the known ones otherwise."""
    try:
        return BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown backend {name!r}; use {', '.join(BACKENDS)}") from None


def open_model(spec: DetectorSpec) -> OpenedModel:
    """Validate ``spec`` and read its weights file once (see the module's docstring).

    Raises:
        ValueError: options that do not go together.
        PaadetError: a file that cannot be used (:class:`~paadet.checkpoint.CheckpointError`,
            :class:`~paadet.runtime.graph_info.ExportFormatError`), with a one-line message naming it.
    """
    spec.validate()
    return backend_entry(spec.backend).open(spec)


def build_backend(spec: DetectorSpec, opened: OpenedModel | None = None) -> Backend:
    """The runtime ``spec`` describes; ``opened`` is its file as :func:`open_model` read it (read here if None)."""
    if opened is None:
        opened = open_model(spec)
    elif opened.spec is not spec:
        opened = dataclasses.replace(opened, spec=spec)
    return backend_entry(spec.backend).build(opened)


def graph_info(spec: DetectorSpec) -> ExportInfo:
    """The metadata of the graph ``spec.model`` (an ``.onnx`` export, or an OpenVINO IR ``.xml`` saved from one), read
    without building a runtime."""
    from paadet.runtime.openvino_backend import read_export_info_any  # reads an .onnx without OpenVINO

    return read_export_info_any(_graph_file(spec))


def model_classes(spec: DetectorSpec) -> ClassList:
    """The classes of the model ``spec`` names, read from its file without building a runtime (a checkpoint's meta,
    a graph's metadata)."""
    spec.validate()
    return graph_info(spec).classes if spec.uses_graph else _open_checkpoint(spec).classes
