"""Outputs on a full disk, and a batch run's unreadable inputs (issue 30, items 2 and 13).

Each command that writes (export, quantize, predict, eval, batch), pointed at a folder where every write fails
with ENOSPC (:func:`full_disk.full_disk`), stops with one line naming the file it could not write, exits 2,
and leaves no partial output that looks complete. A batch run over many missing files prints the first few,
then a count and where the full list is."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np
import pytest
import ray
import torch
from full_disk import full_disk

from paadet.cli import main
from paadet.data.synthetic import synthetic_image
from paadet.model.seeded import seeded_state_dict
from paadet.preprocess import Preset

TINY = Preset("tiny64", (64, 64), size_divisor=None, fixed_size=(64, 64))
NO_SPACE = "cannot write (No space left on device)"


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A seeded checkpoint trained (so its meta says) at 64x64, three small images and their annotations."""
    root = tmp_path_factory.mktemp("io")
    checkpoint = root / "seeded.pth"
    torch.save({"meta": {"preset": TINY.to_meta()}, "state_dict": seeded_state_dict(0, cls_bias=-2.0)}, checkpoint)
    images = root / "images"
    images.mkdir()
    for i in range(3):
        assert cv2.imwrite(str(images / f"{i}.png"), synthetic_image(60, 80, seed=i))
    ann = {
        "images": [{"id": i + 1, "file_name": f"{i}.png", "width": 80, "height": 60} for i in range(3)],
        "annotations": [
            {"id": i + 1, "image_id": i + 1, "category_id": 1, "bbox": [10, 10, 30, 20], "area": 600, "iscrowd": 0}
            for i in range(3)
        ],
        "categories": [{"id": 1, "name": "person"}],
    }
    (root / "ann.json").write_text(json.dumps(ann))
    return {"root": root, "checkpoint": checkpoint, "images": images, "ann": root / "ann.json"}


def run_full(folder: Path, argv: list[str], capsys: pytest.CaptureFixture) -> str:
    """``paadet ARGV`` with every write under ``folder`` failing; asserts exit 2 and a one-line error (after the
    progress notes some commands print), and returns that line."""
    folder.mkdir(parents=True, exist_ok=True)
    with full_disk(folder):
        code = main(argv)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith(f"paadet {argv[0]}: error: ")]
    assert code == 2 and errors == lines[-1:], (code, lines)
    assert not any("Traceback" in line for line in lines) and NO_SPACE in errors[0], lines
    return errors[0]


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def test_export_on_a_full_disk(data: dict, tmp_path: Path, capsys) -> None:
    full = tmp_path / "full"
    model = full / "paa.onnx"
    argv = ["export", "--checkpoint", str(data["checkpoint"]), "--output", str(model), "--raw", "--no-simplify"]
    assert run_full(full, [*argv, "--no-verify"], capsys) == f"paadet export: error: {model}: {NO_SPACE}"
    assert files_under(full) == []  # no graph, and no temporary file


def small_export(path: Path) -> Path:
    """A full fp32 graph in ``paadet export``'s form, but small (quantised in a second): pixels in, a ``/net/``
    convolution, float outputs, and the export's metadata."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from paadet.postprocess import PostprocessConfig
    from paadet.runtime.graph_info import ExportInfo

    weights = numpy_helper.from_array(np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    nodes = [
        helper.make_node("Cast", ["images"], ["pixels"], to=TensorProto.FLOAT, name="/net/Cast"),
        helper.make_node("Transpose", ["pixels"], ["x"], perm=[0, 3, 1, 2], name="/net/Transpose"),
        helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1], name="/net/conv"),
        helper.make_node("ReduceMean", ["y"], ["scores"], axes=[2, 3], name="/post/ReduceMean"),
        helper.make_node("Mul", ["img_shapes", "scale_factors"], ["sizes"], name="/post/Mul"),
    ]
    graph = helper.make_graph(
        nodes,
        "small",
        [
            helper.make_tensor_value_info("images", TensorProto.UINT8, [1, 64, 64, 3]),
            helper.make_tensor_value_info("img_shapes", TensorProto.FLOAT, [1, 2]),
            helper.make_tensor_value_info("scale_factors", TensorProto.FLOAT, [1, 2]),
        ],
        [
            helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, 4, 1, 1]),
            helper.make_tensor_value_info("sizes", TensorProto.FLOAT, [1, 2]),
        ],
        [weights],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    info = ExportInfo("full", TINY, (64, 64), 1, "fp32", False, 17, "test", dataclasses.asdict(PostprocessConfig()))
    helper.set_model_props(model, info.metadata_props())
    onnx.save(model, path)
    return path


def test_quantize_on_a_full_disk(data: dict, tmp_path: Path, capsys, monkeypatch) -> None:
    graph = small_export(tmp_path / "fp32.onnx")
    full = tmp_path / "full"
    quantize = ["quantize", "--model", str(graph), "--calib", str(data["images"]), "--method", "ort", "--no-progress"]
    assert main([*quantize, "--output", str(tmp_path / "int8.onnx")]) == 0  # the graph quantises
    capsys.readouterr()
    (tmp_path / "int8.onnx").unlink()
    line = run_full(full, [*quantize, "--output", str(full / "int8.onnx")], capsys)
    assert line == f"paadet quantize: error: {full / 'int8.onnx'}: {NO_SPACE}" and files_under(full) == []
    # ONNX Runtime's quantiser works in a temporary folder: a full one is named, with what to do
    monkeypatch.setattr(tempfile, "tempdir", str(full))
    line = run_full(full, [*quantize, "--output", str(tmp_path / "int8.onnx")], capsys)
    assert f"{full}/paadet-quantize-" in line and "set TMPDIR" in line
    assert not (tmp_path / "int8.onnx").exists() and files_under(full) == []


def test_predict_on_a_full_disk(data: dict, tmp_path: Path, capsys) -> None:
    common = [str(data["images"]), "--checkpoint", str(data["checkpoint"]), "--no-progress"]
    full = tmp_path / "full"
    line = run_full(full, ["predict", *common, "--output", str(full / "r.json")], capsys)
    assert line == f"paadet predict: error: {full / 'r.json'}: {NO_SPACE}" and files_under(full) == []
    results = tmp_path / "r.json"
    line = run_full(full, ["predict", *common, "--output", str(results), "--save-vis", str(full / "vis")], capsys)
    assert line == f"paadet predict: error: {full / 'vis' / '0.png'}: {NO_SPACE}"
    assert files_under(full) == [] and not results.exists()  # no results file for a run that did not finish


def test_eval_on_a_full_disk(data: dict, tmp_path: Path, capsys) -> None:
    model = ["--checkpoint", str(data["checkpoint"]), "--no-progress"]
    dataset = ["--ann", str(data["ann"]), "--images", str(data["images"])]
    full = tmp_path / "full"
    line = run_full(full, ["eval", *dataset, *model, "--output-dir", str(full / "run")], capsys)
    assert line.startswith(f"paadet eval: error: {full / 'run' / 'journal.jsonl'}: {NO_SPACE}"), line
    assert files_under(full) == []

    # a finished run, resumed with its disk full: its metrics.json must not stay beside detections it does not describe
    run = tmp_path / "run"
    assert main(["eval", *dataset, *model, "--output-dir", str(run)]) == 0
    capsys.readouterr()
    assert (run / "metrics.json").is_file()
    line = run_full(run, ["eval", *dataset, *model, "--output-dir", str(run), "--resume"], capsys)
    assert line == f"paadet eval: error: {run / 'detections.json'}: {NO_SPACE}"
    assert not (run / "metrics.json").exists() and files_under(run) == ["detections.json", "journal.jsonl"]

    # scoring a results file: metrics.json
    line = run_full(
        full,
        ["eval", "--results", str(run / "detections.json"), "--ann", str(data["ann"]), "--output-dir", str(full)],
        capsys,
    )
    assert line == f"paadet eval: error: {full / 'metrics.json'}: {NO_SPACE}" and files_under(full) == []


def test_batch_on_a_full_disk_stops_before_ray(data: dict, tmp_path: Path, capsys, monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(ray, "init", refuse)
    out = tmp_path / "full"
    argv = ["batch", str(data["images"]), "-o", str(out), "--checkpoint", str(data["checkpoint"]), "--no-progress"]
    assert run_full(out, argv, capsys) == f"paadet batch: error: {out / 'run.json'}: {NO_SPACE}"
    assert files_under(out) == [".lock"]


def test_batch_prints_a_few_unreadable_inputs_then_a_count(data: dict, tmp_path: Path) -> None:
    """In a process of its own, with the local Ray instance that `paadet batch` starts, as a user runs it (no Ray
    driver's threads left behind in the test process)."""
    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"missing/{i:02d}.png\n" for i in range(12)))
    out = tmp_path / "out"
    argv = ["batch", str(listing), "-o", str(out), "--checkpoint", str(data["checkpoint"]), "--no-progress"]
    done = subprocess.run(
        [sys.executable, "-m", "paadet", *argv, "--num-workers", "1", "--shard-size", "4"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    code = done.returncode
    err = [line for line in done.stderr.splitlines() if line.startswith("paadet batch: ")]
    assert code == 1, (err, done.stderr[-2000:])  # unreadable inputs listed
    unreadable = [line for line in err if line.startswith("paadet batch: unreadable: ")]
    assert len(unreadable) == 5 and "missing/00.png" in unreadable[0], err
    assert len(err) == 7, err
    assert "only the first 5 are printed" in err[5] and str(out / "errors.jsonl") in err[5]
    count = "7 more unreadable inputs were not printed (12 in this run)"
    assert err[6] == f"paadet batch: {count}; {out / 'errors.jsonl'} lists every one"
    assert len((out / "errors.jsonl").read_text().splitlines()) == 12
