"""``paadet train`` under faults and bad input (issue 30): a full disk, unreadable data, absurd scales and flags,
changed data on ``--resume``, SIGTERM (alone and under DDP), stale temporaries, foreign validation categories.

Runs are tiny (64 x 80 generated images, batch 1, from scratch, CPU); the disk that fills up is
``tests/full_disk.py``, which makes writes into the output folder fail with ENOSPC.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import pytest
import torch
from full_disk import filling_disk

from paadet.cli import build_parser, main
from paadet.data.synthetic import synthetic_image
from paadet.train import TrainConfig, TrainingError
from paadet.train.checkpointer import read_checkpoint, save_checkpoint
from paadet.train.metrics import read_rows

HEIGHT, WIDTH = 64, 80
CATEGORIES = [{"id": 5, "name": "cat_a"}, {"id": 9, "name": "cat_b"}]


def write_set(folder: Path, num_images: int, unreadable: int = 0, categories=CATEGORIES) -> tuple[Path, Path]:
    """``folder/ann.json`` and ``num_images`` generated images (the first ``unreadable`` of them not images), two
    boxes each, of the two ``categories``."""
    image_dir = folder / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    images, anns = [], []
    for i in range(num_images):
        name = f"im{i}.png"
        if i < unreadable:
            (image_dir / name).write_bytes(b"not an image")
        else:
            cv2.imwrite(str(image_dir / name), synthetic_image(HEIGHT, WIDTH, seed=i))
        images.append({"id": i + 1, "file_name": name, "height": HEIGHT, "width": WIDTH})
        for j, (cat, box) in enumerate(
            zip(categories, ([6 + 4 * i, 5, 30, 26], [40, 28 - 3 * i, 32, 30]), strict=True)
        ):
            anns.append(
                {
                    "id": 2 * i + j + 1,
                    "image_id": i + 1,
                    "category_id": cat["id"],
                    "bbox": box,
                    "area": box[2] * box[3],
                    "iscrowd": 0,
                }
            )
    ann = folder / "ann.json"
    ann.write_text(json.dumps({"images": images, "annotations": anns, "categories": categories}))
    return ann, image_dir


def train_args(ann: Path, images: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train",
        "--ann",
        str(ann),
        "--images",
        str(images),
        "--from-scratch",
        "--scale",
        f"{WIDTH}x{HEIGHT}",
        "--batch-size",
        "1",
        "--warmup-iters",
        "2",
        "--lr",
        "0.002",
        "--lr-steps",
        "1",
        "--workers",
        "1",
        "--no-progress",
        "--output-dir",
        str(out),
        *extra,
    ]


def run_cli(capsys, argv: list[str]) -> tuple[int, str]:
    code = main(argv)
    return code, capsys.readouterr().err


def error_lines(err: str) -> list[str]:
    assert "Traceback" not in err, err
    return [line for line in err.splitlines() if "error" in line]


def assert_same_weights(a: Path, b: Path) -> None:
    """The same weights and optimiser state bit for bit, and the same training rows (timings aside)."""
    ca, cb = read_checkpoint(a / "latest.pth"), read_checkpoint(b / "latest.pth")
    assert (ca["meta"]["iter"], ca["meta"]["epoch"]) == (cb["meta"]["iter"], cb["meta"]["epoch"])
    different = [k for k, v in ca["state_dict"].items() if not torch.equal(v, cb["state_dict"][k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"
    for sa, sb in zip(ca["optimizer"]["state"].values(), cb["optimizer"]["state"].values(), strict=True):
        assert all(torch.equal(torch.as_tensor(sa[k]), torch.as_tensor(sb[k])) for k in sa)
    keys = ("iter", "epoch", "lr", "loss", "loss_cls", "loss_bbox", "loss_iou", "num_pos", "files")
    rows_a = [{k: r[k] for k in keys} for r in read_rows(a / "metrics.jsonl") if "loss" in r]
    rows_b = [{k: r[k] for k in keys} for r in read_rows(b / "metrics.jsonl") if "loss" in r]
    assert rows_a == rows_b and rows_a


def wait_for_rows(child: subprocess.Popen, metrics: Path) -> None:
    """Wait until the child wrote its first metrics row (it must still be running)."""
    while not read_rows(metrics):
        assert child.poll() is None, child.communicate()[1]
        time.sleep(0.02)


def terminate_after_first_row(argv: list[str], out: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    """Run ``argv``, send it a real SIGTERM once ``out/metrics.jsonl`` has its first row, and wait for it."""
    child = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        wait_for_rows(child, out / "metrics.jsonl")
        child.send_signal(signal.SIGTERM)
        stdout, stderr = child.communicate(timeout=300)
    finally:
        if child.poll() is None:
            child.kill()
    return subprocess.CompletedProcess(argv, child.returncode, stdout, stderr)


# ------------------------------------------------------------------------------------------ flags (items 6, 9, 10)
def usage_error(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--weight-decay", "inf"),
        ("--lr", "inf"),
        ("--lr", "nan"),
        ("--momentum", "-inf"),
        ("--momentum", "1"),
        ("--flip-prob", "nan"),
        ("--warmup-ratio", "inf"),
        ("--dist-timeout", "inf"),
        ("--dist-timeout", "1e999"),
        ("--scale", "99999x99999"),
        ("--scale", "4097x800"),
    ],
)
def test_flags_that_cannot_work_are_refused_at_parse_time(capsys, tmp_path, flag, value):
    err = usage_error(capsys, train_args(tmp_path, tmp_path, tmp_path / "out", f"{flag}={value}"))
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"paadet train: error: argument {flag}: ") and value in last
    assert ("4096" in last) if flag == "--scale" else ("finite" in last or "[0, 1)" in last)
    assert not (tmp_path / "out").exists()


def test_the_largest_scale_is_accepted_and_the_python_api_refuses_the_same(tmp_path):
    args = build_parser("train", all_commands=False).parse_args(
        train_args(tmp_path, tmp_path, tmp_path, "--scale", "4096x4096")
    )
    assert args.scale == (4096, 4096)
    base = dict(ann_file="a.json", image_dir=".", output_dir="o", init="scratch")
    with pytest.raises(TrainingError, match="cannot fit: each side must be at most 4096"):
        TrainConfig(**base, scale=(99999, 99999))
    with pytest.raises(TrainingError, match="weight_decay inf: must be a finite number"):
        TrainConfig(**base, weight_decay=math.inf)
    with pytest.raises(TrainingError, match="momentum must be below 1"):
        TrainConfig(**base, momentum=1.0)


def test_every_float_flag_of_every_command_refuses_nan_and_infinities():
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    checked = 0
    for name, sub in commands.items():
        for action in sub._actions:
            if action.type in (None, str) or not action.option_strings:
                continue
            for text in ("nan", "inf", "-inf", "1e999"):
                try:
                    value = action.type(text)
                except (argparse.ArgumentTypeError, ValueError, TypeError):  # what argparse reports in one line
                    checked += 1
                    continue
                assert not (isinstance(value, float) and not math.isfinite(value)), (name, action.option_strings, text)
    assert checked > 150  # every command's numeric flags, four values each


def test_a_folder_given_for_a_file_is_named_a_folder(capsys, tmp_path):
    ann, images = write_set(tmp_path / "data", 1)
    out = tmp_path / "out"
    code, err = run_cli(capsys, train_args(tmp_path / "data", images, out, "--epochs", "1"))
    assert code == 2 and error_lines(err) == [
        f"paadet train: error: {tmp_path / 'data'}: --ann needs a file, but this is a folder"
    ]
    code, err = run_cli(capsys, train_args(ann, ann, out, "--epochs", "1"))
    assert code == 2 and f"{ann}: --images needs a folder, but this is a file" in err
    code, err = run_cli(
        capsys, train_args(ann, images, out, "--epochs", "1", "--val-ann", str(images), "--val-images", str(images))
    )
    assert code == 2 and f"{images}: --val-ann needs a file, but this is a folder" in err
    layout = tmp_path / "root" / "annotations" / "instances_train2017.json"
    layout.mkdir(parents=True)
    code, err = run_cli(capsys, ["train", "--data", str(tmp_path / "root"), "--from-scratch", "--output-dir", str(out)])
    assert code == 2 and f"{layout}: the annotation file is a folder (expected a JSON file at ROOT/" in err
    assert not out.exists()


# ------------------------------------------------------------------------------------------ data (items 5, 13d)
def test_every_image_unreadable_exits_2_without_a_checkpoint(capsys, tmp_path):
    ann, images = write_set(tmp_path / "data", 2, unreadable=2)
    out = tmp_path / "out"
    code, err = run_cli(capsys, train_args(ann, images, out, "--epochs", "2"))
    assert code == 2, err
    [line] = error_lines(err)[-1:]
    assert line.startswith("paadet train: error: epoch 1 ran no iteration: no batch held a readable image, 2 images")
    assert "im0.png" in line and "no checkpoint was written" in line
    assert not any(out.glob("*.pth"))


def test_validation_categories_none_of_the_training_ones_are_refused_at_start(capsys, tmp_path):
    ann, images = write_set(tmp_path / "data", 1)
    val_ann, val_images = write_set(tmp_path / "val", 1, categories=[{"id": 1, "name": "x"}, {"id": 2, "name": "y"}])
    out = tmp_path / "out"
    code, err = run_cli(
        capsys,
        train_args(ann, images, out, "--epochs", "1", "--val-ann", str(val_ann), "--val-images", str(val_images)),
    )
    assert code == 2
    [line] = error_lines(err)
    assert line.startswith(
        f"paadet train: error: {val_ann}: none of its category ids (1, 2) is one of the training set's (5, 9"
    )
    assert not (out / "metrics.jsonl").exists() and not any(out.glob("*.pth"))  # refused before the network was built


# ------------------------------------------------------------------------------ SIGTERM, resume, a full disk
@pytest.fixture(scope="module")
def three_images(tmp_path_factory) -> tuple[Path, Path, Path]:
    """3 images (an epoch of 3 iterations at batch 1), their annotation file and a validation file (a copy)."""
    folder = tmp_path_factory.mktemp("three")
    ann, images = write_set(folder, 3)
    val = folder / "val.json"
    shutil.copy(ann, val)
    return ann, images, val


@pytest.fixture(scope="module")
def reference(three_images, tmp_path_factory) -> Path:
    """An uninterrupted run of one epoch (3 iterations), validated on ``val.json`` (keep it as it is: copy it with
    :func:`linked_copy` to resume)."""
    ann, images, val = three_images
    out = tmp_path_factory.mktemp("reference") / "run"
    assert main(train_args(ann, images, out, "--epochs", "1", "--val-ann", str(val), "--val-images", str(images))) == 0
    return out


@pytest.fixture(scope="module")
def terminated(three_images, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """``python -m paadet train`` of 50 epochs sent SIGTERM once its first iteration is logged: its folder and the
    process."""
    out = tmp_path_factory.mktemp("terminated") / "run"
    argv = [sys.executable, "-m", "paadet", *train_args(*three_images[:2], out, "--epochs", "50")]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(torch.get_num_threads()))
    return out, terminate_after_first_row(argv, out, env)


def linked_copy(source: Path, target: Path) -> Path:
    """A copy of a run's folder whose checkpoints are hard links (a run replaces its files, never writes into
    them) and whose metrics log is copied."""
    target.mkdir(parents=True)
    for path in source.iterdir():
        (os.link if path.suffix == ".pth" else shutil.copy)(path, target / path.name)
    return target


def test_sigterm_saves_latest_and_exits_143(terminated):
    out, done = terminated
    assert done.returncode == 143, done.stderr
    assert done.stderr.count("terminated: saved") == 1 and "paadet: terminated (SIGTERM)" in done.stderr
    saved = read_checkpoint(out / "latest.pth")["meta"]
    assert saved["iter"] == len(read_rows(out / "metrics.jsonl")) >= 1
    assert saved["iter"] <= 3, "the SIGTERM came after epoch 1: the resume below would compare nothing"
    assert (out / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # the plot so far, written on SIGTERM


def test_resume_after_sigterm_is_bit_identical(capsys, terminated, three_images, reference):
    out, _ = terminated
    code, err = run_cli(capsys, train_args(*three_images[:2], out, "--epochs", "1", "--resume"))
    assert code == 0, err
    assert_same_weights(reference, out)


def test_a_run_removes_the_temporaries_an_interrupted_write_left(capsys, reference, three_images, tmp_path):
    run = linked_copy(reference, tmp_path / "run")
    stale = [run / ".epoch_1.pth.k3x9_q2a.tmp", run / ".latest.pth.4242.link"]  # a killed write's, link_or_copy's
    foreign = [run / ".notes.txt.abcdefgh.tmp", run / "mine.tmp", run / ".epoch_1.pth.tmp", run / ".best.pth.x.tmp"]
    for path in stale + foreign:
        path.write_bytes(b"\0" * 4096)
    code, err = run_cli(capsys, train_args(*three_images[:2], run, "--epochs", "1", "--resume"))
    assert code == 0 and "nothing to do" in err, err
    assert f"removed 2 temporary files (0.0 MiB) that an interrupted write left in {run}" in err
    assert not any(p.exists() for p in stale) and all(p.exists() for p in foreign)


def test_resume_refuses_changed_annotation_files(capsys, reference, three_images, tmp_path):
    ann, images, val = three_images
    for path, what in ((ann, "training"), (val, "validation")):
        original = path.read_text()
        data = json.loads(original)
        data["annotations"][0]["bbox"][0] += 1  # same path, other content
        path.write_text(json.dumps(data))
        try:
            run = linked_copy(reference, tmp_path / what)
            argv = train_args(
                ann, images, run, "--epochs", "1", "--resume", "--val-ann", str(val), "--val-images", str(images)
            )
            code, err = run_cli(capsys, argv)
        finally:
            path.write_text(original)
        assert code == 2, err
        [line] = error_lines(err)
        assert f"the {what} data changed since this run started: {path} is not the file it was trained on" in line


def test_resume_of_a_checkpoint_without_hashes_compares_paths_and_says_so(capsys, reference, three_images, tmp_path):
    old = tmp_path / "old"
    ckpt = read_checkpoint(reference / "latest.pth")
    ckpt["meta"]["settings"].pop("data_sha256", None)  # as paadet wrote it before the hashes
    save_checkpoint(old / "latest.pth", ckpt)
    code, err = run_cli(capsys, train_args(*three_images[:2], old, "--epochs", "1", "--resume"))
    assert code == 0, err
    assert f"warning: {old / 'latest.pth'} records no content hash of its annotation files" in err
    assert "nothing to do" in err


def test_a_full_disk_under_the_metrics_log_stops_at_that_iteration(capsys, tmp_path, three_images):
    out = tmp_path / "out"
    with filling_disk(out, budget=0):  # the empty log fits, its first row does not
        code, err = run_cli(capsys, train_args(*three_images[:2], out, "--epochs", "1"))
    assert code == 2, err
    assert error_lines(err) == [
        f"paadet train: error: {out / 'metrics.jsonl'}: cannot write (No space left on device); "
        "stopped after iteration 1, no checkpoint was written"
    ]
    assert read_rows(out / "metrics.jsonl") == [] and not any(out.glob("*.pth")) and not any(out.glob(".*"))


def test_a_full_disk_at_a_checkpoint_stops_in_one_line_and_keeps_the_last_good_one(
    capsys, reference, three_images, tmp_path
):
    run = linked_copy(reference, tmp_path / "run")
    with filling_disk(run, names=("latest.pth",)):  # --max-iters 4 stops in epoch 2 and saves latest.pth
        code, err = run_cli(capsys, train_args(*three_images[:2], run, "--epochs", "2", "--max-iters", "4", "--resume"))
    assert code == 2, err
    assert error_lines(err) == [
        f"paadet train: error: {run / 'latest.pth'}: cannot write (No space left on device); "
        f"stopped after iteration 4, the last good checkpoint is {run / 'latest.pth'}"
    ]
    assert read_checkpoint(run / "latest.pth")["meta"]["iter"] == 3  # the file it could not replace, whole
    assert sorted(p.name for p in run.iterdir()) == [
        "best.pth",
        "epoch_1.pth",
        "latest.pth",
        "metrics.jsonl",
        "metrics.png",
    ]


# ------------------------------------------------------------------------------ SIGTERM under DDP (item 12)
def test_sigterm_under_ddp_stops_every_rank_and_rank_0_saves_once(tmp_path):
    """``paadet train --nproc 2`` (torchrun's launcher, 2 gloo processes) sent SIGTERM, as a cluster pre-empts a
    job: the launcher passes it to both ranks, they stop after the same iteration, rank 0 saves once, exit 143."""
    ann, images = write_set(tmp_path / "data", 2)  # one image per rank and epoch
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "paadet", *train_args(ann, images, out, "--epochs", "50", "--nproc", "2")]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    done = terminate_after_first_row(argv, out, env)
    stderr = done.stderr
    assert done.returncode == 143, stderr[-3000:]
    assert stderr.count("terminated: saved") == 1 and "paadet: terminated (SIGTERM)" in stderr
    saved = read_checkpoint(out / "latest.pth")["meta"]
    assert saved["settings"]["world_size"] == 2 and saved["iter"] == len(read_rows(out / "metrics.jsonl")) >= 1
    assert sorted(p.name for p in out.iterdir() if p.suffix == ".pth") in (
        ["latest.pth"],
        ["epoch_1.pth", "latest.pth"],
    )
