"""``--backend auto`` in predict, eval, serve and batch: the rules an option decides, the first run's export, check
and measurement, the second run's cached choice (no export, no torch), the fallback when an export fails its
parity check, and detections within the parity rule of the torch backend's."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch

import paadet.export.exporter as exporter
import paadet.model.build as build
from paadet.batch import run_batch
from paadet.cli import main
from paadet.compare import match_detections
from paadet.data.synthetic import SyntheticSpec, generate_split, synthetic_image
from paadet.detector import Detector
from paadet.export.auto import CHOICES, EXPORTS, installed, resolve_auto
from paadet.model.seeded import train_state_dict
from paadet.preprocess import Preset
from paadet.runtime.spec import AUTO, ONNXRUNTIME, OPENVINO, TORCH, DetectorSpec, auto_rule
from paadet.runtime.tta import TTAOptions

TRAINED = {"name": "trained", "scale": [160, 128], "size_divisor": 32}
CLASSES = {"classes": ["a", "b", "c"], "category_ids": [1, 2, 3]}
OTHER = Preset("other", (192, 160), size_divisor=32)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    """A 3-class checkpoint trained at 160x128 (``meta.preset``), with a hot classifier: many detections."""
    path = tmp_path_factory.mktemp("ckpt") / "trained.pth"
    torch.save(
        {"meta": {"dataset_meta": CLASSES, "preset": TRAINED}, "state_dict": train_state_dict(0, cls_bias=0.0)}, path
    )
    return str(path)


@pytest.fixture(scope="module")
def first(checkpoint, tmp_path_factory):
    """The first auto run on ``checkpoint``: its choice and the cache folder."""
    cache = tmp_path_factory.mktemp("cache")
    return resolve_auto(DetectorSpec(backend=AUTO, checkpoint=checkpoint), cache=cache), cache


@pytest.mark.parametrize(
    ("options", "backend"),
    [
        ({"tta": TTAOptions((1.0,), flip=True)}, TORCH),
        ({"bf16": True}, TORCH),
        ({"optimize": True}, TORCH),
        ({"device": "cuda"}, TORCH),
        ({"precision": "bf16", "model": "m.onnx"}, OPENVINO),
        ({"model": "m.xml"}, OPENVINO),
        ({"providers": "CPUExecutionProvider", "model": "m.onnx"}, ONNXRUNTIME),
        ({"fp16": True, "model": "m.onnx"}, ONNXRUNTIME),
        ({}, None),
        ({"model": "m.onnx"}, None),
    ],
)
def test_an_option_that_one_backend_has_decides(options, backend):
    forced, why = auto_rule(DetectorSpec(backend=AUTO, **options))
    assert forced == backend
    assert bool(why) == (backend is not None)


def test_auto_spec_refuses_options_that_do_not_go_together():
    DetectorSpec(backend=AUTO, checkpoint="x.pth").validate()  # checked as the torch backend: fine
    DetectorSpec(backend=AUTO, model="m.onnx").validate()
    with pytest.raises(ValueError, match="--checkpoint is for --backend torch"):
        DetectorSpec(backend=AUTO, model="m.onnx", checkpoint="x.pth").validate()
    with pytest.raises(ValueError, match="--model is for --backend onnxruntime or openvino"):
        DetectorSpec(backend=AUTO, model="m.onnx", tta=TTAOptions((1.0,), flip=False)).validate()
    assert resolve_auto(DetectorSpec(backend=TORCH)) is None  # a backend named: nothing to resolve


def test_first_run_exports_checks_measures_and_remembers(first):
    choice, cache = first
    graphs = [name for name in (ONNXRUNTIME, OPENVINO) if installed(name)]
    assert set(choice.candidates_ms) == {TORCH, *graphs} and all(v > 0 for v in choice.candidates_ms.values())
    assert choice.backend == min(choice.candidates_ms, key=choice.candidates_ms.get)
    assert choice.measured_now and choice.export_seconds is not None and choice.export_seconds > 0
    assert choice.graph is not None and choice.graph.is_file() and choice.graph.parent.parent == cache / EXPORTS
    remembered = json.loads((choice.graph.parent / CHOICES).read_text())
    (entry,) = remembered.values()
    assert entry["chosen"] == choice.backend and set(entry["candidates_ms"]) == set(choice.candidates_ms)
    if choice.backend != TORCH:
        assert choice.spec.model == str(choice.graph) and choice.spec.checkpoint is None
    line = choice.line()
    assert line.startswith("--backend auto: ") and "measured now" in line and "\n" not in line


def test_second_run_uses_the_cached_choice_without_torch_or_export(first, checkpoint, monkeypatch):
    choice, cache = first
    stamp = choice.graph.stat().st_mtime_ns

    def refuse(*args, **kwargs):
        raise AssertionError("the second run loaded the network or exported again")

    monkeypatch.setattr(exporter, "export_onnx", refuse)
    monkeypatch.setattr(build, "load_network", refuse)
    again = resolve_auto(DetectorSpec(backend=AUTO, checkpoint=checkpoint), cache=cache)
    assert again.spec == choice.spec and again.candidates_ms == pytest.approx(choice.candidates_ms, abs=0.1)
    assert not again.measured_now and again.export_seconds is None
    assert "measured before on this machine" in again.line()
    assert choice.graph.stat().st_mtime_ns == stamp


def test_a_new_process_resolves_without_importing_torch(first, checkpoint):
    import subprocess

    choice, cache = first
    code = (
        "import sys, json; from paadet.runtime.spec import DetectorSpec; from paadet.export.auto import resolve_auto;"
        f"c = resolve_auto(DetectorSpec(backend='auto', checkpoint={checkpoint!r}), cache=__import__('pathlib').Path("
        f"{str(cache)!r})); print(json.dumps([c.backend, 'torch' in sys.modules]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    backend, torch_loaded = json.loads(out.strip().splitlines()[-1])
    assert backend == choice.backend and not torch_loaded


def test_every_graph_candidate_keeps_the_torch_backends_detections(first, checkpoint):
    choice, _ = first
    images = [synthetic_image(120, 150, seed=s) for s in (1, 2)]
    reference = Detector.from_spec(DetectorSpec(checkpoint=checkpoint)).predict(images)
    for name in (n for n in (ONNXRUNTIME, OPENVINO) if installed(n)):
        spec = choice.spec.replace(backend=name, model=str(choice.graph), checkpoint=None)
        results = Detector.from_spec(spec).predict(images)
        matched = extra = total = 0
        for ref, got in zip(reference, results, strict=True):
            report = match_detections(ref.boxes, ref.scores, ref.labels, got.boxes, got.scores, got.labels)
            matched, extra, total = matched + report.matched, extra + report.extra, total + report.reference
        assert total > 20  # a hot classifier: a real comparison
        assert matched >= 0.995 * total and extra <= 0.005 * total, (name, matched, extra, total)


def test_an_export_that_fails_its_check_is_not_used(checkpoint, tmp_path, monkeypatch):
    exported = []

    def failing(net, output, preset, **kwargs):  # an export whose check against the torch backend fails
        Path(output).write_bytes(b"not a graph")
        exported.append((Path(output), preset, kwargs))
        return SimpleNamespace(parity="matched 12/40 reference detections (simulated)", parity_ok=False)

    monkeypatch.setattr(exporter, "export_onnx", failing)
    spec = DetectorSpec(backend=AUTO, checkpoint=checkpoint, preset=OTHER)
    choice = resolve_auto(spec, cache=tmp_path)
    assert choice.backend == TORCH and "parity" in choice.reason and choice.spec.checkpoint == checkpoint
    ((graph, preset, kwargs),) = exported
    assert preset == OTHER and kwargs["dynamic_batch"] and kwargs["verify"]  # the run's preset, checked
    assert not graph.exists()  # the failed graph is not kept
    assert resolve_auto(spec, cache=tmp_path).backend == TORCH and len(exported) == 1  # remembered: not again


def _dataset(root: Path) -> tuple[Path, Path]:
    ann, images = generate_split(root, 2, split="val", spec=SyntheticSpec(size=96, max_size=60, classes=3))
    return ann, images


def test_predict_eval_and_batch_take_auto(first, checkpoint, tmp_path, monkeypatch, capsys):
    choice, cache = first
    monkeypatch.setenv("PAADET_CACHE", str(cache))
    ann, images = _dataset(tmp_path / "val")
    files = sorted(str(p) for p in images.glob("*.jpg"))
    out = tmp_path / "auto.json"
    argv = ["predict", *files, "--checkpoint", checkpoint, "--no-progress"]
    assert main([*argv, "--backend", AUTO, "-o", str(out)]) == 0
    err = capsys.readouterr().err
    assert err.count("--backend auto:") == 1 and "measured before on this machine" in err
    ref = tmp_path / "torch.json"
    assert main([*argv, "-o", str(ref)]) == 0
    got, want = json.loads(out.read_text()), json.loads(ref.read_text())
    assert len(want) > 10 and abs(len(got) - len(want)) <= max(1, 0.005 * len(want))

    run = tmp_path / "eval"
    argv = ["eval", "--checkpoint", checkpoint, "--backend", AUTO, "--ann", str(ann), "--images", str(images)]
    assert main([*argv, "--output-dir", str(run), "--no-progress"]) == 0
    assert "--backend auto:" in capsys.readouterr().err
    assert json.loads((run / "metrics.json").read_text())["backend"]["backend"] == choice.backend

    empty = tmp_path / "none.txt"  # no inputs: the run records the model it would give its workers, no Ray starts
    empty.write_text("")
    run_batch([empty], tmp_path / "batch", DetectorSpec(backend=AUTO, checkpoint=checkpoint), progress=False)
    recorded = json.loads((tmp_path / "batch" / "run.json").read_text())["model"]
    assert recorded["backend"] == choice.backend
    if choice.backend != TORCH:
        assert recorded["model"] == str(choice.graph)
    assert np.isfinite(choice.candidates_ms[choice.backend])


def test_the_commands_offer_auto_and_keep_torch_as_the_default():
    import argparse

    from paadet.commands import batch, eval, predict, serve

    for module in (predict, eval, serve, batch):
        subparsers = argparse.ArgumentParser().add_subparsers()
        module.add_parser(subparsers)
        (command,) = subparsers.choices.values()
        action = next(a for a in command._actions if a.dest == "backend")
        assert AUTO in action.choices and action.default == TORCH


def test_serve_takes_auto(first, checkpoint, tmp_path):
    import httpx
    from test_serve import ServerProcess

    choice, cache = first
    log = tmp_path / "serve.log"
    image = tmp_path / "photo.png"
    cv2.imwrite(str(image), synthetic_image(120, 150, seed=1))
    args = ["--checkpoint", checkpoint, "--backend", AUTO, "--log-level", "info"]
    srv = ServerProcess(args, env={"PAADET_CACHE": str(cache)}, log=log)
    try:
        answer = httpx.post(srv.url + "/v1/detect", content=image.read_bytes(), timeout=120)
        assert answer.status_code == 200 and answer.json()["detections"]
    finally:
        assert srv.stop() == 0, srv.output()
    lines = log.read_text().splitlines()
    assert sum(line.startswith("--backend auto: ") for line in lines) == 1, lines
    (started,) = [line for line in lines if "paadet serve: serving" in line]
    assert f" on {choice.backend} " in started, started
