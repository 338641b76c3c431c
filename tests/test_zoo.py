"""The model zoo (paadet.zoo), ``paadet models`` and ``--checkpoint NAME`` on the commands."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fixtures import run_cli_without_torch

from paadet.checkpoint import expected_sha256_prefix
from paadet.cli import main
from paadet.hub import OFFICIAL_FILENAME, OFFICIAL_URL
from paadet.model import PAANet
from paadet.zoo import (
    DEFAULT_MODEL,
    MODELS,
    PARAMETERS,
    RECIPES,
    STATE_DICT_BYTES,
    UnknownModelError,
    find_model,
    get_model,
    model_names,
)

# mmdetection 3.3, configs/paa/metafile.yml (Weights) and the configs: name -> (depth, epochs, steps, AP, file)
PUBLISHED = {
    "paa_r50_fpn_1x_coco": (50, 12, (8, 11), 40.4, "paa_r50_fpn_1x_coco_20200821-936edec3.pth"),
    "paa_r50_fpn_1.5x_coco": (50, 18, (12, 16), 41.4, "paa_r50_fpn_1.5x_coco_20200823-805d6078.pth"),
    "paa_r50_fpn_2x_coco": (50, 24, (16, 22), 41.6, "paa_r50_fpn_2x_coco_20200821-c98bfc4e.pth"),
    "paa_r50_fpn_ms-3x_coco": (50, 36, (28, 34), 43.3, "paa_r50_fpn_mstrain_3x_coco_20210121_145722-06a6880b.pth"),
    "paa_r101_fpn_1x_coco": (101, 12, (8, 11), 42.6, "paa_r101_fpn_1x_coco_20200821-0a1825a4.pth"),
    "paa_r101_fpn_2x_coco": (101, 24, (16, 22), 43.5, "paa_r101_fpn_2x_coco_20200821-6829f96b.pth"),
    "paa_r101_fpn_ms-3x_coco": (101, 36, (28, 34), 45.1, "paa_r101_fpn_mstrain_3x_coco_20210122_084202-83250d22.pth"),
}
ROOT = "https://download.openmmlab.com/mmdetection/v2.0/paa"


def test_the_seven_checkpoints_as_published() -> None:
    assert model_names() == tuple(PUBLISHED)
    for name, (depth, epochs, steps, ap, file_name) in PUBLISHED.items():
        entry = get_model(name)
        assert (entry.name, entry.depth, entry.epochs, entry.lr_steps, entry.box_ap) == (name, depth, epochs, steps, ap)
        assert entry.file_name == file_name
        folder = file_name.split("_2020")[0].split("_2021")[0]
        assert entry.legacy_name == folder
        assert entry.url == f"{ROOT}/{folder}/{file_name}"
        assert entry.sha256_prefix == expected_sha256_prefix(file_name) and len(entry.sha256_prefix) == 8
        assert entry.backbone == f"R-{depth}"
        multi = entry.recipe == "ms-3x"
        assert entry.train_scales == (((1333, 640), (1333, 800)) if multi else ((1333, 800),))
        assert entry.schedule.multi_scale is multi
    assert [e.box_ap_no_voting for e in MODELS.values()] == [40.2, 41.2, None, None, 42.4, None, None]


def test_recipes() -> None:
    assert {name: (r.epochs, r.lr_steps, r.train_scales) for name, r in RECIPES.items()} == {
        "1x": (12, (8, 11), ((1333, 800),)),
        "1.5x": (18, (12, 16), ((1333, 800),)),
        "2x": (24, (16, 22), ((1333, 800),)),
        "ms-3x": (36, (28, 34), ((1333, 640), (1333, 800))),
    }


def test_the_official_constants_come_from_the_zoo() -> None:
    assert DEFAULT_MODEL == "paa_r50_fpn_1x_coco"
    assert (MODELS[DEFAULT_MODEL].url, MODELS[DEFAULT_MODEL].file_name) == (OFFICIAL_URL, OFFICIAL_FILENAME)


@pytest.mark.parametrize("depth", [50, 101])
def test_sizes_are_those_of_the_network(depth: int) -> None:
    net = PAANet(depth=depth)
    assert PARAMETERS[depth] == sum(p.numel() for p in net.parameters())
    assert STATE_DICT_BYTES[depth] == sum(t.numel() * t.element_size() for t in net.state_dict().values())


def test_lookup_by_any_of_its_names() -> None:
    entry = MODELS["paa_r101_fpn_ms-3x_coco"]
    for alias in ("paa_r101_fpn_ms-3x_coco", "paa_r101_fpn_mstrain_3x_coco", entry.file_name):
        assert find_model(alias) is entry and get_model(alias) is entry
    assert find_model("paa_r101") is None
    assert find_model(f"dir/{entry.file_name}") is None


def test_unknown_name_lists_the_known_ones() -> None:
    with pytest.raises(UnknownModelError) as excinfo:
        get_model("paa_r152_fpn_1x_coco")
    message = str(excinfo.value)
    assert "\n" not in message and message.startswith("paa_r152_fpn_1x_coco: not a PAA model name")
    assert all(name in message for name in PUBLISHED)


def _fill_cache(cache: Path, *names: str) -> list[Path]:
    cache.mkdir(parents=True, exist_ok=True)
    paths = [cache / MODELS[name].file_name for name in names]
    for path in paths:
        path.write_bytes(b"placeholder")
    return paths


def test_models_command_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache"
    monkeypatch.setenv("PAADET_CACHE", str(cache))
    _fill_cache(cache, "paa_r101_fpn_2x_coco")
    out = run_cli_without_torch(["models"], timeout=60).stdout
    rows = {line.split()[0]: line for line in out.splitlines()[1:8]}
    assert list(rows) == list(PUBLISHED)
    for name, (depth, epochs, _, ap, _) in PUBLISHED.items():
        cells = rows[name].split()
        assert cells[1] == f"R-{depth}" and f"({epochs} ep" in rows[name] and f"{ap} / " in rows[name]
        assert cells[-3:-1] == ["~129" if depth == 50 else "~206", "MB"]
        assert cells[-1] == ("yes" if name == "paa_r101_fpn_2x_coco" else "no")
    assert f"cache folder: {cache} " in out
    assert "estimated from the float32 state dict" in out


def test_models_command_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache"
    monkeypatch.setenv("PAADET_CACHE", str(cache))
    (cached,) = _fill_cache(cache, "paa_r50_fpn_ms-3x_coco")
    proc = run_cli_without_torch(["models", "--json"], timeout=60)
    document = json.loads(proc.stdout[: proc.stdout.rindex("}") + 1])
    assert document["cache_dir"] == str(cache)
    models = {m["name"]: m for m in document["models"]}
    assert list(models) == list(PUBLISHED)
    ms3x = models["paa_r50_fpn_ms-3x_coco"]
    assert ms3x["cached"] is True and ms3x["cached_path"] == str(cached)
    assert ms3x["train_scales"] == [[1333, 640], [1333, 800]] and ms3x["lr_steps"] == [28, 34]
    assert ms3x["sha256_prefix"] == "06a6880b" and ms3x["legacy_name"] == "paa_r50_fpn_mstrain_3x_coco"
    assert [m["cached"] for m in models.values()].count(True) == 1
    for name, (depth, epochs, _, ap, file_name) in PUBLISHED.items():
        m = models[name]
        assert (m["depth"], m["epochs"], m["box_ap"], m["file_name"]) == (depth, epochs, ap, file_name)
        assert m["estimated_bytes"] == STATE_DICT_BYTES[depth] and m["parameters"] == PARAMETERS[depth]


# ---------------------------------------------------------------------- --checkpoint NAME on the commands
# The cache holds a placeholder under the model's file name: the command must open that very file, which
# then fails its sha256 check (the name's hash is the real checkpoint's). The message names the cached path.


@pytest.mark.parametrize(
    "command",
    [
        ["predict", "{image}", "--output", "{out}/r.json"],
        ["export", "--output", "{out}/paa.onnx", "--no-verify"],
        ["bench", "--backend", "torch", "--device", "cpu", "--images", "{images}", "--iters", "1", "--warmup", "0"],
        ["batch", "{image}", "--output-dir", "{out}/batch", "--num-workers", "1"],
    ],
    ids=lambda c: c[0],
)
def test_checkpoint_name_opens_the_cached_file(
    command: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import cv2

    from paadet.data.synthetic import synthetic_image

    cache = tmp_path / "cache"
    monkeypatch.setenv("PAADET_CACHE", str(cache))
    (cached,) = _fill_cache(cache, "paa_r101_fpn_ms-3x_coco")
    images = tmp_path / "images"
    images.mkdir()
    cv2.imwrite(str(images / "a.png"), synthetic_image(64, 96, seed=1))
    fill = {"image": str(images / "a.png"), "images": str(images), "out": str(tmp_path / "out")}
    argv = [arg.format(**fill) for arg in command] + ["--checkpoint", "paa_r101_fpn_ms-3x_coco"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"paadet {command[0]}: error: {cached}") and "sha256" in err
    assert cached.read_bytes() == b"placeholder"


def test_train_checkpoint_name_opens_the_cached_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from fixtures import write_train_fixture

    cache = tmp_path / "cache"
    monkeypatch.setenv("PAADET_CACHE", str(cache))
    (cached,) = _fill_cache(cache, "paa_r50_fpn_2x_coco")
    ann, images = write_train_fixture(tmp_path / "data")
    argv = ["train", "--ann", ann, "--images", images, "--output-dir", str(tmp_path / "run"), "--max-iters", "1"]
    assert main([*argv, "--checkpoint", "paa_r50_fpn_2x_coco", "--device", "cpu", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"paadet train: error: {cached}") and "sha256" in err


@pytest.mark.parametrize(
    "command", [["predict", "{image}", "--output", "{out}/r.json"], ["export", "--output", "{out}/paa.onnx"]]
)
def test_unknown_checkpoint_name(
    command: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PAADET_CACHE", str(tmp_path / "cache"))
    (tmp_path / "a.png").write_bytes(b"")
    argv = [arg.format(image="a.png", out=str(tmp_path)) for arg in command]
    assert main([*argv, "--checkpoint", "paa_r101_fpn_3x_coco"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    assert err.startswith(f"paadet {command[0]}: error: paa_r101_fpn_3x_coco: checkpoint file not found")
    assert all(name in err for name in PUBLISHED)
    assert not (tmp_path / "cache").exists()


def test_readme_family_table_matches_the_zoo() -> None:
    """The README's table: a row per checkpoint, with the zoo's AP and size, and an eval command that parses."""
    import shlex

    from paadet.cli import build_parser

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme.split("## The PAA family", 1)[1].split("\n## ", 1)[0]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in section.splitlines() if line.startswith("| `")]
    assert [row[0].strip("`") for row in rows] == list(PUBLISHED)
    for row in rows:
        entry = get_model(row[0].strip("`"))
        none = "-" if entry.box_ap_no_voting is None else f"{entry.box_ap_no_voting:.1f}"
        assert row[1:5] == [
            entry.backbone,
            row[2],
            f"{entry.box_ap:.1f} / {none}",
            f"~{entry.estimated_bytes / 1e6:.0f} MB",
        ]
        assert row[2].startswith(f"{entry.recipe}: {entry.epochs} epochs")
        argv = shlex.split(row[5].strip("`"))[1:]
        args = build_parser("eval", all_commands=False).parse_args(argv)
        assert (args.command, args.checkpoint, args.preset) == ("eval", entry.name, None)
