"""``paadet data synthetic``: the synthetic data set from the command line, its checks, and the next command."""

from __future__ import annotations

import json
import shlex

import pytest

from paadet.cli import main
from paadet.data.coco import CocoDataset
from paadet.data.synthetic import SHAPES
from tests.fixtures import run_cli_without_torch


def test_writes_train_and_val_with_the_classes_asked_for_without_torch(tmp_path):
    out = tmp_path / "shapes"
    args = ["data", "synthetic", "--output", str(out), "--train", "4", "--val", "3", "--size", "64"]
    proc = run_cli_without_torch([*args, "--classes", "3", "--object-sizes", "20,56", "--seed", "2"])
    for split, count in (("train", 4), ("val", 3)):
        coco = json.loads((out / split / "annotations.json").read_text())
        assert [c["name"] for c in coco["categories"]] == list(SHAPES[:3])
        assert len(coco["images"]) == count and len(list((out / split / "images").glob("*.jpg"))) == count
        assert {im["width"] for im in coco["images"]} == {64}
        assert coco["annotations"] and {a["category_id"] for a in coco["annotations"]} <= {1, 2, 3}
        assert all(max(a["bbox"][2:]) <= 56 for a in coco["annotations"])
        assert coco["info"]["seed"] == 2 and coco["info"]["spec"]["classes"] == 3
        assert len(CocoDataset.load(out / split / "annotations.json", out / split / "images").image_ids) == count
    # the next command trains on what was written, at the images' size
    line = proc.stdout.splitlines()[proc.stdout.splitlines().index("next (the quick recipe, docs/standin.md):") + 1]
    cmd = shlex.split(line)
    assert cmd[:2] == ["paadet", "train"] and cmd[cmd.index("--scale") + 1] == "64x64"
    assert cmd[cmd.index("--ann") + 1] == str(out / "train" / "annotations.json")
    assert cmd[cmd.index("--val-images") + 1] == str(out / "val" / "images")


def test_same_seed_same_files(tmp_path):
    for name in ("a", "b"):
        assert main(["data", "synthetic", "--output", str(tmp_path / name), "--train", "2", "--val", "1"]) == 0
    for split in ("train", "val"):
        for image in (tmp_path / "a" / split / "images").iterdir():
            assert image.read_bytes() == (tmp_path / "b" / split / "images" / image.name).read_bytes()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--size", "64"], "--object-sizes 40,112: MAX must be at most --size (64)"),
        (["--size", "16", "--object-sizes", "8,16"], "--size 16: images must be at least 32 px"),
    ],
)
def test_sizes_that_do_not_fit_are_one_line_errors_before_any_write(tmp_path, capsys, extra, message):
    out = tmp_path / "new"
    assert main(["data", "synthetic", "--output", str(out), *extra]) == 2
    err = capsys.readouterr().err
    assert err == f"paadet data: error: {message}\n"
    assert not out.exists()


def test_a_non_empty_output_or_a_file_is_refused(tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    assert main(["data", "synthetic", "--output", str(taken), "--train", "1", "--val", "1"]) == 2
    assert (
        capsys.readouterr().err == f"paadet data: error: {taken}: --output is not empty; give a new or empty folder\n"
    )
    assert sorted(p.name for p in taken.iterdir()) == ["notes.txt"]
    a_file = tmp_path / "file.json"
    a_file.write_text("{}")
    assert main(["data", "synthetic", "--output", str(a_file), "--train", "1", "--val", "1"]) == 2
    assert "must be a folder, but this is a file" in capsys.readouterr().err
    assert a_file.read_text() == "{}"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--classes", "9"], "the generator has 8 shapes; got 9"),
        (["--object-sizes", "50,40"], "expected 4 <= MIN <= MAX"),
        (["--train", "0"], "--train"),
    ],
)
def test_bad_numbers_are_refused_at_parse_time(tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["data", "synthetic", "--output", str(tmp_path / "x"), *extra])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
