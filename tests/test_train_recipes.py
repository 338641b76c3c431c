"""``paadet train``'s recipes (``--recipe``), multi-scale training (``--scale A,B``, drawn as mmcv's ``RandomResize``)
and ResNet-101 training (``--depth``, ``--backbone resnet101-*.pth``, R-101 checkpoints, resume).

The draws are checked against mmcv's own: ``tests/golden/mmcv_random_resize.json`` holds what mmdetection 3.3's
``RandomResize(scale=..., keep_ratio=True)`` gave for ``np.random.seed(s)`` (``tools/make_resize_golden.py``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures import write_train_fixture

from paadet.checkpoint import CheckpointError
from paadet.cli import build_parser, main
from paadet.commands.train import config_from_args
from paadet.model import PAANet
from paadet.model.resnet import STAGE_BLOCKS
from paadet.model.seeded import train_state_dict
from paadet.preprocess import rescale_size
from paadet.train.checkpointer import read_checkpoint
from paadet.train.config import DEPTHS, TrainConfig, TrainingError
from paadet.train.dataset import CocoTrainDataset, random_resize_scale, scale_draw_seed
from paadet.train.init import build_train_model
from paadet.train.loader import collate_train

RESIZE_GOLDEN = json.loads((Path(__file__).parent / "golden" / "mmcv_random_resize.json").read_text())
MS = ((1333, 640), (1333, 800))

# the issue's table (mmdetection 3.3's configs/paa), written out here rather than read from paadet.zoo
TABLE = {
    "1x": (12, (8, 11), (1333, 800)),
    "1.5x": (18, (12, 16), (1333, 800)),
    "2x": (24, (16, 22), (1333, 800)),
    "ms-3x": (36, (28, 34), MS),
}
BASE = dict(ann_file="a.json", image_dir=".", output_dir="o", init="scratch")


@pytest.fixture(scope="module")
def fixture_files(tmp_path_factory) -> tuple[str, str]:
    return write_train_fixture(tmp_path_factory.mktemp("recipes"), seed=0)


def parse(*argv: str):
    return build_parser("train", all_commands=False).parse_args(["train", *argv])


@pytest.mark.parametrize("name", TABLE)
def test_recipe_sets_epochs_steps_and_scale(name, fixture_files, tmp_path):
    epochs, steps, scale = TABLE[name]
    config = TrainConfig(**BASE, recipe=name)
    assert (config.epochs, config.lr_steps, config.scale, config.recipe) == (epochs, steps, scale, name)
    assert config.inference_scale == (1333, 800) and config.multi_scale == (name == "ms-3x")
    ann, images = fixture_files
    args = parse("--ann", ann, "--images", images, "--from-scratch", "--recipe", name, "--output-dir", str(tmp_path))
    cli = config_from_args(args)
    assert (cli.epochs, cli.lr_steps, cli.scale, cli.recipe) == (epochs, steps, scale, name)


def test_explicit_flags_override_the_recipe(fixture_files, tmp_path):
    config = TrainConfig(**BASE, recipe="ms-3x", epochs=3, lr_steps=(2,), scale=(320, 200))
    assert (config.epochs, config.lr_steps, config.scale, config.inference_scale) == (3, (2,), (320, 200), (320, 200))
    ann, images = fixture_files
    common = ("--ann", ann, "--images", images, "--from-scratch", "--output-dir", str(tmp_path))
    cli = config_from_args(parse(*common, "--recipe", "2x", "--epochs", "5"))
    assert (cli.epochs, cli.lr_steps, cli.scale, cli.recipe) == (5, (16, 22), (1333, 800), "2x")
    cli = config_from_args(parse(*common, "--recipe", "ms-3x", "--lr-steps", "", "--scale", "1333x800"))
    assert (cli.epochs, cli.lr_steps, cli.scale) == (36, (), (1333, 800))
    cli = config_from_args(parse(*common, "--scale", "1333x640,1333x800"))
    assert (cli.epochs, cli.lr_steps, cli.scale, cli.recipe) == (12, (8, 11), MS, "1x")


@pytest.mark.parametrize(
    "value, words",
    [("1333x640,1333x800,1333x900", "two of them as a range"), ("1333x640,5000x800", "at most 4096"), ("1333,", "")],
)
def test_bad_scale_ranges_are_refused_while_parsing(capsys, value, words):
    with pytest.raises(SystemExit) as info:
        parse("--ann", "a", "--images", "b", "--output-dir", "o", f"--scale={value}")
    assert info.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("paadet train: error: argument --scale") and words in last


def test_unknown_recipe_and_depth_are_refused(capsys):
    for flag, value in (("--recipe", "3x"), ("--depth", "34")):
        with pytest.raises(SystemExit):
            parse("--ann", "a", "--images", "b", "--output-dir", "o", flag, value)
        assert f"argument {flag}: invalid choice" in capsys.readouterr().err
    with pytest.raises(TrainingError, match="unknown recipe '3x'"):
        TrainConfig(**BASE, recipe="3x")
    with pytest.raises(TrainingError, match="depth must be one of 50, 101"):
        TrainConfig(**BASE, depth=34)
    assert tuple(STAGE_BLOCKS) == DEPTHS


def test_resume_compares_ranges_and_accepts_runs_from_before_recipes():
    ms = TrainConfig(**BASE, recipe="ms-3x").resolved()
    stored = ms.settings()
    assert stored["scale"] == [[1333, 640], [1333, 800]] and ms.resume_mismatches(stored) == []
    other = TrainConfig(**BASE, recipe="ms-3x", scale=((1333, 600), (1333, 800))).resolved()
    assert other.resume_mismatches(stored) == ["scale [[1333, 640], [1333, 800]] -> [[1333, 600], [1333, 800]]"]
    old = {k: v for k, v in TrainConfig(**BASE).resolved().settings().items() if k not in ("recipe", "depth")}
    assert TrainConfig(**BASE).resolved().resume_mismatches(old) == []
    assert TrainConfig(**BASE, depth=101).resolved().resume_mismatches(old) == []  # the depth is checked on the keys


# ---- the draws: mmcv's RandomResize, exactly ----


@pytest.mark.parametrize("case", range(len(RESIZE_GOLDEN["cases"])))
def test_scale_draws_equal_mmcv_random_resize(case):
    """For the same numpy seed, the same drawn scale, resized size, scale factor and box as mmdetection's
    ``RandomResize(scale, keep_ratio=True)``."""
    golden = RESIZE_GOLDEN["cases"][case]
    scales = tuple(tuple(s) for s in golden["scales"])
    columns = RESIZE_GOLDEN["columns"]
    box = torch.tensor(RESIZE_GOLDEN["box"], dtype=torch.float32)
    for values in golden["draws"]:
        row = dict(zip(columns, values, strict=True))
        drawn = random_resize_scale(scales, np.random.RandomState(row["seed"]))
        assert drawn == (row["scale_0"], row["scale_1"]), row
        h, w = row["height"], row["width"]
        new_h, new_w = rescale_size(h, w, drawn)
        assert (new_h, new_w) == (row["new_height"], row["new_width"]), row
        assert (new_w / w, new_h / h) == (row["w_scale"], row["h_scale"]), row
        scaled = box * torch.tensor((new_w / w, new_h / h), dtype=torch.float32).repeat(2)
        scaled[0::2], scaled[1::2] = scaled[0::2].clamp(0, new_w), scaled[1::2].clamp(0, new_h)
        assert scaled.tolist() == pytest.approx([row["x1"], row["y1"], row["x2"], row["y2"]], abs=1e-5), row


def test_golden_draws_cover_both_sides_of_the_range():
    """The golden file exercises what matters: the recipe's short side spans 640..800, the overlapping range
    draws scales whose larger number is the second position as well as the first."""
    (ms,) = [c for c in RESIZE_GOLDEN["cases"] if c["scales"] == [[1333, 640], [1333, 800]]]
    short = [row[4] for row in ms["draws"]]
    assert {row[3] for row in ms["draws"]} == {1333} and min(short) >= 640 and max(short) <= 800
    assert len(set(short)) > 10
    (cross,) = [c for c in RESIZE_GOLDEN["cases"] if c["scales"] == [[600, 1000], [800, 400]]]
    assert any(row[3] > row[4] for row in cross["draws"]) and any(row[3] < row[4] for row in cross["draws"])


def test_recipe_draws_are_uniform_over_640_to_800():
    draws = [
        random_resize_scale(MS, np.random.RandomState(scale_draw_seed(0, epoch, index)))
        for epoch in range(2)
        for index in range(1500)
    ]
    assert {long for long, _ in draws} == {1333}
    short = np.array([s for _, s in draws])
    assert short.min() == 640 and short.max() == 800 and len(set(short.tolist())) == 161  # both ends included
    assert abs(short.mean() - 720) < 3 and abs(short.std() - np.sqrt((161**2 - 1) / 12)) < 2


def test_dataset_draws_each_images_scale_per_epoch(fixture_files):
    scales = ((160, 96), (200, 128))
    dataset = CocoTrainDataset(*fixture_files, scale=scales, flip_prob=0.0, seed=3)
    seen = {}
    for epoch in (0, 1):
        for index, entry in enumerate(dataset.images):
            sample = dataset.load(index, epoch)
            expected = random_resize_scale(scales, np.random.RandomState(scale_draw_seed(3, epoch, index)))
            assert sample.scale == expected and 160 <= expected[0] <= 200 and 96 <= expected[1] <= 128
            assert sample.img_shape == rescale_size(entry.height, entry.width, expected)
            assert sample.scale_factor == (sample.img_shape[1] / entry.width, sample.img_shape[0] / entry.height)
            seen[epoch, index] = sample
    assert any(seen[0, i].scale != seen[1, i].scale for i in range(len(dataset)))  # a new draw each epoch
    again = dataset.load(2, 1)
    assert again.scale == seen[1, 2].scale and torch.equal(again.image, seen[1, 2].image)
    other_seed = CocoTrainDataset(*fixture_files, scale=scales, flip_prob=0.0, seed=4)
    assert any(other_seed.load(i, 0).scale != seen[0, i].scale for i in range(len(dataset)))
    batch = collate_train([seen[0, 0], seen[0, 1], seen[0, 5]])
    shapes = [s.img_shape for s in (seen[0, 0], seen[0, 1], seen[0, 5])]
    assert len(set(shapes)) > 1
    assert batch.images.shape[-2:] == (
        -(-max(h for h, _ in shapes) // 32) * 32,
        -(-max(w for _, w in shapes) // 32) * 32,
    )
    assert all(
        ph % 32 == 0 and pw % 32 == 0 and ph >= h for (ph, pw), (h, _) in zip(batch.pad_shapes, shapes, strict=True)
    )


# ---- ResNet-101 ----


def torchvision_file(path: Path, depth: int) -> Path:
    """A file laid out as torchvision's ``resnet{depth}-*.pth``: the backbone's keys and a classifier ``fc``."""
    torch.manual_seed(depth)
    state = PAANet(num_classes=3, depth=depth).backbone.state_dict()
    state.update({"fc.weight": torch.zeros(1000, 2048), "fc.bias": torch.zeros(1000)})
    torch.save(state, path)
    return path


def test_backbone_file_sets_the_depth_and_a_conflicting_depth_is_refused(tmp_path):
    r101 = torchvision_file(tmp_path / "resnet101_imagenet.pth", 101)
    expected = torch.load(r101, weights_only=True)
    for depth in (None, 101):
        net, report = build_train_model(3, "backbone", r101, depth=depth)
        assert net.depth == 101 and report.mode == "backbone"
        assert all(torch.equal(v, expected[k]) for k, v in net.backbone.state_dict().items())
    with pytest.raises(
        CheckpointError, match=r"resnet101_imagenet\.pth: torchvision's ResNet-101 weights, but --depth"
    ):
        build_train_model(3, "backbone", r101, depth=50)
    r50 = torchvision_file(tmp_path / "resnet50_imagenet.pth", 50)
    with pytest.raises(CheckpointError, match=r"resnet50_imagenet\.pth: torchvision's ResNet-50 weights, but --depth"):
        build_train_model(3, "backbone", r50, depth=101)
    assert build_train_model(3, "backbone", r50)[0].depth == 50
    assert build_train_model(3, "scratch", depth=101)[0].depth == 101


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["train", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_depth_mismatch_is_one_line(capsys, tmp_path, fixture_files):
    ann, images = fixture_files
    r101 = torchvision_file(tmp_path / "resnet101_imagenet.pth", 101)
    code, _, err = run_cli(
        capsys, "--ann", ann, "--images", images, "--backbone", str(r101), "--depth", "50", "--output-dir",
        str(tmp_path / "out"), "--no-progress",
    )  # fmt: skip
    errors = [line for line in err.splitlines() if line.startswith("paadet train: error:")]
    assert code == 2 and errors == err.strip().splitlines()[-1:], err
    assert errors[0].startswith(f"paadet train: error: {r101}: torchvision's ResNet-101 weights, but --depth 50")
    paa101 = tmp_path / "paa_r101.pth"
    torch.save({"meta": {}, "state_dict": train_state_dict(0, num_classes=3, depth=101)}, paa101)
    code, _, err = run_cli(
        capsys, "--ann", ann, "--images", images, "--checkpoint", str(paa101), "--depth", "50", "--output-dir",
        str(tmp_path / "out2"), "--no-progress",
    )  # fmt: skip
    errors = [line for line in err.splitlines() if line.startswith("paadet train: error:")]
    assert code == 2 and errors == err.strip().splitlines()[-1:], err
    assert errors[0].startswith(f"paadet train: error: {paa101}: a PAA R101-FPN checkpoint, but --depth 50 asks")
    assert not (tmp_path / "out" / "latest.pth").exists() and not (tmp_path / "out2" / "latest.pth").exists()


def test_tiny_r101_multi_scale_run_records_depth_and_recipe_resumes_and_predicts(capsys, tmp_path, fixture_files):
    """One iteration of an R-101 from an R-101 PAA checkpoint (depth from its keys) with the ms-3x recipe and a
    small scale range; the checkpoint records both, resume rebuilds the R-101, predict loads it (no flag)."""
    ann, images = fixture_files
    paa101 = tmp_path / "paa_r101.pth"
    torch.save({"meta": {}, "state_dict": train_state_dict(0, num_classes=3, depth=101)}, paa101)
    out = tmp_path / "out"
    argv = [
        "--ann", ann, "--images", images, "--checkpoint", str(paa101), "--recipe", "ms-3x",
        "--scale", "128x80,160x96", "--batch-size", "2", "--lr", "0.0001", "--warmup-iters", "0",
        "--workers", "0", "--output-dir", str(out), "--no-progress",
    ]  # fmt: skip
    code, stdout, err = run_cli(capsys, *argv, "--max-iters", "1")
    assert code == 0, err
    assert "max_iters: 1 iterations" in stdout
    meta = read_checkpoint(out / "latest.pth")["meta"]
    settings = meta["settings"]
    assert settings["depth"] == 101 and settings["recipe"] == "ms-3x"
    assert settings["scale"] == [[128, 80], [160, 96]] and settings["epochs"] == 36
    assert settings["lr_steps"] == [28, 34]
    assert meta["preset"]["scale"] == [160, 96]  # the largest of the range, for inference
    code, _, err = run_cli(capsys, *argv, "--max-iters", "2", "--resume", "--depth", "50")
    assert code == 2 and "the run trains a ResNet-101, not the ResNet-50 of --depth 50" in err
    code, stdout, err = run_cli(capsys, *argv, "--max-iters", "2", "--resume")
    assert code == 0, err
    assert "max_iters: 2 iterations" in stdout
    ckpt = read_checkpoint(out / "latest.pth")
    assert ckpt["meta"]["settings"]["depth"] == 101 and ckpt["meta"]["settings"]["recipe"] == "ms-3x"
    assert ckpt["meta"]["train_state"]["iteration"] == 2
    assert ckpt["state_dict"]["backbone.layer3.22.conv1.weight"].shape == (256, 1024, 1, 1)

    results = tmp_path / "r.json"
    image = Path(images) / "img_a.png"
    assert main(["predict", str(image), "--checkpoint", str(out / "latest.pth"), "--output", str(results)]) == 0
    capsys.readouterr()
    rows = json.loads(results.read_text())
    assert isinstance(rows, list) and all(r["category_id"] in (3, 7, 11) for r in rows)
