"""Tests for paadet.checkpoint: safe loading, format detection, hash suffixes and strict key checks."""

from __future__ import annotations

import hashlib
import os
import pickle
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from paadet.checkpoint import CheckpointError, expected_sha256_prefix, load_state_dict, load_weights, sha256_file
from paadet.model import PAANet
from paadet.model.seeded import seeded_state_dict

UNPICKLED: list[str] = []


def _record_unpickling(tag: str) -> str:
    """Side effect that proves an object was unpickled (it must never run)."""
    UNPICKLED.append(tag)
    return tag


class Payload:
    """A custom class whose unpickling calls ``_record_unpickling``: loading it needs weights_only=False."""

    def __reduce__(self) -> tuple:
        return (_record_unpickling, ("payload",))


@pytest.fixture(scope="module")
def state() -> dict[str, torch.Tensor]:
    """The full 369-key seeded state dict."""
    return seeded_state_dict(1)


@pytest.fixture(scope="module")
def light_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same keys and shapes with one-element storages (expanded views), so files stay tiny.

    Only for tests where the values do not matter: ``torch.save`` writes a view's storage, not its shape.
    """
    return {key: torch.zeros(1, dtype=value.dtype).reshape(()).expand(value.shape) for key, value in state.items()}


@pytest.fixture(scope="module")
def model() -> PAANet:
    """One model shared by the tests that only check errors (they never change its weights)."""
    return PAANet()


def _mmdet_checkpoint(state: dict[str, torch.Tensor]) -> dict:
    """A checkpoint laid out like mmdetection 2.x's published files."""
    return {
        "meta": {
            "mmdet_version": "2.3.0",
            "mmcv_version": "1.0.5",
            "CLASSES": ("person", "bicycle", "car"),
            "config": "model = dict(type='PAA')",
            "epoch": 12,
            "iter": 87960,
        },
        "state_dict": OrderedDict(state),
    }


def _one_line_error(excinfo: pytest.ExceptionInfo[CheckpointError], path: Path) -> str:
    """The error message, after checking that it is one line and names the file."""
    message = str(excinfo.value)
    assert "\n" not in message
    assert str(path) in message
    return message


def test_mmdet_format_loads_strictly_with_equal_weights(tmp_path: Path, state: dict[str, torch.Tensor]) -> None:
    path = tmp_path / "paa_mmdet.pth"
    torch.save(_mmdet_checkpoint(state), path)
    net = PAANet()
    assert len(state) == 369
    assert not torch.equal(net.state_dict()["backbone.conv1.weight"], state["backbone.conv1.weight"])
    assert load_weights(net, path) is None
    loaded = net.state_dict()
    assert loaded.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key
    assert loaded["bbox_head.scales.0.scale"].ndim == 0


def test_bare_state_dict(
    tmp_path: Path, state: dict[str, torch.Tensor], light_state: dict[str, torch.Tensor], model: PAANet
) -> None:
    path = tmp_path / "bare.pth"
    torch.save(dict(light_state, **{"bbox_head.atss_cls.bias": state["bbox_head.atss_cls.bias"]}), path)
    assert path.stat().st_size < 1_000_000
    loaded = load_state_dict(path)
    assert list(loaded) == list(state)
    assert all(loaded[key].shape == value.shape for key, value in state.items())
    assert torch.equal(loaded["bbox_head.atss_cls.bias"], state["bbox_head.atss_cls.bias"])
    load_weights(model, path)


def test_module_prefix_is_stripped_only_when_every_key_has_it(tmp_path: Path) -> None:
    weights = {"module.a.weight": torch.ones(2), "module.b.bias": torch.zeros(1)}
    path = tmp_path / "ddp.pth"
    torch.save({"state_dict": weights}, path)
    assert sorted(load_state_dict(path)) == ["a.weight", "b.bias"]
    mixed = {"module.a.weight": torch.ones(2), "b.bias": torch.zeros(1)}
    torch.save(mixed, path)
    assert sorted(load_state_dict(path)) == ["b.bias", "module.a.weight"]


def test_missing_keys_are_counted_and_listed(
    tmp_path: Path, light_state: dict[str, torch.Tensor], model: PAANet
) -> None:
    dropped = list(light_state)[:5]
    partial = {k: v for k, v in light_state.items() if k not in dropped}
    path = tmp_path / "missing.pth"
    torch.save(_mmdet_checkpoint(partial), path)
    with pytest.raises(CheckpointError) as excinfo:
        load_weights(model, path)
    message = _one_line_error(excinfo, path)
    assert f"missing keys: 5 ({dropped[0]}, {dropped[1]}, {dropped[2]} and 2 more)" in message
    assert dropped[3] not in message
    assert "unexpected" not in message and "mis-shaped" not in message


def test_unexpected_keys_are_counted_and_listed(
    tmp_path: Path, light_state: dict[str, torch.Tensor], model: PAANet
) -> None:
    extra = dict(light_state, **{"backbone.fc.weight": torch.zeros(10, 2048), "backbone.fc.bias": torch.zeros(10)})
    path = tmp_path / "extra.pth"
    torch.save(extra, path)
    with pytest.raises(CheckpointError) as excinfo:
        load_weights(model, path)
    message = _one_line_error(excinfo, path)
    assert "unexpected keys: 2 (backbone.fc.weight, backbone.fc.bias)" in message
    assert "missing" not in message


def test_misshaped_keys_show_both_shapes(tmp_path: Path, light_state: dict[str, torch.Tensor], model: PAANet) -> None:
    bad = dict(light_state)
    bad["backbone.conv1.weight"] = torch.zeros(2, 3)
    bad["bbox_head.atss_cls.bias"] = torch.zeros(81)
    path = tmp_path / "shapes.pth"
    torch.save(bad, path)
    with pytest.raises(CheckpointError) as excinfo:
        load_weights(model, path)
    message = _one_line_error(excinfo, path)
    assert "mis-shaped keys: 2 (" in message
    assert "backbone.conv1.weight (checkpoint [2, 3] vs model [64, 3, 7, 7])" in message
    assert "bbox_head.atss_cls.bias (checkpoint [81] vs model [80])" in message


def test_all_three_kinds_reported_together(tmp_path: Path, light_state: dict[str, torch.Tensor], model: PAANet) -> None:
    bad = {k: v for k, v in light_state.items() if k != "neck.fpn_convs.4.conv.bias"}
    bad["extra.weight"] = torch.zeros(1)
    bad["bbox_head.scales.0.scale"] = torch.ones(1)
    path = tmp_path / "all.pth"
    torch.save(bad, path)
    with pytest.raises(CheckpointError) as excinfo:
        load_weights(model, path)
    message = _one_line_error(excinfo, path)
    assert "missing keys: 1 (neck.fpn_convs.4.conv.bias)" in message
    assert "unexpected keys: 1 (extra.weight)" in message
    assert "mis-shaped keys: 1 (bbox_head.scales.0.scale (checkpoint [1] vs model []))" in message


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.pth"
    with pytest.raises(CheckpointError, match="not found") as excinfo:
        load_state_dict(path)
    _one_line_error(excinfo, path)


def test_truncated_file(tmp_path: Path) -> None:
    path = tmp_path / "truncated.pth"
    torch.save({"w": torch.arange(1000.0)}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt, truncated") as excinfo:
        load_state_dict(path)
    _one_line_error(excinfo, path)


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("empty.pth", b"", "empty"),
        ("text.pth", b"model = dict(type='PAA')\n", "cannot be read"),
        ("pickled_list.pth", pickle.dumps([1, 2, 3]), "cannot be read"),
    ],
)
def test_non_checkpoint_bytes(tmp_path: Path, name: str, content: bytes, expected: str) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=expected) as excinfo:
        load_state_dict(path)
    message = _one_line_error(excinfo, path)
    assert "likely succeed" not in message


@pytest.mark.parametrize(
    ("obj", "expected"),
    [
        ([torch.zeros(1), torch.ones(1)], "holds a list"),
        ({"epoch": 3, "lr": 0.01}, "holds no tensors"),
        ({"meta": {}, "state_dict": {}}, "empty"),
        ({"a.weight": torch.zeros(1), "a.note": "text"}, "not named tensors"),
    ],
)
def test_non_checkpoint_objects(tmp_path: Path, obj: object, expected: str) -> None:
    path = tmp_path / "object.pth"
    torch.save(obj, path)
    with pytest.raises(CheckpointError, match=expected) as excinfo:
        load_state_dict(path)
    _one_line_error(excinfo, path)


def test_arbitrary_objects_are_never_unpickled(tmp_path: Path) -> None:
    path = tmp_path / "payload.pth"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "meta": Payload()}, path)
    with pytest.raises(CheckpointError, match="refused as unsafe") as excinfo:
        load_state_dict(path)
    message = _one_line_error(excinfo, path)
    assert "_record_unpickling" in message
    assert UNPICKLED == []


class _ShellCommand:
    """What a malicious checkpoint carries: unpickling it calls ``os.system``."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


@pytest.mark.parametrize("wrap", ["torch.save", "pickle protocol 2"])
def test_malicious_pickle_is_refused_as_unsafe_and_runs_nothing(tmp_path: Path, wrap: str) -> None:
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pth"
    payload = {"meta": _ShellCommand(f"touch {marker}")}
    if wrap == "torch.save":
        torch.save({**payload, "state_dict": {"w": torch.zeros(1)}}, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(CheckpointError) as excinfo:
        load_state_dict(path)
    message = _one_line_error(excinfo, path)
    # torch 2.13 words this "Trying to load unsupported GLOBAL posix.system whose module posix is blocked"
    assert "refused as unsafe" in message and "system" in message
    assert "corrupt" not in message
    assert not marker.exists()


def _hashed_copy(tmp_path: Path, suffix: str | None = None) -> tuple[Path, str]:
    """A small valid checkpoint renamed ``x-<suffix>.pth`` (default: the first 8 hex of its sha256)."""
    source = tmp_path / "source.pth"
    torch.save({"w": torch.arange(4.0)}, source)
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    target = tmp_path / f"x-{suffix or digest[:8]}.pth"
    source.rename(target)
    return target, digest


def test_hash_suffix_match(tmp_path: Path) -> None:
    path, digest = _hashed_copy(tmp_path)
    assert expected_sha256_prefix(path) == digest[:8]
    assert torch.equal(load_state_dict(path)["w"], torch.arange(4.0))


def test_full_length_hash_suffix_match(tmp_path: Path) -> None:
    source, digest = _hashed_copy(tmp_path)
    path = source.rename(tmp_path / f"x-{digest}.pth")
    assert torch.equal(load_state_dict(path)["w"], torch.arange(4.0))


def test_hash_suffix_mismatch_is_caught_before_loading(tmp_path: Path) -> None:
    source, digest = _hashed_copy(tmp_path)
    wrong = ("1" if digest[0] == "0" else "0") + digest[1:8]
    path = source.rename(tmp_path / f"x-{wrong}.pth")
    with pytest.raises(CheckpointError) as excinfo:
        load_state_dict(path)
    message = _one_line_error(excinfo, path)
    assert "corrupt or truncated" in message and "re-download" in message
    assert digest[:8] in message and wrong in message


def test_truncated_official_name_fails_on_hash(tmp_path: Path) -> None:
    path = tmp_path / "paa_r50_fpn_1x_coco_20200821-936edec3.pth"
    path.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(CheckpointError, match="936edec3; the file is corrupt or truncated"):
        load_state_dict(path)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("paa_r50_fpn_1x_coco_20200821-936edec3.pth", "936edec3"),
        ("x-0123456789abcdef.pth", "0123456789abcdef"),
        ("x-936edec.pth", None),
        ("x-936EDEC3.pth", None),
        ("x-936edec3.pt", None),
        ("paa-final.pth", None),
    ],
)
def test_expected_sha256_prefix(name: str, expected: str | None) -> None:
    assert expected_sha256_prefix(Path("/some/folder") / name) == expected


def test_sha256_file_streams_in_chunks(tmp_path: Path) -> None:
    path = tmp_path / "blob.bin"
    data = bytes(range(256)) * 100
    path.write_bytes(data)
    assert sha256_file(path, chunk_bytes=1000) == hashlib.sha256(data).hexdigest()
