"""``paadet quantize``: an int8 QDQ graph whose network alone is quantised, runnable on OpenVINO and ONNX
Runtime, calibrated on a folder (bad files skipped and reported), and one-line errors before any long work.

One small random-weight graph (static 64x64, batch 1) is exported for the module; its quantised copies are
made once per method.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import cv2
import nncf  # noqa: F401 (`.[test]` installs nncf and openvino: missing ones fail here, they do not skip)
import onnx
import openvino  # noqa: F401
import pytest
import torch

from paadet.cli import main
from paadet.compare import MatchReport, match_detections
from paadet.data.synthetic import synthetic_image
from paadet.detector import Detector
from paadet.export import export_onnx
from paadet.export.quantize import NETWORK_PREFIX, QUANTIZATION_KEY, QuantizeError, quantize_export
from paadet.fileio import OutputPathError
from paadet.model import PAANet
from paadet.model.seeded import seeded_net
from paadet.preprocess import Preset
from paadet.runtime.graph_info import read_export_info
from paadet.runtime.onnxruntime_backend import OnnxRuntimeBackend
from paadet.runtime.openvino_backend import OpenVinoBackend

FIXED = Preset("fixed64", (64, 64), size_divisor=None, fixed_size=(64, 64))


@pytest.fixture(scope="module")
def net() -> PAANet:
    torch.set_num_threads(2)
    return seeded_net(2)  # "sparse" seeded weights: a few dozen confident candidates


@pytest.fixture(scope="module")
def graph(net, tmp_path_factory):
    path = tmp_path_factory.mktemp("q") / "fp32.onnx"
    export_onnx(net, path, FIXED, batch_size=1, simplify=False, verify=False)
    return path


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    folder = tmp_path_factory.mktemp("calib")
    for i in range(6):
        cv2.imwrite(str(folder / f"img{i}.jpg"), synthetic_image(64 + 8 * i, 80, seed=10 + i))
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    return folder


@pytest.fixture(scope="module")
def quantized(graph, calib, tmp_path_factory):
    out = {}
    for method in ("nncf", "ort"):
        path = tmp_path_factory.mktemp("q8") / f"int8_{method}.onnx"
        out[method] = (path, quantize_export(graph, calib, path, method=method, progress=False))
    return out


def consumers(model: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    found: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            found.setdefault(name, []).append(node)
    return found


@pytest.mark.parametrize("method", ["nncf", "ort"])
def test_only_the_network_is_quantised(quantized, method):
    path, report = quantized[method]
    model = onnx.load(path)
    uses = consumers(model)
    dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    assert dq, "no DequantizeLinear: nothing was quantised"
    for node in dq:  # every dequantised tensor feeds the network only: post-processing stays float32
        assert all(
            c.name.startswith(NETWORK_PREFIX) or c.op_type == "DequantizeLinear" for c in uses[node.output[0]]
        ), node.name
    assert report.convolutions == sum(n.op_type == "Conv" for n in model.graph.node) == 116
    assert report.quantized_convolutions >= 100
    assert report.float_nodes > 100
    assert path.stat().st_size == report.size_bytes


@pytest.mark.parametrize("method", ["nncf", "ort"])
def test_the_head_hands_float_outputs_to_the_postprocessing(quantized, method):
    """No Q/DQ pair between the head's last convolutions (logits, deltas and their scales, IoU logits) and
    the decoding: ONNX Runtime's quantiser puts one on every convolution output, and paadet removes those."""
    model = onnx.load(quantized[method][0])
    uses = consumers(model)
    heads = [n for n in model.graph.node if n.op_type == "Conv" and "/atss_" in n.name]
    assert len(heads) == 15
    for conv in heads:
        frontier, seen = [conv.output[0]], set()
        while frontier:  # everything downstream of the convolution inside the network
            name = frontier.pop()
            for node in uses.get(name, []):
                assert node.op_type != "QuantizeLinear", f"{conv.name} output rounded by {node.name}"
                if node.name.startswith(NETWORK_PREFIX) and node.name not in seen:
                    seen.add(node.name)
                    frontier.extend(node.output)
    used = {i for n in model.graph.node for i in n.input}
    assert all(t.name in used for t in model.graph.initializer)  # no scale or zero point left behind


def test_ort_method_writes_nothing_beside_the_input(graph, calib, tmp_path):
    before = sorted(p.name for p in graph.parent.iterdir())
    quantize_export(graph, calib, tmp_path / "o.onnx", method="ort", max_images=2, progress=False)
    assert sorted(p.name for p in graph.parent.iterdir()) == before


def test_static_batch_calibrates_on_full_batches(net, calib, tmp_path):
    """A graph with a static batch of 2 is calibrated on batches of real images, never blank rows."""
    from paadet.export.quantize import _read_calibration, calibration_files, calibration_layout
    from paadet.runtime.graph_info import load_export

    path = tmp_path / "b2.onnx"
    export_onnx(net, path, FIXED, batch_size=2, simplify=False, verify=False)
    layout = calibration_layout(*load_export(path), str(path))
    assert layout.input_names == [i.name for i in OnnxRuntimeBackend.from_file(path).session.get_inputs()]
    feeds, used, skipped = _read_calibration(layout, calibration_files(calib, 10), False)
    assert used == 6 and len(skipped) == 1 and len(feeds) == 3
    for feed in feeds:
        images = feed["images"]
        assert images.shape[0] == 2 and all(images[i].any() for i in range(2))


def test_dynamic_simplified_graph_quantises_and_runs(net, calib, tmp_path):
    """The README's recipe: a simplified graph with dynamic batch and size (a /32 preset), on OpenVINO."""
    div32 = Preset("div32", (96, 80), size_divisor=32)
    path, out = tmp_path / "dyn.onnx", tmp_path / "dyn_int8.onnx"
    export_onnx(net, path, div32, dynamic_batch=True, verify=False)
    report = quantize_export(path, calib, out, progress=False)
    assert report.quantized_convolutions >= 100 and read_export_info(out).input_size is None
    images = [synthetic_image(64, 80, seed=1), synthetic_image(80, 64, seed=2)]
    ref = _detections(OpenVinoBackend.from_file(path, preset=div32), images)
    ours = _detections(OpenVinoBackend.from_file(out, preset=div32), images)
    total = MatchReport()
    for r, o in zip(ref, ours, strict=False):
        total += match_detections(
            r.boxes[:10], r.scores[:10], r.labels[:10], o.boxes, o.scores, o.labels, iou_thr=0.7, score_tol=0.03
        )
    assert total.reference >= 8 and total.matched_fraction >= 0.8, total


def test_int8_weights_are_a_quarter_of_fp32(quantized, graph):
    path, _ = quantized["nncf"]
    assert path.stat().st_size < 0.4 * graph.stat().st_size


@pytest.mark.parametrize("method", ["nncf", "ort"])
def test_metadata_says_int8_and_how(quantized, graph, method):
    path, report = quantized[method]
    info, source = read_export_info(path), read_export_info(graph)
    assert info.precision == "int8" and source.precision == "fp32"
    assert (info.preset, info.input_size, info.batch, info.classes) == (
        source.preset,
        source.input_size,
        source.batch,
        source.classes,
    )
    props = {p.key: p.value for p in onnx.load(path, load_external_data=False).metadata_props}
    details = json.loads(props[QUANTIZATION_KEY])
    assert details["method"] == method and details["calibration_images"] == report.calibration_images == 6


def test_bad_calibration_file_is_skipped_and_reported(quantized):
    _, report = quantized["nncf"]
    assert [name for name, _ in report.skipped] == ["broken.jpg"]
    assert "broken.jpg" in str(report)


def _detections(backend, images):
    return Detector(backend, batch_size=1, workers=0).predict(images)


@pytest.mark.parametrize("runtime", ["openvino", "onnxruntime"])
def test_int8_graph_runs_and_keeps_the_best_detections(graph, quantized, runtime):
    images = [synthetic_image(64, 64, seed=s) for s in (1, 2, 3)]
    open_ = OpenVinoBackend.from_file if runtime == "openvino" else OnnxRuntimeBackend.from_file
    ref = _detections(open_(graph), images)
    ours = _detections(open_(quantized["nncf"][0]), images)
    total = MatchReport()
    for r, o in zip(ref, ours, strict=False):
        top = slice(0, 10)  # the 10 best fp32 detections (these weights give 6-8 per image above 0.05)
        total += match_detections(
            r.boxes[top], r.scores[top], r.labels[top], o.boxes, o.scores, o.labels, iou_thr=0.7, score_tol=0.03
        )
    assert total.reference >= 15
    assert total.matched_fraction >= 0.8, total
    assert all(len(o.scores) <= 100 for o in ours)


def test_refuses_bad_inputs_before_work(graph, calib, tmp_path, net):
    with pytest.raises(QuantizeError, match="must be a folder"):
        quantize_export(graph, tmp_path / "missing", tmp_path / "o.onnx")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(QuantizeError, match="no image files"):
        quantize_export(graph, empty, tmp_path / "o.onnx")
    with pytest.raises(QuantizeError, match=r"\.onnx file"):
        quantize_export(graph, calib, tmp_path / "o.xml")
    with pytest.raises(OutputPathError, match="one of the inputs"):
        quantize_export(graph, calib, graph)
    with pytest.raises(QuantizeError, match="unknown --method"):
        quantize_export(graph, calib, tmp_path / "o.onnx", method="tensorrt")
    fp16 = tmp_path / "fp16.onnx"
    export_onnx(net, fp16, FIXED, batch_size=1, fp16=True, simplify=False, verify=False)
    with pytest.raises(QuantizeError, match="graph is fp16"):
        quantize_export(fp16, calib, tmp_path / "o.onnx")
    raw = tmp_path / "raw.onnx"
    export_onnx(net, raw, FIXED, batch_size=1, raw=True, simplify=False, verify=False)
    with pytest.raises(QuantizeError, match="raw graph"):
        quantize_export(raw, calib, tmp_path / "o.onnx")
    with pytest.raises(QuantizeError, match="OpenVINO IR"):
        quantize_export(tmp_path / "m.xml", calib, tmp_path / "o.onnx")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.jpg").write_bytes(b"nope")
    with pytest.raises(QuantizeError, match="none of the 1 calibration images could be used"):
        quantize_export(graph, broken, tmp_path / "o.onnx", progress=False)
    assert not (tmp_path / "o.onnx").exists()


def test_cli_one_line_error_and_success(graph, calib, tmp_path, capsys):
    assert (
        main(
            ["quantize", "--model", str(graph), "--calib", str(tmp_path / "nope"), "--output", str(tmp_path / "o.onnx")]
        )
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "nope" in err and "folder" in err
    out = tmp_path / "cli_int8.onnx"
    assert (
        main(
            [
                "quantize",
                "--model",
                str(graph),
                "--calib",
                str(calib),
                "--output",
                str(out),
                "--max-images",
                "3",
                "--no-progress",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out  # 3 of the 7 sorted files, evenly spread: broken.jpg, img1.jpg, img3.jpg
    assert "calibrated on 2 images" in printed and "skipped 1 unreadable" in printed and "--backend openvino" in printed
    assert read_export_info(out).precision == "int8"


def test_cli_prints_a_short_summary(graph, calib, tmp_path):
    """A normal run is a progress bar or two and one summary: no NNCF log lines."""
    out = tmp_path / "quiet_int8.onnx"
    args = ["quantize", "--model", str(graph), "--calib", str(calib), "--output", str(out), "--max-images", "2"]
    done = subprocess.run([sys.executable, "-m", "paadet", *args], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    printed = (done.stdout + done.stderr).splitlines()
    assert len(printed) <= 20 and not any("INFO" in line for line in printed), printed
    assert any("in int8" in line for line in printed), printed


@pytest.mark.parametrize("verbose", [False, True])
def test_nncf_logs_info_only_when_verbose(graph, tmp_path, verbose):
    """NNCF sets its logger to INFO when imported (a line per node kept in float: hundreds on a full-size
    graph); quantize puts it back to warnings unless asked."""
    nncf_log = logging.getLogger("nncf")
    nncf_log.setLevel(logging.INFO)  # as `import nncf` leaves it
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(QuantizeError):  # stops at the empty folder, after NNCF is set up
        quantize_export(graph, empty, tmp_path / "o.onnx", verbose=verbose)
    assert nncf_log.level == (logging.INFO if verbose else logging.WARNING)
    nncf_log.setLevel(logging.WARNING)
