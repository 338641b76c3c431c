"""Training checkpoints: mmdetection's layout, plain meta, weights_only round trip, RNG states, atomic writes."""

from __future__ import annotations

import os
import random
import re

import numpy as np
import pytest
import torch

from paadet.checkpoint import CheckpointError, load_state_dict
from paadet.classes import ClassList
from paadet.model import PAANet
from paadet.model.build import load_network
from paadet.train.checkpointer import (
    MMDET_VERSION,
    TrainState,
    capture_rng,
    epoch_name,
    link_or_copy,
    make_checkpoint,
    read_checkpoint,
    restore_rng,
    save_checkpoint,
)

CLASSES = ClassList(("kite", "apple", "zebra"), (7, 3, 11))


def _plain_only(value, where="meta"):
    """Fail unless ``value`` is made of dicts with str keys, lists, str, int, float, bool and None."""
    if isinstance(value, dict):
        for key, item in value.items():
            assert isinstance(key, str), f"{where}: key {key!r}"
            _plain_only(item, f"{where}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _plain_only(item, f"{where}[{i}]")
    else:
        assert value is None or isinstance(value, (str, int, float, bool)), f"{where}: {type(value).__name__}"


@pytest.fixture(scope="module")
def trained():
    """A 3-class trainable network after one SGD step (so the optimizer holds momentum buffers)."""
    torch.manual_seed(0)
    net = PAANet(num_classes=3, trainable=True)  # PyTorch's default (random) initialisation
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=1e-4)
    for p in params:
        p.grad = torch.full_like(p, 0.5)
    optimizer.step()
    return net, optimizer


def test_round_trip_in_mmdetection_layout(tmp_path, trained):
    net, optimizer = trained
    state = TrainState(epoch=1, iteration=7, batch_in_epoch=3, best_ap=0.25, best_epoch=1, threads=2)
    settings = {"lr": 0.01, "scale": [1333, 800], "ann_file": "/data/a.json", "max_iters": None}
    ckpt = make_checkpoint(
        net.state_dict(),
        classes_meta=CLASSES.to_meta(),
        state=state,
        settings=settings,
        init={"mode": "scratch", "source": None},
        optimizer=optimizer.state_dict(),
        scheduler={"iteration": 7, "epoch": 1},
        rng=capture_rng(),
    )
    path = save_checkpoint(tmp_path / epoch_name(2), ckpt)
    assert path.name == "epoch_2.pth"
    assert not [p for p in os.listdir(tmp_path) if p != "epoch_2.pth"]  # no temporary file left behind

    loaded = torch.load(path, map_location="cpu", weights_only=True)
    assert set(loaded) == {"meta", "state_dict", "optimizer", "scheduler", "rng"}
    meta = loaded["meta"]
    _plain_only(meta)
    assert meta["dataset_meta"] == {"classes": ["kite", "apple", "zebra"], "category_ids": [7, 3, 11]}
    assert (meta["epoch"], meta["iter"], meta["mmdet_version"]) == (1, 7, MMDET_VERSION)
    assert meta["settings"] == settings
    assert meta["train_state"]["batch_in_epoch"] == 3
    assert isinstance(meta["paadet_version"], str)

    expected = net.state_dict()
    assert len(loaded["state_dict"]) == 369
    assert all(torch.equal(loaded["state_dict"][k], v) for k, v in expected.items())
    state_dict = load_state_dict(path)  # what every paadet command reads
    assert set(state_dict) == set(expected)
    restored = load_network(path)
    assert restored.num_classes == 3 and restored.classes == CLASSES
    assert torch.equal(restored.bbox_head.atss_cls.weight, net.bbox_head.atss_cls.weight)

    again = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.5, momentum=0.9, weight_decay=1e-4)
    again.load_state_dict(loaded["optimizer"])
    for a, b in zip(again.state.values(), optimizer.state.values(), strict=False):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])
    assert read_checkpoint(path)["meta"]["iter"] == 7


def test_model_only_checkpoint_has_no_resume_state(tmp_path, trained):
    net, _ = trained
    ckpt = make_checkpoint(net.state_dict(), classes_meta=CLASSES.to_meta(), state=TrainState(), settings={})
    assert set(ckpt) == {"meta", "state_dict"}


def test_rng_states_round_trip():
    saved = capture_rng()
    first = (torch.rand(3), random.random(), np.random.rand(2))
    torch.manual_seed(123)
    random.seed(5)
    np.random.seed(9)
    restore_rng(saved)
    second = (torch.rand(3), random.random(), np.random.rand(2))
    assert torch.equal(first[0], second[0]) and first[1] == second[1] and np.array_equal(first[2], second[2])
    assert isinstance(saved["numpy"]["keys"], torch.Tensor) and isinstance(saved["python"]["state"], list)


def test_rng_state_survives_weights_only(tmp_path):
    save_checkpoint(tmp_path / "r.pth", {"meta": {}, "state_dict": {}, "rng": capture_rng()})
    rng = torch.load(tmp_path / "r.pth", weights_only=True)["rng"]
    before = np.random.rand(1)
    np.random.seed(0)
    restore_rng(rng)
    assert np.array_equal(np.random.rand(1), before)


def test_link_or_copy_shares_the_file(tmp_path):
    source = tmp_path / "epoch_1.pth"
    source.write_bytes(b"abc")
    (tmp_path / "latest.pth").write_bytes(b"old")
    target = link_or_copy(source, tmp_path / "latest.pth")
    assert target.read_bytes() == b"abc"
    assert os.path.samefile(source, target)
    save_checkpoint(target, {"meta": {}, "state_dict": {}})  # a later write replaces latest, not epoch_1
    assert source.read_bytes() == b"abc"
    assert sorted(os.listdir(tmp_path)) == ["epoch_1.pth", "latest.pth"]


def test_read_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        read_checkpoint(tmp_path / "missing.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=re.escape("junk.pth: cannot be read")):
        read_checkpoint(tmp_path / "junk.pth")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "bare.pth")
    with pytest.raises(CheckpointError, match=re.escape("bare.pth: not a paadet training checkpoint")):
        read_checkpoint(tmp_path / "bare.pth")


def test_train_state_plain_round_trip():
    state = TrainState(
        epoch=2, iteration=9, batch_in_epoch=1, best_ap=None, best_epoch=None, skipped_images=3, threads=4
    )
    assert TrainState.from_plain(state.to_plain()) == state
