"""``paadet train`` on the command line: flags, errors before any work, a real fine-tuning run, Ctrl-C."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import pytest
import torch

from paadet.cli import main
from paadet.data.synthetic import synthetic_image
from paadet.model import PAANet
from paadet.train.checkpointer import read_checkpoint
from paadet.train.init import cls_bias_init
from paadet.train.metrics import read_rows

HEIGHT, WIDTH = 64, 80


def write_coco_root(root: Path, num_images: int = 3, unreadable: str | None = None) -> Path:
    """ROOT/annotations/instances_train2017.json and ROOT/train2017/*.png (categories 5 'cat_a', 9 'cat_b')."""
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    image_dir = root / "train2017"
    image_dir.mkdir(exist_ok=True)
    images, anns = [], []
    for i in range(num_images):
        name = f"im{i}.png"
        if name == unreadable:
            (image_dir / name).write_bytes(b"this is not an image")
        else:
            cv2.imwrite(str(image_dir / name), synthetic_image(HEIGHT, WIDTH, seed=i))
        images.append({"id": i + 1, "file_name": name, "height": HEIGHT, "width": WIDTH})
        anns.append(
            {"id": 2 * i + 1, "image_id": i + 1, "category_id": 5, "bbox": [6, 5, 30, 26], "area": 780, "iscrowd": 0}
        )
        anns.append(
            {"id": 2 * i + 2, "image_id": i + 1, "category_id": 9, "bbox": [40, 28, 32, 30], "area": 960, "iscrowd": 0}
        )
    data = {
        "images": images,
        "annotations": anns,
        "categories": [{"id": 5, "name": "cat_a"}, {"id": 9, "name": "cat_b"}],
    }
    (root / "annotations" / "instances_train2017.json").write_text(json.dumps(data))
    return root


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return write_coco_root(tmp_path_factory.mktemp("coco"), num_images=3, unreadable="im1.png")


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main(["train", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def usage_error(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as info:
        main(["train", *argv])
    assert info.value.code == 2
    return capsys.readouterr().err


def test_help_lists_the_flags_and_the_lr_rule(capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for flag in (
        "--ann",
        "--images",
        "--data",
        "--scale",
        "--flip-prob",
        "--batch-size",
        "--no-shuffle",
        "--seed",
        "--workers",
        "--checkpoint",
        "--backbone",
        "--from-scratch",
        "--lr",
        "--epochs",
        "--lr-steps",
        "--warmup-iters",
        "--warmup-ratio",
        "--max-iters",
        "--momentum",
        "--weight-decay",
        "--bn-train",
        "--device",
        "--output-dir",
        "--resume",
        "--val-ann",
        "--val-images",
        "--val-interval",
        "--no-progress",
    ):
        assert flag in text, flag
    assert "0.000625" in text and "16 images per iteration" in text


@pytest.mark.parametrize(
    ("flag", "value", "words"),
    [
        ("--lr", "-1", "must be >= 0"),
        ("--batch-size", "0", "must be >= 1"),
        ("--epochs", "x", "expected an integer"),
        ("--flip-prob", "1.5", "between 0 and 1"),
        ("--warmup-ratio", "2", "between 0 and 1"),
        ("--scale", "1333", "LONGxSHORT"),
        ("--lr-steps", "11,8", "increasing"),
        ("--workers", "-2", "must be >= 0"),
    ],
)
def test_bad_flag_values(capsys, tmp_path, flag, value, words):
    err = usage_error(
        capsys, "--data", str(tmp_path), "--from-scratch", "--output-dir", str(tmp_path / "o"), flag, value
    )
    assert flag in err and words in err


def test_usage_errors(capsys, tmp_path):
    assert "--output-dir" in usage_error(capsys, "--data", str(tmp_path), "--from-scratch")
    assert "not allowed with" in usage_error(
        capsys, "--data", str(tmp_path), "--from-scratch", "--checkpoint", "w.pth", "--output-dir", str(tmp_path / "o")
    )


def test_errors_before_any_work(capsys, tmp_path, root):
    out = str(tmp_path / "out")
    code, _, err = run_cli(
        capsys,
        "--ann",
        str(tmp_path / "missing.json"),
        "--images",
        str(tmp_path),
        "--from-scratch",
        "--output-dir",
        out,
    )
    assert code == 2 and "missing.json: annotation file not found" in err
    code, _, err = run_cli(capsys, "--data", str(tmp_path), "--from-scratch", "--output-dir", out)
    assert code == 2 and "instances_train2017.json: annotation file not found" in err
    code, _, err = run_cli(capsys, "--data", str(root), "--output-dir", out)
    assert code == 2 and "no initialisation" in err
    code, _, err = run_cli(capsys, "--data", str(root), "--checkpoint", str(tmp_path / "w.pth"), "--output-dir", out)
    assert code == 2 and "w.pth: --checkpoint file not found" in err
    (tmp_path / "file").write_text("x")
    code, _, err = run_cli(capsys, "--data", str(root), "--from-scratch", "--output-dir", str(tmp_path / "file"))
    assert code == 2 and "must be a folder, but this is a file" in err
    code, _, err = run_cli(capsys, "--data", str(root), "--from-scratch", "--output-dir", out, "--val-ann", "v.json")
    assert code == 2 and "--val-ann FILE and --val-images DIR" in err
    assert not (tmp_path / "out").exists()


def test_malformed_annotation_file_is_one_line(capsys, tmp_path):
    (tmp_path / "bad.json").write_text('{"images": [}')
    code, _, err = run_cli(
        capsys,
        "--ann",
        str(tmp_path / "bad.json"),
        "--images",
        str(tmp_path),
        "--from-scratch",
        "--output-dir",
        str(tmp_path / "out"),
    )
    assert code == 2 and "bad.json" in err and len(err.strip().splitlines()) == 1


def test_fine_tune_80_class_checkpoint_on_2_classes(capsys, tmp_path, root):
    torch.manual_seed(0)
    official_like = PAANet().state_dict()  # 80 classes
    torch.save({"meta": {}, "state_dict": official_like}, tmp_path / "paa80.pth")
    out = tmp_path / "out"
    code, stdout, err = run_cli(
        capsys,
        "--data",
        str(root),
        "--checkpoint",
        str(tmp_path / "paa80.pth"),
        "--scale",
        f"{WIDTH}x{HEIGHT}",
        "--batch-size",
        "3",
        "--lr",
        "0",
        "--epochs",
        "1",
        "--no-shuffle",
        "--flip-prob",
        "0",
        "--workers",
        "1",
        "--output-dir",
        str(out),
        "--no-progress",
    )
    assert code == 0, err
    assert "80 classes, the dataset 2: bbox_head.atss_cls re-initialised" in err
    assert "skipped unreadable image im1.png" in err
    assert (
        stdout.count("\n") == 1
        and "finished: 1 iterations, 1 epochs" in stdout
        and "1 unreadable images skipped" in stdout
    )
    rows = read_rows(out / "metrics.jsonl")
    assert len(rows) == 1
    assert rows[0]["files"] == ["im0.png", "im2.png"] and rows[0]["skipped"] == ["im1.png"]
    assert rows[0]["lr"] == 0.0 and rows[0]["num_pos"] == sum(rows[0]["num_pos_per_image"])
    assert all(math.isfinite(rows[0][k]) for k in ("loss", "loss_cls", "loss_bbox", "loss_iou"))
    ckpt = read_checkpoint(out / "latest.pth")
    assert ckpt["meta"]["dataset_meta"] == {"classes": ["cat_a", "cat_b"], "category_ids": [5, 9]}
    assert ckpt["meta"]["train_state"]["skipped_images"] == 1
    state = ckpt["state_dict"]
    assert state["bbox_head.atss_cls.weight"].shape == (2, 256, 3, 3)
    assert torch.all(state["bbox_head.atss_cls.bias"] == torch.tensor(cls_bias_init()))
    assert abs(float(state["bbox_head.atss_cls.weight"].std()) - 0.01) < 0.001
    unchanged = [k for k in official_like if not k.startswith("bbox_head.atss_cls.")]  # lr 0: no update
    assert all(torch.equal(state[k], official_like[k]) for k in unchanged)


def test_python_m_paadet_train_ctrl_c_saves_then_exits_130(tmp_path, root):
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    child = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "paadet",
            "train",
            "--data",
            str(root),
            "--from-scratch",
            "--scale",
            f"{WIDTH}x{HEIGHT}",
            "--batch-size",
            "1",
            "--epochs",
            "50",
            "--workers",
            "1",
            "--output-dir",
            str(out),
            "--no-progress",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    deadline = time.monotonic() + 120
    try:
        while not read_rows(out / "metrics.jsonl"):
            assert child.poll() is None, child.stderr.read().decode()
            assert time.monotonic() < deadline, "no iteration finished"
            time.sleep(0.02)
        child.send_signal(signal.SIGINT)
        _, stderr = child.communicate(timeout=120)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == 130, stderr.decode()
    assert "interrupted: saved" in stderr.decode()
    rows = read_rows(out / "metrics.jsonl")
    assert read_checkpoint(out / "latest.pth")["meta"]["iter"] == len(rows) >= 1


def test_trained_checkpoint_predicts_and_exports_with_its_own_classes(capsys, tmp_path, root, monkeypatch):
    """A 2-class checkpoint written by ``paadet train``: predict's COCO ids, --save-vis names and the graph's
    metadata."""
    import onnx

    from paadet.runtime.graph_info import ExportInfo

    torch.manual_seed(0)
    torch.save({"meta": {}, "state_dict": PAANet().state_dict()}, tmp_path / "paa80.pth")
    out = tmp_path / "out"
    code, _, err = run_cli(
        capsys,
        "--data",
        str(root),
        "--checkpoint",
        str(tmp_path / "paa80.pth"),
        "--scale",
        f"{WIDTH}x{HEIGHT}",
        "--batch-size",
        "2",
        "--lr",
        "0",
        "--max-iters",
        "1",
        "--no-shuffle",
        "--flip-prob",
        "0",
        "--workers",
        "1",
        "--output-dir",
        str(out),
        "--no-progress",
    )
    assert code == 0, err
    ckpt = torch.load(out / "latest.pth", weights_only=True)
    ckpt["state_dict"]["bbox_head.atss_cls.bias"].fill_(
        2.0
    )  # a freshly initialised classifier scores < 0.05: make it fire
    hot = tmp_path / "hot.pth"
    torch.save({"meta": ckpt["meta"], "state_dict": ckpt["state_dict"]}, hot)

    drawn_texts: list[str] = []
    real_put_text = cv2.putText

    def put_text(img, text, *args, **kwargs):
        drawn_texts.append(text)
        return real_put_text(img, text, *args, **kwargs)

    monkeypatch.setattr(cv2, "putText", put_text)
    results = tmp_path / "r.json"
    image = root / "train2017" / "im0.png"
    assert (
        main(
            [
                "predict",
                str(image),
                "--checkpoint",
                str(hot),
                "--preset",
                "800",
                "--output",
                str(results),
                "--save-vis",
                str(tmp_path / "vis"),
                "--no-progress",
            ]
        )
        == 0
    )
    entries = json.loads(results.read_text())
    assert entries and {e["category_id"] for e in entries} <= {5, 9}
    assert drawn_texts and {t.split()[0] for t in drawn_texts} <= {"cat_a", "cat_b"}

    graph = tmp_path / "two.onnx"
    assert (
        main(
            [
                "export",
                "--checkpoint",
                str(hot),
                "--preset",
                "800",
                "--output",
                str(graph),
                "--no-simplify",
                "--no-verify",
            ]
        )
        == 0
    )
    model = onnx.load(str(graph), load_external_data=False)
    info = ExportInfo.from_metadata({p.key: p.value for p in model.metadata_props}, str(graph))
    assert info.classes.names == ("cat_a", "cat_b") and info.classes.category_ids == (5, 9)
