"""Every inference command on an R-101 checkpoint: predict, eval, export, quantize, bench, batch and serve.

One seeded R-101 file in mmdetection's layout (``meta`` + ``state_dict``; nothing says R-101 but its keys) records a
small training scale (``meta.preset``: 128x96, padded to /32), so each command runs at that size without flags.
The reference is :class:`~paadet.runtime.torch_backend.TorchBackend` on ``seeded_net(..., depth=101)``; one
export of the file is shared by the module (R-101's export is the slow step).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import cv2
import onnx
import pytest
import torch
from fixtures import write_train_fixture

from paadet import DetectorSpec
from paadet.checkpoint import CheckpointError
from paadet.cli import main
from paadet.compare import MatchReport, match_detections
from paadet.data.synthetic import synthetic_image
from paadet.detector import Detector
from paadet.model.build import load_network
from paadet.model.seeded import seeded_net, seeded_state_dict
from paadet.preprocess import Preset
from paadet.runtime.graph_info import read_export_info
from paadet.runtime.torch_backend import TorchBackend

SMALL = Preset("small", (128, 96), size_divisor=32)
WEIGHTS = (0, -8.0)  # "dense": many candidates even at 128x96
SIZES = [(96, 128), (120, 80), (64, 100)]


@pytest.fixture(scope="module")
def r101(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The checkpoint, three small images, and the reference detections of each (the seeded network, directly)."""
    root = tmp_path_factory.mktemp("r101")
    checkpoint = root / "paa_r101.pth"
    state = seeded_state_dict(WEIGHTS[0], cls_bias=WEIGHTS[1], depth=101)
    torch.save({"meta": {"mmdet_version": "3.3.0", "preset": SMALL.to_meta()}, "state_dict": state}, checkpoint)
    folder = root / "images"
    folder.mkdir()
    for i, (h, w) in enumerate(SIZES):
        cv2.imwrite(str(folder / f"img{i}.png"), synthetic_image(h, w, seed=40 + i))
    paths = sorted(folder.glob("*.png"))
    detector = Detector(TorchBackend(seeded_net(*WEIGHTS, depth=101), preset=SMALL))
    reference = dict(zip([p.name for p in paths], detector.predict(paths), strict=True))
    assert sum(len(r.scores) for r in reference.values()) > 0
    return {"root": root, "checkpoint": checkpoint, "folder": folder, "reference": reference}


@pytest.fixture(scope="module")
def graph(r101: dict) -> Path:
    """``paadet export`` of the checkpoint (its preset, dynamic size; the self-check on ONNX Runtime runs)."""
    path = r101["root"] / "paa_r101.onnx"
    assert main(["export", "--checkpoint", str(r101["checkpoint"]), "--output", str(path)]) == 0
    return path


def assert_matches(results: dict, reference: dict, exact: bool = True) -> MatchReport:
    """``results``: file name -> (boxes, scores, labels); every reference detection matched (and no extra)."""
    total = MatchReport()
    assert sorted(results) == sorted(reference)
    for name, ref in reference.items():
        boxes, scores, labels = results[name]
        total += match_detections(ref.boxes, ref.scores, ref.labels, boxes, scores, labels)
    if exact:
        assert total.matched == total.reference == total.ours, str(total)
    return total


def coco_results(path: Path) -> dict:
    from paadet.classes import LABEL_OF_CATEGORY

    entries = json.loads(path.read_text())
    out: dict[str, tuple[list, list, list]] = {}
    for e in entries:
        x, y, w, h = e["bbox"]
        boxes, scores, labels = out.setdefault(e["file_name"], ([], [], []))
        boxes.append([x, y, x + w, y + h])
        scores.append(e["score"])
        labels.append(LABEL_OF_CATEGORY[e["category_id"]])
    return out


def test_checkpoint_loads_as_r101_from_its_keys(r101: dict) -> None:
    net = load_network(r101["checkpoint"])
    assert net.depth == 101 and len(net.backbone.layer3) == 23


def test_truncated_backbone_names_what_differs(r101: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A file whose ``layer3`` has neither 6 nor 23 blocks: one line counting them, from the library and the CLI."""
    state = torch.load(r101["checkpoint"], weights_only=True)["state_dict"]
    cut = {k: v for k, v in state.items() if not k.startswith(tuple(f"backbone.layer3.{i}." for i in range(12, 23)))}
    bad = tmp_path / "cut.pth"
    torch.save({"state_dict": cut}, bad)
    with pytest.raises(
        CheckpointError, match=r"cut\.pth: .*backbone\.layer3 has 12 blocks \(R-50 has 6, R-101 has 23\)"
    ):
        load_network(bad)
    assert main(["predict", str(r101["folder"]), "--checkpoint", str(bad), "--output", str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "paadet predict: error:" in err[0] and "has 12 blocks" in err[0]


def test_predict(r101: dict, tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    assert main(["predict", str(r101["folder"]), "--checkpoint", str(r101["checkpoint"]), "--output", str(out)]) == 0
    assert_matches(coco_results(out), r101["reference"])


def test_eval(r101: dict, tmp_path: Path) -> None:
    """``paadet eval`` runs R-101 on a small COCO data set and records the architecture with its settings."""
    ann, images = write_train_fixture(tmp_path / "data")
    out = tmp_path / "eval"
    argv = ["eval", "--ann", ann, "--images", images, "--checkpoint", str(r101["checkpoint"])]
    assert main([*argv, "--output-dir", str(out), "--no-progress"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert "PAA R101-FPN" in json.dumps(metrics)
    assert len(json.loads((out / "detections.json").read_text())) > 0


def test_export_records_the_architecture(graph: Path, r101: dict, tmp_path: Path) -> None:
    info = read_export_info(graph)
    assert (info.depth, info.architecture, info.preset.scale) == (101, "PAA R101-FPN", SMALL.scale)
    props = {p.key: p.value for p in onnx.load(str(graph), load_external_data=False).metadata_props}
    assert props["paadet_architecture"] == "PAA R101-FPN" and json.loads(props["paadet"])["depth"] == 101
    out = tmp_path / "r.json"
    assert (
        main(["predict", str(r101["folder"]), "--backend", "onnxruntime", "--model", str(graph), "--output", str(out)])
        == 0
    )
    assert_matches(coco_results(out), r101["reference"])


def test_quantize_keeps_the_architecture(graph: Path, r101: dict, tmp_path: Path) -> None:
    int8 = tmp_path / "int8.onnx"
    argv = ["quantize", "--model", str(graph), "--calib", str(r101["folder"]), "--output", str(int8)]
    assert main([*argv, "--method", "ort", "--max-images", "2", "--no-progress"]) == 0
    info = read_export_info(int8)
    assert (info.depth, info.precision) == (101, "int8")
    results = Detector.from_spec(DetectorSpec(backend="onnxruntime", model=str(int8))).predict(
        sorted(r101["folder"].glob("*.png"))
    )
    assert sum(len(r.scores) for r in results) > 0


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_bench_reports_the_architecture(backend: str, graph: Path, r101: dict, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    weights = ["--checkpoint", str(r101["checkpoint"])] if backend == "torch" else ["--model", str(graph)]
    argv = ["bench", "--backend", backend, *weights, "--warmup", "0", "--iters", "1", "--json", str(out)]
    assert main(argv) == 0
    report = json.loads(out.read_text())
    assert report["architecture"] == "PAA R101-FPN" and not report["timing_only"]
    assert report["preset"] == SMALL.name


def test_batch(r101: dict, tmp_path: Path) -> None:
    from paadet.batch import read_results

    out = tmp_path / "batch"
    argv = ["batch", str(r101["folder"]), "--output-dir", str(out), "--checkpoint", str(r101["checkpoint"])]
    # in a process of its own, with the local Ray instance that `paadet batch` starts, as a user runs it (no Ray
    # driver's threads left behind in the test process)
    done = subprocess.run(
        [sys.executable, "-m", "paadet", *argv, "--num-workers", "1", "--no-progress"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    results = {Path(k).name: (r.boxes, r.scores, r.labels) for k, r in read_results(out).items()}
    assert_matches(results, r101["reference"])


def test_serve_says_r101_and_answers_as_predict(r101: dict) -> None:
    from starlette.testclient import TestClient

    from paadet.serve.app import create_app

    detector = Detector.from_spec(DetectorSpec(checkpoint=str(r101["checkpoint"])))
    name = "img0.png"
    with TestClient(create_app(detector)) as client:
        deadline = time.monotonic() + 120
        while (ready := client.get("/readyz")).status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert ready.json()["model"] == {"architecture": "PAA R101-FPN", "backend": "torch", "preset": SMALL.name}
        answer = client.post("/v1/detect", content=(r101["folder"] / name).read_bytes())
    assert answer.status_code == 200, answer.text
    dets = answer.json()["detections"]
    got = ([d["bbox"] for d in dets], [d["score"] for d in dets], [d["label"] for d in dets])
    assert_matches({name: got}, {name: r101["reference"][name]})


def test_graph_metadata_round_trip_and_format_1_reads_as_r50() -> None:
    """Format 2 writes ``depth``; a format 1 graph (before R-101) has none and is an R-50."""
    from paadet.preprocess import get_preset
    from paadet.runtime.graph_info import FORMAT_VERSION, ExportInfo

    info = ExportInfo("full", get_preset("800"), (800, 800), 1, "fp32", True, 17, "0.1.0", depth=101)
    props = info.metadata_props()
    assert props["paadet_architecture"] == "PAA R101-FPN" and FORMAT_VERSION == 2
    assert ExportInfo.from_metadata(props, "g.onnx") == info
    assert info.describe().startswith("PAA R101-FPN, full fp32 graph, preset 800")
    old = json.loads(props["paadet"])
    del old["depth"]
    old["format"] = 1
    assert ExportInfo.from_metadata({"paadet": json.dumps(old)}, "old.onnx").depth == 50
