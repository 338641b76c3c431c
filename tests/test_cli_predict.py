"""``paadet predict`` end to end: folders and files, JSON format, skipped files, visualisations, errors."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import pytest
import torch

from paadet.classes import CATEGORY_IDS
from paadet.cli import main
from paadet.data.synthetic import synthetic_image
from paadet.model.seeded import seeded_state_dict


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "seeded.pth"
    torch.save({"meta": {}, "state_dict": seeded_state_dict(2, cls_bias=-10.3)}, path)
    return path


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory, checkpoint: Path) -> dict:
    root = tmp_path_factory.mktemp("predict")
    folder = root / "photos"
    (folder / "nested").mkdir(parents=True)
    cv2.imwrite(str(folder / "a.png"), synthetic_image(300, 400, seed=1))
    cv2.imwrite(str(folder / "nested" / "b.jpg"), synthetic_image(200, 1000, seed=2))
    (folder / "broken.png").write_bytes(b"\x89PNG truncated")
    out = root / "out" / "results.json"
    vis = root / "vis"
    code = main(
        [
            "predict",
            str(folder),
            "--checkpoint",
            str(checkpoint),
            "--preset",
            "800",
            "--output",
            str(out),
            "--save-vis",
            str(vis),
            "--batch-size",
            "2",
        ]
    )
    return {"code": code, "out": out, "vis": vis, "folder": folder}


def test_exit_status_is_1_when_a_file_is_skipped(run_dir: dict, capsys: pytest.CaptureFixture) -> None:
    assert run_dir["code"] == 1


def test_results_json_is_coco_format(run_dir: dict) -> None:
    entries = json.loads(run_dir["out"].read_text())
    assert entries, "expected detections"
    names = {e["file_name"] for e in entries}
    assert names == {"a.png", "nested/b.jpg"}
    for e in entries:
        assert set(e) == {"image_id", "category_id", "bbox", "score", "file_name"}
        assert e["category_id"] in CATEGORY_IDS
        _x, _y, w, h = e["bbox"]
        assert w >= 0 and h >= 0 and 0.05 < e["score"] <= 1
    # image ids follow the sorted input list: a.png, broken.png (skipped), nested/b.jpg
    assert {e["file_name"]: e["image_id"] for e in entries} == {"a.png": 0, "nested/b.jpg": 2}
    a = [e for e in entries if e["file_name"] == "a.png"]
    assert all(e["bbox"][0] + e["bbox"][2] <= 400 + 1e-3 for e in a)


def test_visualisations_are_written(run_dir: dict) -> None:
    drawn = sorted(p.relative_to(run_dir["vis"]).as_posix() for p in run_dir["vis"].rglob("*") if p.is_file())
    assert drawn == ["a.png", "nested/b.jpg"]  # each drawn copy keeps its input's name and format
    # a 400x300 image is drawn at 2x, the first whole factor that reaches 640 px (readable labels)
    assert cv2.imread(str(run_dir["vis"] / "a.png")).shape == (600, 800, 3)


def test_file_given_directly_keeps_its_name(tmp_path: Path, checkpoint: Path) -> None:
    img = tmp_path / "000000000042.png"
    cv2.imwrite(str(img), synthetic_image(120, 160, seed=4))
    out = tmp_path / "r.json"
    assert main(["predict", str(img), "--checkpoint", str(checkpoint), "--preset", "800", "--output", str(out)]) == 0
    entries = json.loads(out.read_text())
    assert entries and {e["file_name"] for e in entries} == {str(img)}
    assert {e["image_id"] for e in entries} == {42}  # numeric stems become COCO image ids


def test_missing_input_is_a_one_line_error(tmp_path: Path, checkpoint: Path, capsys: pytest.CaptureFixture) -> None:
    code = main(
        ["predict", str(tmp_path / "nope"), "--checkpoint", str(checkpoint), "--output", str(tmp_path / "r.json")]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and "nope" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "r.json").exists()


def test_bad_checkpoint_is_a_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bad = tmp_path / "weights.pth"
    bad.write_text("hello")
    img = tmp_path / "x.png"
    cv2.imwrite(str(img), synthetic_image(50, 50, seed=0))
    code = main(["predict", str(img), "--checkpoint", str(bad), "--output", str(tmp_path / "r.json")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "weights.pth" in err and len(err.splitlines()) == 1


def test_bad_flags(tmp_path: Path, checkpoint: Path, capsys: pytest.CaptureFixture) -> None:
    img = tmp_path / "x.png"
    cv2.imwrite(str(img), synthetic_image(50, 50, seed=0))
    with pytest.raises(SystemExit) as exc:  # argparse refuses it, naming the flag
        main(
            [
                "predict",
                str(img),
                "--checkpoint",
                str(checkpoint),
                "--output",
                str(tmp_path / "r.json"),
                "--batch-size",
                "0",
            ]
        )
    assert exc.value.code == 2 and "argument --batch-size" in capsys.readouterr().err
    assert (
        main(["predict", str(img), "--checkpoint", str(checkpoint), "--output", str(tmp_path / "r.json"), "--fp16"])
        == 2
    )
    assert "CUDA" in capsys.readouterr().err
