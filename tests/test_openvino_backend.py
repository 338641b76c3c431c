"""The OpenVINO backend: f32 detections equal ONNX Runtime's and the torch backend's on the same graph, bf16,
static graphs, IR files, bad models, the CLI.

Two small random-weight graphs are exported once for the module: a dynamic one (batch, height, width;
score voting inside) at a /32 preset of at most 96x128 and a static 64x64 one with batch 1.
"""

from __future__ import annotations

import json
import subprocess
import sys

import cv2
import numpy as np
import onnx
import openvino  # noqa: F401 (`.[test]` installs it: a missing OpenVINO fails here, it does not skip)
import pytest
import torch
from fixtures import run_cli_without_torch

from paadet.compare import MatchReport, match_detections
from paadet.data.synthetic import synthetic_image
from paadet.detector import Detector
from paadet.errors import PaadetError
from paadet.export import ExportFormatError, export_onnx
from paadet.model import PAANet
from paadet.model.seeded import seeded_net
from paadet.preprocess import Preset, resize
from paadet.runtime.onnxruntime_backend import OnnxRuntimeBackend
from paadet.runtime.openvino_backend import OpenVinoBackend, OpenVinoModelError, import_openvino, shared_core
from paadet.runtime.torch_backend import TorchBackend

DIV32 = Preset("div32", (128, 96), size_divisor=32)
FIXED = Preset("fixed64", (64, 64), size_divisor=None, fixed_size=(64, 64))
# 90x120 and 80x120 share the padded size 96x128 (one batch of 2); 128x96 and 64x100 pad to others
SIZES = [(90, 120), (80, 120), (128, 96), (64, 100)]


@pytest.fixture(scope="module")
def net() -> PAANet:
    torch.set_num_threads(2)
    return seeded_net(0)


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    return [synthetic_image(h, w, seed=i) for i, (h, w) in enumerate(SIZES)]


@pytest.fixture(scope="module")
def dynamic_graph(net, tmp_path_factory):
    path = tmp_path_factory.mktemp("ov") / "dynamic.onnx"
    export_onnx(net, path, DIV32, dynamic_batch=True, simplify=False, verify=False)
    return path


@pytest.fixture(scope="module")
def static_graph(net, tmp_path_factory):
    path = tmp_path_factory.mktemp("ov") / "static.onnx"
    export_onnx(net, path, FIXED, batch_size=1, simplify=False, verify=False)
    return path


@pytest.fixture(scope="module")
def ov_f32(dynamic_graph) -> OpenVinoBackend:
    return OpenVinoBackend.from_file(dynamic_graph, preset=DIV32)


def run(backend, images, batch_size=2):
    return Detector(backend, batch_size=batch_size, workers=0).predict(images)


def match(ref, ours, iou_thr=0.99, score_tol=1e-4) -> MatchReport:
    total = MatchReport()
    for r, o in zip(ref, ours, strict=False):
        total += match_detections(
            r.boxes, r.scores, r.labels, o.boxes, o.scores, o.labels, iou_thr=iou_thr, score_tol=score_tol
        )
    return total


def assert_parity(report: MatchReport, min_matched: float = 0.995, max_extra: float = 0.005) -> None:
    """The export issue's rule for fp32: >= 99.5% of the reference matched, <= 0.5% extra."""
    assert report.reference > 0
    assert report.matched_fraction >= min_matched, str(report)
    assert report.extra <= max_extra * report.reference, str(report)


def one_line_naming(exc: BaseException, path) -> str:
    text = str(exc)
    assert "\n" not in text and str(path) in text, text
    return text


def test_f32_equals_onnxruntime_and_torch(ov_f32, dynamic_graph, net, images):
    described = ov_f32.describe()
    assert (described["backend"], described["precision"], described["inference_precision"]) == (
        "openvino",
        "fp32",
        "f32",
    )
    assert described["batch"] == "dynamic" and described["shapes"] == "dynamic, compiled once"
    assert ov_f32.fixed_batch is None and ov_f32.preset == DIV32 and len(ov_f32.classes.names) == 80
    ours = run(ov_f32, images)
    ort = run(OnnxRuntimeBackend.from_file(dynamic_graph, providers=["CPUExecutionProvider"]), images)
    ref = run(TorchBackend(net, DIV32), images)
    assert_parity(match(ort, ours))
    assert_parity(match(ref, ours))
    # the same images one at a time (batch 1: new shapes for the once-compiled dynamic model)
    assert_parity(match(ours[2:], run(ov_f32, images[2:], batch_size=1)))


def test_bf16_runs_and_says_so(dynamic_graph, images):
    caps = shared_core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    if "BF16" not in caps:
        with pytest.raises(OpenVinoModelError) as err:
            OpenVinoBackend.from_file(dynamic_graph, precision="bf16")
        assert "bfloat16" in one_line_naming(err.value, dynamic_graph)
        return
    backend = OpenVinoBackend.from_file(dynamic_graph, precision="bf16")
    described = backend.describe()
    assert described["precision"] == "bf16" and described["inference_precision"] == "bf16"
    dets = run(backend, images[:2])
    assert len(dets) == 2 and all(np.isfinite(np.asarray(d.scores)).all() for d in dets)


def test_static_graph(static_graph, dynamic_graph, images):
    backend = OpenVinoBackend.from_file(static_graph)
    assert backend.fixed_batch == 1 and backend.preset == FIXED and backend.describe()["shapes"] == "static"
    resized, meta = resize(images[0], FIXED)
    ours = backend.infer([resized], [meta])
    ref = OnnxRuntimeBackend.from_file(static_graph, providers=["CPUExecutionProvider"]).infer([resized], [meta])
    n = int(ref.num_dets[0])
    assert int(ours.num_dets[0]) == n
    np.testing.assert_allclose(ours.scores[0, :n], ref.scores[0, :n], atol=1e-4)
    with pytest.raises(OpenVinoModelError) as err:
        backend.infer([resized] * 2, [meta] * 2)
    assert "static batch of 1" in one_line_naming(err.value, static_graph)
    with pytest.raises(OpenVinoModelError) as err:
        OpenVinoBackend.from_file(static_graph, preset="mmdet")
    assert "preset" in one_line_naming(err.value, static_graph)
    from paadet import DetectorSpec
    from paadet.detector import Detector

    with pytest.raises(ValueError, match="static batch of 1"):
        Detector.from_spec(DetectorSpec(backend="openvino", model=str(static_graph), batch_size=2))
    with pytest.raises(ValueError, match="--precision is for --backend openvino"):
        Detector.from_spec(DetectorSpec(backend="onnxruntime", model=str(dynamic_graph), precision="bf16"))


def test_ir_file_and_shape_cache(ov_f32, dynamic_graph, images, tmp_path):
    ov = import_openvino()
    xml = tmp_path / "dynamic.xml"
    ov.save_model(shared_core().read_model(str(dynamic_graph)), str(xml), compress_to_fp16=False)
    from_ir = OpenVinoBackend.from_file(xml, shape_cache=2)
    assert from_ir.preset == DIV32 and from_ir.describe()["shapes"] == "compiled per input shape, 2 kept"
    from paadet import DetectorSpec
    from paadet.runtime.registry import model_classes

    assert model_classes(DetectorSpec(backend="openvino", model=str(xml))).names == ov_f32.classes.names
    assert_parity(match(run(ov_f32, images[:2]), run(from_ir, images[:2])))


def test_bad_models_are_one_line_errors(tmp_path):
    text = tmp_path / "notes.onnx"
    text.write_text("this is not a model\nsecond line\n")
    with pytest.raises(ExportFormatError) as err:
        OpenVinoBackend.from_file(text)
    assert "cannot be read" in one_line_naming(err.value, text)
    other = tmp_path / "other.onnx"
    node = onnx.helper.make_node("Relu", ["x"], ["y"])
    graph = onnx.helper.make_graph(
        [node],
        "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
    )
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]), str(other))
    with pytest.raises(ExportFormatError) as err:
        OpenVinoBackend.from_file(other)
    assert "not a paadet export" in one_line_naming(err.value, other)
    not_ir = tmp_path / "model.xml"
    not_ir.write_text("<net>broken\n")
    with pytest.raises(ExportFormatError) as err:
        OpenVinoBackend.from_file(not_ir)
    assert "cannot be read as an OpenVINO IR" in one_line_naming(err.value, not_ir)
    missing = tmp_path / "missing.onnx"
    with pytest.raises(ExportFormatError) as err:
        OpenVinoBackend.from_file(missing)
    one_line_naming(err.value, missing)


def test_missing_runtime_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # `import openvino` now raises ImportError
    with pytest.raises(PaadetError) as err:
        import_openvino()
    text = str(err.value)
    assert "\n" not in text and 'pip install "paadet[openvino]"' in text


def test_cli_predict(dynamic_graph, tmp_path, capsys):
    from paadet.cli import main

    img = tmp_path / "000000000042.png"
    cv2.imwrite(str(img), synthetic_image(90, 120, seed=0))
    out = tmp_path / "r.json"
    rc = main(
        [
            "predict",
            str(img),
            "--backend",
            "openvino",
            "--model",
            str(dynamic_graph),
            "--precision",
            "f32",
            "--output",
            str(out),
        ]
    )
    first = capsys.readouterr()
    assert rc == 0, first.err
    entries = json.loads(out.read_text())
    assert entries and {e["image_id"] for e in entries} == {42}
    bad = tmp_path / "bad.onnx"
    bad.write_text("not a model")
    rc = main(["predict", str(img), "--backend", "openvino", "--model", str(bad), "--output", str(tmp_path / "x.json")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and str(bad) in err


def test_bench(dynamic_graph):
    from paadet import DetectorSpec
    from paadet.bench import BenchTiming, run_benchmark

    report = run_benchmark(
        DetectorSpec(backend="openvino", model=str(dynamic_graph), device=None),
        BenchTiming(warmup=0, iters=1, skip_engine=True),
    )
    assert (report["backend"], report["device"], report["precision"], report["preset"]) == (
        "openvino",
        "cpu",
        "fp32",
        "div32",
    )
    assert report["e2e"]["images"] == 1 and report["versions"]["openvino"]


def test_predict_on_openvino_imports_no_torch(dynamic_graph, images, tmp_path):
    """`paadet predict --backend openvino` on a full exported graph runs without importing torch (about 1 s of
    start-up), with the detections of this (torch-importing) process; ONNX Runtime's twin is in test_export.py."""
    folder = tmp_path / "images"
    folder.mkdir()
    for i, image in enumerate(images[:2]):
        cv2.imwrite(str(folder / f"{i}.png"), image)
    out = tmp_path / "r.json"
    run_cli_without_torch(
        [
            "predict",
            str(folder),
            "--backend",
            "openvino",
            "--model",
            str(dynamic_graph),
            "--output",
            str(out),
            "--no-progress",
        ]
    )
    expected = run(OpenVinoBackend.from_file(dynamic_graph), [str(folder / "0.png"), str(folder / "1.png")])
    assert len(json.loads(out.read_text())) == sum(len(r.scores) for r in expected) > 0


def test_streams_run_batches_at_once_with_the_same_detections(ov_f32, dynamic_graph, images, capsys):
    import threading

    two = OpenVinoBackend.from_file(dynamic_graph, preset=DIV32, streams=2, threads=2)
    assert two.concurrency == 2 and two.describe()["streams"] == 2 and "streams" not in ov_f32.describe()
    compiled, requests = two._compiled[()]
    assert int(compiled.get_property("NUM_STREAMS")) == 2 and requests.qsize() == 2
    # through the Detector (two batches in flight): one stream's detections
    assert_parity(match(run(ov_f32, images, batch_size=1), run(two, images, batch_size=1)))
    resized = [resize(image, DIV32) for image in images[:2]]
    alone = [two.infer([r], [m]) for r, m in resized]
    # two threads at once: each request waits at a barrier inside infer, so this fails unless both run together
    barrier = threading.Barrier(2, timeout=10)

    class Meeting:
        def __init__(self, request) -> None:
            self.request = request

        def infer(self, feeds):
            barrier.wait()
            return self.request.infer(feeds)

        def get_output_tensor(self, i):
            return self.request.get_output_tensor(i)

    real = [requests.get(), requests.get()]
    for request in real:
        requests.put(Meeting(request))
    together: list = [None, None]

    def infer(i: int) -> None:
        together[i] = two.infer([resized[i][0]], [resized[i][1]])

    threads = [threading.Thread(target=infer, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not barrier.broken
    for a, b in zip(alone, together, strict=False):
        np.testing.assert_array_equal(a.num_dets, b.num_dets)
        np.testing.assert_array_equal(a.scores, b.scores)
    # a shape cache with streams: static copies compiled (and evicted) while requests are in use
    cached = OpenVinoBackend.from_file(dynamic_graph, preset=DIV32, streams=2, threads=2, shape_cache=1)
    assert_parity(match(run(ov_f32, images, batch_size=1), run(cached, images, batch_size=1)))
    from paadet import DetectorSpec
    from paadet.cli import main
    from paadet.detector import Detector

    with pytest.raises(ValueError, match="--streams is for --backend openvino"):
        Detector.from_spec(DetectorSpec(backend="onnxruntime", model=str(dynamic_graph), streams=2))
    with pytest.raises(ValueError, match="streams"):
        OpenVinoBackend.from_file(dynamic_graph, streams=0)
    capsys.readouterr()
    assert main(["serve", "--backend", "openvino", "--model", str(dynamic_graph), "--streams", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--streams is for predict, eval and batch" in err


SIGNAL_AFTER_TWO_BACKENDS = """
import gc, os, signal, sys
from paadet.runtime.openvino_backend import OpenVinoBackend
first = OpenVinoBackend.from_file(sys.argv[1])
second = OpenVinoBackend.from_file(sys.argv[1])
del first  # freed before the one made after it
gc.collect()
del second
gc.collect()
handled = []
signal.signal(signal.SIGUSR1, lambda signum, frame: handled.append(signum))
os.kill(os.getpid(), signal.SIGUSR1)  # a Python handler runs on the thread's alternate signal stack
print("handled", len(handled))
"""


def test_backends_freed_in_any_order_leave_signals_working(dynamic_graph):
    """OpenVINO's CPU plugin gives the loading thread an alternate signal stack per ``Core`` and, when freed,
    restores the one it found; two backends with their own ``Core`` freed first-made-first left the stack on
    unmapped memory, and the next handled signal (Ctrl-C, SIGTERM, a child's exit) was a SIGSEGV. paadet keeps
    one ``Core`` for the process (``shared_core``)."""
    done = subprocess.run(
        [sys.executable, "-c", SIGNAL_AFTER_TWO_BACKENDS, str(dynamic_graph)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, f"exit {done.returncode}: {done.stderr[-2000:]}"
    assert done.stdout.split() == ["handled", "1"]
