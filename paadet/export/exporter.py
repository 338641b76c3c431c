"""``export_onnx``: trace :class:`~paadet.export.graph.PAAGraph` to ONNX, check, simplify, verify, report."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import io
import os
import shlex
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from paadet.errors import one_line
from paadet.export.graph import PAAGraph, RawGraph
from paadet.export.sample import ExportError, sample_image
from paadet.fileio import atomic_write_bytes
from paadet.model import PAANet
from paadet.model.build import classes_of
from paadet.postprocess import PostprocessConfig
from paadet.preprocess import Preset, get_preset, normalize_pad
from paadet.runtime.graph_info import ExportInfo
from paadet.version import __version__

# The TorchScript-based exporter (the one that supports custom symbolics such as NonMaxSuppression)
# goes up to opset 20; ONNX Runtime >= 1.18 (paadet's minimum) runs opset 20 graphs.
DEFAULT_OPSET = 20
MIN_OPSET = 11
FULL_INPUTS = ("images", "img_shapes", "scale_factors")
FULL_OUTPUTS = ("boxes", "scores", "labels", "num_dets")
RAW_OUTPUTS = tuple(f"{kind}_{level}" for kind in ("cls", "box", "iou") for level in range(5))


@dataclass
class ExportReport:
    """What :func:`export_onnx` wrote and how it checked it.

    Attributes:
        path: the ONNX file.
        size_bytes: its size.
        info: the metadata written into it.
        inputs, outputs: ``(name, shape, dtype)`` per graph input / output (symbolic dims as names).
        simplifier: the simplifier applied (``onnxslim x.y``), or why none was.
        nodes: node count of the written graph.
        parity: one line comparing ONNX Runtime with PyTorch on a generated image, or None (not verified).
        parity_ok: whether that comparison met its thresholds.
        seconds: export wall time.
    """

    path: Path
    size_bytes: int
    info: ExportInfo
    inputs: list[tuple[str, list, str]]
    outputs: list[tuple[str, list, str]]
    simplifier: str
    nodes: int
    parity: str | None = None
    parity_ok: bool | None = None
    seconds: float = 0.0
    next_commands: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        def fmt(items: list[tuple[str, list, str]]) -> str:
            return "\n".join(f"    {n:<14} {dt:<8} [{', '.join(map(str, s))}]" for n, s, dt in items)

        lines = [
            f"paadet export: wrote {self.path} ({self.size_bytes / 2**20:.1f} MiB, {self.nodes} nodes, "
            f"opset {self.info.opset}, {self.seconds:.1f} s)",
            f"  {self.info.describe()}",
            f"  simplifier: {self.simplifier}",
            "  inputs:",
            fmt(self.inputs),
            "  outputs:",
            fmt(self.outputs),
        ]
        if self.parity is not None:
            lines.append(f"  ONNX Runtime vs PyTorch: {self.parity} [{'OK' if self.parity_ok else 'FAILED'}]")
        if self.next_commands:
            lines.append("  next:")
            lines += [f"    {c}" for c in self.next_commands]
        return "\n".join(lines)


def _load_network(net_or_checkpoint: PAANet | str | os.PathLike | None) -> tuple[PAANet, Preset | None]:
    """The network in eval mode, and the preset its checkpoint records (``meta.preset``; None if none)."""
    if isinstance(net_or_checkpoint, PAANet):
        return net_or_checkpoint.eval(), None
    from paadet.checkpoint import load_checkpoint
    from paadet.hub import resolve_checkpoint
    from paadet.model.build import load_network

    checkpoint = load_checkpoint(resolve_checkpoint(net_or_checkpoint))
    return load_network(checkpoint), checkpoint.preset


def _input_size(preset: Preset, input_size: tuple[int, int] | None) -> tuple[int, int] | None:
    """The graph's fixed ``(h, w)``, or None for dynamic; fixed-size presets are always static."""
    if input_size is None:
        return tuple(preset.fixed_size) if preset.fixed_size is not None else None
    h, w = int(input_size[0]), int(input_size[1])
    if preset.fixed_size is not None and (h, w) != tuple(preset.fixed_size):
        raise ExportError(
            f"preset {preset.name} pads to {preset.fixed_size[0]}x{preset.fixed_size[1]}; "
            f"--input-size {h}x{w} contradicts it"
        )
    if h <= 0 or w <= 0 or h % 32 or w % 32:
        raise ExportError(f"--input-size {h}x{w}: height and width must be positive multiples of 32")
    return h, w


def _example_inputs(preset: Preset, size: tuple[int, int] | None, batch: int, raw: bool) -> tuple[torch.Tensor, ...]:
    resized, meta = sample_image(preset, size)
    if raw:
        x = normalize_pad(torch.from_numpy(resized), meta.pad_shape)
        return (x[None].expand(batch, -1, -1, -1).contiguous(),)
    ph, pw = meta.pad_shape
    images = np.zeros((batch, ph, pw, 3), np.uint8)
    images[:, : resized.shape[0], : resized.shape[1]] = resized
    img_shapes = torch.tensor([meta.img_shape] * batch, dtype=torch.float32)
    scale_factors = torch.tensor([meta.scale_factor] * batch, dtype=torch.float32)
    return torch.from_numpy(images), img_shapes, scale_factors


def _dynamic_axes(raw: bool, dynamic_batch: bool, dynamic_size: bool) -> dict[str, dict[int, str]]:
    axes: dict[str, dict[int, str]] = {}
    if raw:
        first = {**({0: "batch"} if dynamic_batch else {}), **({2: "height", 3: "width"} if dynamic_size else {})}
        if first:
            axes["images"] = first
        for name in RAW_OUTPUTS:
            d = {
                **({0: "batch"} if dynamic_batch else {}),
                **({2: f"{name}_h", 3: f"{name}_w"} if dynamic_size else {}),
            }
            if d:
                axes[name] = d
        return axes
    if dynamic_size or dynamic_batch:
        axes["images"] = {
            **({0: "batch"} if dynamic_batch else {}),
            **({1: "height", 2: "width"} if dynamic_size else {}),
        }
    if dynamic_batch:
        for name in FULL_INPUTS[1:] + FULL_OUTPUTS:
            axes[name] = {0: "batch"}
    return axes


def _value_infos(values) -> list[tuple[str, list, str]]:
    import onnx

    out = []
    for v in values:
        t = v.type.tensor_type
        dims = [d.dim_param or d.dim_value for d in t.shape.dim]
        out.append((v.name, dims, onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name))
    return out


def _name_output_dims(model, batch: int | None, max_det: int) -> None:
    """Give the full graph's outputs their documented shapes (the tracer leaves generated names)."""
    shapes = {"boxes": [batch, max_det, 4], "scores": [batch, max_det], "labels": [batch, max_det], "num_dets": [batch]}
    for value in model.graph.output:
        dims = value.type.tensor_type.shape.dim
        for dim, size in zip(dims, shapes[value.name], strict=False):
            if size is None:
                dim.dim_param = "batch"
            else:
                dim.dim_value = size


def _simplify(model, enabled: bool):
    """Run onnxslim when installed and asked; keep its result only if it checks and is smaller."""
    import onnx

    if not enabled:
        return model, "off (--no-simplify)"
    try:
        import onnxslim
    except ImportError:
        return model, "none (pip install onnxslim to simplify; ONNX Runtime optimises at load anyway)"
    version = importlib.metadata.version("onnxslim")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            slim = onnxslim.slim(model)
        onnx.checker.check_model(slim)
    except Exception as exc:  # a simplifier failure must not fail the export
        return model, f"onnxslim {version} failed ({type(exc).__name__}), kept the unsimplified graph"
    before, after = len(model.graph.node), len(slim.graph.node)
    if after >= before:
        return model, f"onnxslim {version}: no gain ({before} nodes), kept the original"
    return slim, f"onnxslim {version}: {before} -> {after} nodes"


def export_onnx(
    net_or_checkpoint: PAANet | str | os.PathLike | None,
    output: str | os.PathLike,
    preset: str | Preset | None = "mmdet",
    batch_size: int = 1,
    dynamic_batch: bool = False,
    fp16: bool = False,
    raw: bool = False,
    opset: int | None = None,
    score_voting: bool = True,
    simplify: bool = True,
    verify: bool = True,
    input_size: tuple[int, int] | None = None,
    postprocess: PostprocessConfig | None = None,
) -> ExportReport:
    """Export PAA to ONNX.

    Args:
        net_or_checkpoint: a :class:`PAANet` with weights, a checkpoint path, or None for the official
            checkpoint (downloaded to the cache if missing).
        output: the ``.onnx`` file to write.
        preset: ``mmdet``, ``800`` or a :class:`Preset`; None: the checkpoint's ``meta.preset`` (the scale
            ``paadet train`` trained it at), else ``mmdet``. A preset with ``fixed_size`` gives a graph of
            that input size; otherwise the input height and width are dynamic unless ``input_size``.
        batch_size: the static batch (ignored with ``dynamic_batch``).
        dynamic_batch: make the batch dimension dynamic.
        fp16: half-precision network (GroupNorm, normalisation and post-processing in float32).
        raw: export only the network: ``images [N, 3, H, W]`` normalised float32 in, 15 maps out.
        opset: ONNX opset (default :data:`DEFAULT_OPSET`).
        score_voting: put score voting into the graph.
        simplify: run onnxslim when it is installed.
        verify: run the graph once with ONNX Runtime (CPU) against PyTorch on a generated image.
        input_size: fix the graph's ``(height, width)`` (multiples of 32) for a ``size_divisor`` preset.
        postprocess: post-processing thresholds (default: the reference config, with ``score_voting``).

    Returns:
        An :class:`ExportReport`; ``str(report)`` is the summary the CLI prints.

    Raises:
        ExportError: impossible settings, or an export that fails its checks.
        OutputWriteError: ``output`` could not be written (a full disk): one line naming it; the file is written
            atomically, so no partial graph is left.
    """
    import onnx

    start = time.perf_counter()
    opset = DEFAULT_OPSET if opset is None else int(opset)
    if not MIN_OPSET <= opset <= DEFAULT_OPSET:
        raise ExportError(f"--opset {opset}: paadet exports opsets {MIN_OPSET} to {DEFAULT_OPSET}")
    if not dynamic_batch and batch_size < 1:
        raise ExportError(f"--batch-size must be >= 1, got {batch_size}")
    if preset is not None:
        preset = get_preset(preset)
    net, trained_preset = _load_network(net_or_checkpoint)
    preset = preset or trained_preset or get_preset("mmdet")  # no preset asked for: the one it was trained at
    size = _input_size(preset, input_size)
    config = dataclasses.replace(postprocess or PostprocessConfig(), score_voting=score_voting)
    output = Path(output)

    module = RawGraph(net, fp16=fp16) if raw else PAAGraph(net, config, fp16=fp16)
    module.eval()
    trace_batch = 2 if dynamic_batch else batch_size
    args = _example_inputs(preset, size, trace_batch, raw)
    input_names = ["images"] if raw else list(FULL_INPUTS)
    output_names = list(RAW_OUTPUTS if raw else FULL_OUTPUTS)
    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                args,
                buffer,
                dynamo=False,
                opset_version=opset,
                input_names=input_names,
                output_names=output_names,
                dynamic_axes=_dynamic_axes(raw, dynamic_batch, size is None),
                do_constant_folding=True,
            )
    except Exception as exc:
        raise ExportError(f"ONNX export failed: {type(exc).__name__}: {one_line(exc)[:300]}") from exc
    model = onnx.load_from_string(buffer.getvalue())
    model, simplifier = _simplify(model, simplify)
    if not raw:
        _name_output_dims(model, batch_size if not dynamic_batch else None, config.max_per_img)

    info = ExportInfo(
        graph="raw" if raw else "full",
        preset=preset,
        input_size=size,
        batch=None if dynamic_batch else batch_size,
        precision="fp16" if fp16 else "fp32",
        score_voting=bool(score_voting and not raw),
        opset=opset,
        version=__version__,
        postprocess=dataclasses.asdict(config),
        classes=classes_of(net),
        depth=net.depth,
    )
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, info.metadata_props())
    model.producer_name = "paadet"
    model.producer_version = __version__
    model.doc_string = f"paadet {__version__}: {info.describe()}"
    try:
        onnx.checker.check_model(model, full_check=True)
        onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    except Exception as exc:
        raise ExportError(f"the exported graph fails onnx.checker: {one_line(exc)[:300]}") from exc
    atomic_write_bytes(output, model.SerializeToString())

    report = ExportReport(
        path=output,
        size_bytes=output.stat().st_size,
        info=info,
        inputs=_value_infos(model.graph.input),
        outputs=_value_infos(model.graph.output),
        simplifier=simplifier,
        nodes=len(model.graph.node),
    )
    if verify:
        from paadet.export.verify import verify_export

        report.parity, report.parity_ok = verify_export(output, net, preset, fp16=fp16, config=config)
    report.seconds = time.perf_counter() - start
    report.next_commands = next_commands(output)
    return report


def next_commands(path: Path) -> list[str]:
    """Commands that use the export, ultralytics-style; each runs as printed once IMAGE.jpg / the dataset exist.

    The preset and batch size are the graph's, which ``--backend onnxruntime`` takes by default. The graph
    viewer (``netron``) is suggested only when it is installed.
    """
    common = f"--backend onnxruntime --model {shlex.quote(str(path))}"
    commands = [
        f"paadet predict IMAGE.jpg {common} --output results.json",
        f"paadet eval --ann ANNOTATIONS.json --images IMAGES_DIR {common} --output-dir runs/onnx",
        f"paadet bench {common}",
        f'python -c "from paadet import Detector; from paadet.runtime.onnxruntime_backend import OnnxRuntimeBackend; '
        f"print(Detector(OnnxRuntimeBackend.from_file('{path}')).predict('IMAGE.jpg'))\"",
    ]
    if shutil.which("netron"):
        commands.append(f"netron {shlex.quote(str(path))}   # view the graph")
    return commands
