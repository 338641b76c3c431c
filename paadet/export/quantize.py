"""Post-training INT8 quantisation of a ``paadet export`` graph: ``paadet quantize``.

The input is a full fp32 graph (uint8 pixels in, detections out); the output is the same graph in ONNX's
QDQ form (``QuantizeLinear`` / ``DequantizeLinear`` pairs around the network's convolutions), which ONNX
Runtime runs with its int8 kernels and OpenVINO with its own (it turns each pair into a ``FakeQuantize``
and fuses it into an int8 convolution). One file runs on both (``--backend onnxruntime`` or ``openvino``).

What stays in float32, and why:

* **everything outside the network** (the ``/net/`` nodes of the export): the in-graph normalisation,
  anchors, decoding, top-k, NMS and score voting. They are cheap next to the convolutions, and box
  coordinates and IoU thresholds in int8 would move detections for nothing;
* **the network's outputs**: the head's last convolutions (class logits, box deltas and their scales, IoU
  logits) hand float32 to the post-processing. NNCF wraps only convolution inputs and weights (weights per
  output channel, symmetric int8; activations per tensor); ONNX Runtime's quantiser also wraps convolution
  outputs, so between two convolutions GroupNorm and ReLU see int8-rounded values, and a post-pass removes
  the pairs on every convolution output that reaches no other convolution.

Two quantisers (``method``):

* ``nncf`` (default): NNCF's post-training quantisation (min-max ranges over the calibration images, the
  ``performance`` preset: symmetric activations, then its fast bias correction). Measured best here: on
  the stand-in it keeps the AP within the target with the faster model (docs/benchmarks.md).
* ``ort``: ONNX Runtime's ``quantize_static`` (QDQ, per-channel int8 weights, uint8 activations, min-max).

Calibration images come from ``calib`` (a folder, searched as ``paadet predict`` searches one), resized by
the graph's preset exactly as inference resizes them; at most ``max_images`` (evenly spread over the sorted
list when there are more). Unreadable files are skipped and reported; at least one image must be readable.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from paadet.errors import PaadetError, one_line
from paadet.fileio import atomic_write_bytes, check_output_file, writing
from paadet.runtime.graph_info import METADATA_KEY, ExportFormatError, load_export

METHODS = ("nncf", "ort")
DEFAULT_MAX_IMAGES = 300
NETWORK_PREFIX = "/net/"
"""Node-name prefix of the network inside a paadet export (``PAAGraph.net``); all other nodes stay fp32."""
QUANTIZATION_KEY = "paadet_quantization"
INSTALL_HINT = {"nncf": 'pip install "paadet[quantize]"', "ort": "pip install onnxruntime"}


class QuantizeError(PaadetError):
    """Bad input to ``paadet quantize`` (model, calibration folder, output, method); names the file."""


@dataclass
class QuantizeReport:
    """What ``quantize_export`` did."""

    output: str
    source: str
    method: str
    calibration_images: int
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, reason)
    quantized_convolutions: int = 0
    convolutions: int = 0
    float_nodes: int = 0
    seconds: float = 0.0
    size_bytes: int = 0

    def __str__(self) -> str:
        lines = [
            f"wrote {self.output} ({self.size_bytes / 2**20:.1f} MiB): int8 QDQ graph by {self.method}, "
            f"{self.quantized_convolutions} of {self.convolutions} convolutions in int8, "
            f"{self.float_nodes} post-processing nodes left in float32",
            f"calibrated on {self.calibration_images} image{'s' if self.calibration_images != 1 else ''} "
            f"in {self.seconds:.1f} s" + (f"; skipped {len(self.skipped)} unreadable" if self.skipped else ""),
        ]
        lines += [f"  skipped {name}: {reason}" for name, reason in self.skipped]
        return "\n".join(lines)


def _import(method: str, verbose: bool = False):
    try:
        if method == "nncf":
            import nncf

            # NNCF sets its own logger to INFO on import and logs a line per node it leaves in float (hundreds)
            nncf.set_log_level(logging.INFO if verbose else logging.WARNING)
            return nncf
        from onnxruntime import quantization

        return quantization
    except ImportError as exc:
        raise QuantizeError(
            f"--method {method} needs a package that is not installed ({one_line(exc)}); "
            f"install it with: {INSTALL_HINT[method]}"
        ) from None


def split_nodes(model) -> tuple[list[str], list[str]]:
    """``(network node names, other node names)`` of an exported ONNX graph (the ``/net/`` prefix)."""
    network, other = [], []
    for node in model.graph.node:
        (network if node.name.startswith(NETWORK_PREFIX) else other).append(node.name)
    return network, other


def calibration_files(calib: str | os.PathLike, max_images: int) -> list:
    """The images of ``calib`` to calibrate on: all of them, or ``max_images`` evenly spread over the sorted list.

    Raises:
        QuantizeError: ``calib`` is not a folder, or holds no image files.
    """
    from paadet.data.images import list_images

    if not Path(calib).is_dir():
        raise QuantizeError(f"{calib}: --calib must be a folder of images")
    sources = list_images(calib)
    if not sources:
        raise QuantizeError(f"{calib}: no image files in the calibration folder")
    if len(sources) > max_images:
        step = len(sources) / max_images
        sources = [sources[int(i * step)] for i in range(max_images)]
    return sources


def calibration_layout(model, info, path: str):
    """The graph's input layout (preset, batch, fixed size, input names) without a runtime session: an
    :class:`~paadet.runtime.exported_graph.ExportedGraphBackend` whose ``feeds`` are the ones inference builds."""
    from paadet.runtime.exported_graph import ExportedGraphBackend

    layout = ExportedGraphBackend(info, path)
    weights = {t.name for t in model.graph.initializer}
    layout.input_names = [i.name for i in model.graph.input if i.name not in weights]
    return layout


def _read_calibration(backend, sources: list, progress: bool) -> tuple[list[dict], int, list[tuple[str, str]]]:
    """The graph's feeds for the usable images (padded as inference pads them), how many images, skipped files.

    A dynamic-batch graph gets one image per feed. A static batch ``B`` gets full batches of images of one
    padded size (a last partial batch repeats its own images), never blank rows, which would skew the ranges.
    """
    from tqdm import tqdm

    from paadet.data.images import ImageReadError, read_image
    from paadet.preprocess import resize

    by_shape: dict[tuple[int, int], list] = {}
    used, skipped = 0, []
    for source in tqdm(
        sources, desc="calibration images", unit="img", disable=not progress, file=sys.stderr, dynamic_ncols=True
    ):
        try:
            if source.error is not None:
                raise ImageReadError(f"{source.file_name}: {source.error}")
            image, meta = resize(read_image(source.path), backend.preset)
            backend.input_shape_for([meta])  # refuses an image that does not fit a fixed-size graph
        except (PaadetError, OSError) as exc:
            skipped.append((source.file_name, one_line(exc)))
            continue
        by_shape.setdefault(tuple(meta.pad_shape), []).append((image, meta))
        used += 1
    rows = backend.fixed_batch or 1
    feeds = []
    for group in by_shape.values():
        for start in range(0, len(group), rows):
            chunk = group[start : start + rows]
            chunk += [chunk[i % len(chunk)] for i in range(rows - len(chunk))]
            feeds.append(backend.feeds([c[0] for c in chunk], [c[1] for c in chunk]))
    return feeds, used, skipped


def _nncf_quantize(model, feeds: list[dict], float_nodes: list[str]):
    nncf = _import("nncf")
    return nncf.quantize(
        model,
        nncf.Dataset(feeds),
        preset=nncf.QuantizationPreset.PERFORMANCE,
        target_device=nncf.TargetDevice.CPU,
        subset_size=len(feeds),
        fast_bias_correction=True,
        ignored_scope=nncf.IgnoredScope(names=float_nodes, validate=False),
    )


def _ort_quantize(model, feeds: list[dict], float_nodes: list[str]):
    """ONNX Runtime's quantiser on a copy of ``model`` in a temporary folder (it writes files beside its input)."""
    import onnx

    q = _import("ort")

    class Reader(q.CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter(feeds)

        def get_next(self):
            return next(self.items, None)

    hint = "ONNX Runtime's quantiser writes its temporary files there; set TMPDIR to a folder with space"
    with tempfile.TemporaryDirectory(prefix="paadet-quantize-") as workdir, writing(workdir, hint):
        source, out = os.path.join(workdir, "fp32.onnx"), os.path.join(workdir, "ort_int8.onnx")
        onnx.save(model, source)
        q.quantize_static(
            source,
            out,
            Reader(),
            quant_format=q.QuantFormat.QDQ,
            per_channel=True,
            activation_type=q.QuantType.QUInt8,
            weight_type=q.QuantType.QInt8,
            calibrate_method=q.CalibrationMethod.MinMax,
            nodes_to_exclude=float_nodes,
            op_types_to_quantize=["Conv"],
        )
        return onnx.load(out)


def quantize_export(
    model_path: str | os.PathLike,
    calib: str | os.PathLike,
    output: str | os.PathLike,
    *,
    method: str = "nncf",
    max_images: int = DEFAULT_MAX_IMAGES,
    progress: bool = True,
    verbose: bool = False,
) -> QuantizeReport:
    """Quantise the network of a full fp32 ``paadet export`` graph to int8, calibrated on ``calib``'s images.

    Args:
        model_path: the fp32 ``.onnx`` of ``paadet export`` (full graph, any preset, batch and size).
        calib: a folder of calibration images (the user's own, a few hundred at most).
        output: the ``.onnx`` to write (atomically; never one of the inputs).
        method: ``nncf`` or ``ort`` (see the module docstring).
        max_images: calibrate on at most this many images.
        progress: show a progress bar while reading the images.
        verbose: let NNCF log at INFO level (a line per node it leaves in float); warnings only otherwise.

    Raises:
        QuantizeError / ExportFormatError / OutputPathError: bad input, each in one line, before any long work.
        OutputWriteError: ``output`` (or, with ``ort``, a temporary file) could not be written (a full disk);
            one line naming it, and no partial ``output`` is left.
    """
    start = time.perf_counter()
    if method not in METHODS:
        raise QuantizeError(f"unknown --method {method!r}; use {' or '.join(METHODS)}")
    if max_images < 1:
        raise QuantizeError(f"--max-images must be >= 1, got {max_images}")
    model_path, output = os.fspath(model_path), Path(output)
    if model_path.lower().endswith(".xml"):
        raise QuantizeError(f"{model_path}: an OpenVINO IR; quantize takes the .onnx written by `paadet export`")
    if output.suffix.lower() != ".onnx":
        raise QuantizeError(f"{output}: --output must be an .onnx file")
    check_output_file(output, "--output", inputs=[model_path])
    model, info = load_export(model_path)
    if info.graph != "full":
        raise QuantizeError(
            f"{model_path}: a {info.graph} graph; quantize takes a full graph (`paadet export` without --raw)"
        )
    if info.precision != "fp32":
        raise QuantizeError(
            f"{model_path}: the graph is {info.precision}; quantize takes an fp32 export "
            "(`paadet export` without --fp16)"
        )
    _import(method, verbose)
    sources = calibration_files(calib, max_images)
    network, float_nodes = split_nodes(model)
    if not network:
        raise ExportFormatError(f"{model_path}: no '{NETWORK_PREFIX}' nodes; re-export it with this paadet")
    feeds, used, skipped = _read_calibration(calibration_layout(model, info, model_path), sources, progress)
    if not feeds:
        raise QuantizeError(f"{calib}: none of the {len(sources)} calibration images could be used")
    quantized = (_nncf_quantize if method == "nncf" else _ort_quantize)(model, feeds, float_nodes)
    _float_into_postprocessing(quantized)
    _write_metadata(quantized, model, method, used)
    data = quantized.SerializeToString()
    atomic_write_bytes(output, data)
    convs = [n for n in quantized.graph.node if n.op_type == "Conv"]
    dequantized = {o for n in quantized.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    n_int8 = sum(1 for n in convs if n.input[0] in dequantized and n.input[1] in dequantized)
    return QuantizeReport(
        output=os.fspath(output),
        source=model_path,
        method=method,
        calibration_images=used,
        skipped=skipped,
        quantized_convolutions=n_int8,
        convolutions=len(convs),
        float_nodes=len(float_nodes),
        seconds=time.perf_counter() - start,
        size_bytes=len(data),
    )


def _float_into_postprocessing(model) -> None:
    """Hand the post-processing the network's float outputs where a quantiser rounded them.

    ONNX Runtime's quantiser puts a Q/DQ pair on every convolution output; on the head's last convolutions
    that rounds the class logits, the box deltas (before their ``Scale``) and the IoU logits to 8 bits. Every
    Q/DQ pair on a convolution output that reaches no other convolution, and every one read directly by a
    node outside the network, is bypassed: its readers get the float tensor before the ``QuantizeLinear``.
    The pairs, scales and zero points left unread are then removed.
    """
    nodes = list(model.graph.node)
    producer = {o: n for n in nodes for o in n.output}
    readers: dict[str, list] = {}
    for n in nodes:
        for name in n.input:
            readers.setdefault(name, []).append(n)
    reaches_conv: set[str] = set()  # tensors from which a convolution's data input can be reached
    stack = [n.input[0] for n in nodes if n.op_type == "Conv"]
    while stack:
        name = stack.pop()
        if name in reaches_conv:
            continue
        reaches_conv.add(name)
        if name in producer:
            stack.extend(producer[name].input)
    for q in nodes:
        if q.op_type != "QuantizeLinear":
            continue
        source = producer.get(q.input[0])
        for dq in readers.get(q.output[0], []):
            if dq.op_type != "DequantizeLinear":
                continue
            head_output = source is not None and source.op_type == "Conv" and dq.output[0] not in reaches_conv
            for reader in readers.get(dq.output[0], []):
                if head_output or not reader.name.startswith(NETWORK_PREFIX):
                    for i, name in enumerate(reader.input):
                        if name == dq.output[0]:
                            reader.input[i] = q.input[0]
    graph_outputs = {o.name for o in model.graph.output}
    while True:  # drop Q/DQ nodes nobody reads any more
        used = {i for n in model.graph.node for i in n.input} | graph_outputs
        dead = [
            n
            for n in model.graph.node
            if n.op_type in ("QuantizeLinear", "DequantizeLinear") and not any(o in used for o in n.output)
        ]
        if not dead:
            break
        for n in dead:
            model.graph.node.remove(n)
    used = {i for n in model.graph.node for i in n.input}
    for init in [t for t in model.graph.initializer if t.name not in used]:
        model.graph.initializer.remove(init)
    produced = {o for n in model.graph.node for o in n.output}
    for info in [v for v in model.graph.value_info if v.name not in produced]:
        model.graph.value_info.remove(info)


def _write_metadata(quantized, source, method: str, images: int) -> None:
    """The source's paadet metadata with precision ``int8``, plus how it was quantised."""
    from paadet.version import __version__

    props = {p.key: p.value for p in source.metadata_props}
    data = json.loads(props[METADATA_KEY])
    data["precision"] = "int8"
    props[METADATA_KEY] = json.dumps(data, sort_keys=True)
    props["paadet_precision"] = "int8"
    props[QUANTIZATION_KEY] = json.dumps(
        {
            "method": method,
            "calibration_images": images,
            "paadet_version": __version__,
            "float32": "everything outside the network (/net/ nodes)",
        }
    )
    quantized.doc_string = (
        f"paadet int8 graph ({method} post-training quantisation of the network, "
        f"{images} calibration images; post-processing in float32)"
    )
    del quantized.metadata_props[:]
    for key, value in props.items():
        entry = quantized.metadata_props.add()
        entry.key, entry.value = key, value
