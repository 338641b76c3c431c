"""A checkpoint records the scale it was trained at; predict, eval, export and batch default to it.
And the CPU's reduced precisions: ``--bf16`` inference (torch backend) and ``paadet train --amp``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from fixtures import write_train_fixture

from paadet import DetectorSpec
from paadet.checkpoint import CheckpointError, load_checkpoint
from paadet.cli import main
from paadet.data.synthetic import SyntheticSpec, generate_split, synthetic_image
from paadet.detector import Detector
from paadet.model.build import load_network
from paadet.model.seeded import train_state_dict
from paadet.preprocess import Preset, get_preset
from paadet.runtime.torch_backend import TorchBackend

TRAINED = {"name": "trained", "scale": [160, 128], "size_divisor": 32}
CLASSES = {"classes": ["a", "b", "c"], "category_ids": [1, 2, 3]}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> str:
    """A 3-class checkpoint with ``meta.preset`` (as ``paadet train`` writes it) and a hot classifier."""
    state = train_state_dict(seed=0, cls_bias=0.0)
    path = tmp_path_factory.mktemp("ckpt") / "trained.pth"
    torch.save({"meta": {"dataset_meta": CLASSES, "preset": TRAINED}, "state_dict": state}, path)
    return str(path)


def test_preset_meta_round_trip_and_malformed_values(tmp_path):
    for preset in (get_preset("mmdet"), get_preset("800"), Preset("x", (256, 200), size_divisor=32)):
        assert Preset.from_meta(preset.to_meta()) == preset
    assert Preset.from_meta({"scale": [256, 256]}).size_divisor == 32
    for bad in ({}, {"scale": [256]}, {"scale": ["a", 2]}, {"scale": [0, 5]}, {"scale": [9, 9], "size_divisor": None}):
        with pytest.raises(ValueError, match="malformed preset"):
            Preset.from_meta(bad)
    path = tmp_path / "bad.pth"
    torch.save({"meta": {"preset": {"scale": "big"}}, "state_dict": train_state_dict()}, path)
    with pytest.raises(CheckpointError, match=r"bad\.pth: malformed preset .* in meta\.preset"):
        _ = load_checkpoint(path).preset


def test_detector_defaults_to_the_checkpoint_preset(trained, tmp_path):
    assert load_checkpoint(trained).preset == Preset.from_meta(TRAINED)
    assert Detector.from_spec(DetectorSpec(checkpoint=trained)).preset.scale == (160, 128)
    assert Detector.from_spec(DetectorSpec(checkpoint=trained, preset="800")).preset.name == "800"  # asked for: wins
    plain = tmp_path / "plain.pth"
    torch.save({"meta": {"dataset_meta": CLASSES}, "state_dict": train_state_dict()}, plain)
    assert Detector.from_spec(DetectorSpec(checkpoint=str(plain))).preset.name == "mmdet"


def test_eval_and_batch_use_the_checkpoint_preset(trained, tmp_path, capsys):
    ann, images = generate_split(tmp_path / "val", 2, split="val", spec=SyntheticSpec(size=96, max_size=60))
    data = json.loads(ann.read_text())
    data["categories"] = [
        {"id": i, "name": n} for i, n in zip(CLASSES["category_ids"], CLASSES["classes"], strict=False)
    ]
    data["annotations"] = [a for a in data["annotations"] if a["category_id"] <= 3]
    ann.write_text(json.dumps(data))
    out = tmp_path / "eval"
    assert (
        main(
            [
                "eval",
                "--checkpoint",
                trained,
                "--ann",
                str(ann),
                "--images",
                str(images),
                "--output-dir",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    assert "preset trained" in capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["backend"]["preset"] == "trained"

    import argparse

    from paadet.commands.batch import MODEL, add_parser
    from paadet.runtime.registry import with_explicit_preset

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    args = parser.parse_args(["batch", str(images), "--output-dir", str(tmp_path / "b"), "--checkpoint", trained])
    assert get_preset(with_explicit_preset(MODEL.spec(args)).preset).scale == (160, 128)


def test_export_defaults_to_the_checkpoint_preset(trained, tmp_path):
    import onnx

    from paadet.runtime.graph_info import ExportInfo

    graph = tmp_path / "m.onnx"
    assert main(["export", "--checkpoint", trained, "--output", str(graph), "--no-simplify", "--no-verify"]) == 0
    model = onnx.load(str(graph), load_external_data=False)
    info = ExportInfo.from_metadata({p.key: p.value for p in model.metadata_props}, str(graph))
    assert info.preset.scale == (160, 128) and info.preset.name == "trained"


def test_bf16_inference_is_close_to_fp32_and_says_so(trained):
    net = load_network(trained)
    fp32 = TorchBackend(net, preset=Preset.from_meta(TRAINED))
    bf16 = TorchBackend(load_network(trained), preset=Preset.from_meta(TRAINED), bf16=True)
    assert bf16.describe()["precision"] == "bf16" and fp32.describe()["precision"] == "fp32"
    assert bf16.channels_last and not fp32.channels_last  # NHWC where it pays: bfloat16 on the CPU
    assert bf16.net.backbone.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(1, 3, 128, 160)
    a, b = fp32.network(x), bf16.network(x)
    for level_a, level_b in zip(a[0], b[0], strict=False):
        assert level_b.dtype == torch.bfloat16  # it really ran in bfloat16
        err = (level_a - level_b.float()).abs().max() / level_a.abs().max()
        assert 0 < err < 0.1
    result = Detector(bf16).predict(synthetic_image(128, 160, seed=1))[0]
    assert len(result.boxes) > 0 and np.isfinite(np.asarray(result.boxes)).all()
    with pytest.raises(ValueError, match="exclude each other"):
        TorchBackend(load_network(trained), bf16=True, fp16=True)
    with pytest.raises(ValueError, match="--bf16 is for --backend torch"):
        Detector.from_spec(DetectorSpec(backend="onnxruntime", model="m.onnx", bf16=True))


def test_train_amp_bf16_runs_records_and_refuses_fp16_on_cpu(tmp_path, capsys):
    ann, images = write_train_fixture(tmp_path / "fx")
    common = [
        "train",
        "--ann",
        ann,
        "--images",
        images,
        "--from-scratch",
        "--bn-train",
        "--frozen-stages",
        "-1",
        "--scale",
        "128x96",
        "--batch-size",
        "2",
        "--no-progress",
        "--workers",
        "0",
    ]
    out = tmp_path / "bf16"
    assert main([*common, "--amp", "bf16", "--max-iters", "2", "--output-dir", str(out)]) == 0
    ckpt = torch.load(out / "latest.pth", weights_only=True)
    settings = ckpt["meta"]["settings"]
    assert settings["amp"] == "bf16" and settings["frozen_stages"] == -1
    assert settings["channels_last"] is True  # bf16 on a CPU runs channels-last unless told otherwise
    assert "channels-last memory format: the default with --amp bf16" in capsys.readouterr().err
    assert ckpt["meta"]["preset"]["scale"] == [128, 96]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(np.isfinite(r["loss"]) for r in rows)
    # the stem is trained too (no frozen stage): it moved from its seeded initialisation; weights stay float32
    from paadet.train.init import build_train_model

    initial, _ = build_train_model(3, "scratch", None, seed=0, frozen_stages=-1, norm_eval=False)
    trained_stem = ckpt["state_dict"]["backbone.conv1.weight"]
    assert trained_stem.dtype == torch.float32
    assert not torch.equal(trained_stem, initial.state_dict()["backbone.conv1.weight"])
    capsys.readouterr()
    assert main([*common, "--max-iters", "3", "--output-dir", str(out), "--resume"]) == 2
    assert "amp 'bf16' -> None" in capsys.readouterr().err
    assert main([*common, "--amp", "fp16", "--max-iters", "1", "--output-dir", str(tmp_path / "fp16")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--amp fp16 needs a CUDA device" in err[0]
