"""``paadet bench`` on the CPU: report fields, stage accounting, image sources, bad arguments.

Runs are tiny (small presets, 1-2 images per batch, 1-2 iterations) with random weights; the
timings themselves are not asserted, only that they are sane and consistent.
"""

from __future__ import annotations

import functools
import json

import cv2
import numpy as np
import pytest
import torch

import paadet.model.seeded
from paadet import DetectorSpec, bench
from paadet.cli import main
from paadet.data.synthetic import synthetic_image
from paadet.preprocess import PRESETS, Preset, normalize_pad, resize

TINY = Preset("tiny", (96, 96), size_divisor=None, fixed_size=(96, 96))
TINY_DIV = Preset("tinydiv", (96, 64), size_divisor=32)
_cached_weights = functools.cache(paadet.model.seeded.seeded_state_dict)


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    """No official checkpoint is found (empty cache), random weights are made once, tiny presets exist,
    and PyTorch uses one thread (tiny convolutions on a busy machine are many times slower with more)."""
    monkeypatch.setenv("PAADET_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(paadet.model.seeded, "seeded_state_dict", _cached_weights)
    monkeypatch.setitem(PRESETS, TINY.name, TINY)
    monkeypatch.setitem(PRESETS, TINY_DIV.name, TINY_DIV)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _tiny_report(**kwargs):
    options = dict(preset=TINY, device="cpu", batch_size=2, warmup=1, iters=2)
    options.update(kwargs)
    timing = {k: options.pop(k) for k in ("warmup", "iters", "images", "decode", "skip_engine") if k in options}
    if timing.get("images") is not None:
        timing["images"] = str(timing["images"])
    return bench.run_benchmark(DetectorSpec(**options), bench.BenchTiming(**timing))


def test_report_has_every_field_with_sane_values():
    report = _tiny_report()
    for key in (
        "schema",
        "tool",
        "timestamp",
        "backend",
        "device",
        "precision",
        "batch_size",
        "preset",
        "input_size",
        "weights",
        "timing_only",
        "images",
        "warmup",
        "iters",
        "options",
        "hardware",
        "versions",
        "engine",
        "e2e",
    ):
        assert key in report, key
    assert report["backend"] == "torch" and report["device"] == "cpu" and report["precision"] == "fp32"
    assert report["batch_size"] == 2 and report["preset"] == "tiny" and report["timing_only"] is True
    assert "timing only" in report["weights"]
    assert report["images"]["source"].startswith("generated")
    assert report["images"]["timed_files"] == 2 * (1 + 2)
    hw = report["hardware"]
    assert hw["cpu"] and hw["cpu_cores"] >= 1 and hw["cpu_cores_usable"] >= 1 and hw["gpu"] is None
    assert report["versions"]["paadet"] and report["versions"]["torch"] == torch.__version__
    assert "onnxruntime" in report["versions"]
    for name in ("engine", "e2e"):
        part = report[name]
        assert part["definition"] and part["iterations"] == 2 and part["images"] == 4
        assert part["images_per_s"] > 0 and part["ms_per_image"] > 0
        assert part["images_per_s"] == pytest.approx(1000.0 / part["ms_per_image"])
        lat = part["latency_ms_per_batch"]
        assert 0 < lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
    assert report["engine"]["input_shape"] == [2, 3, 96, 96]
    assert report["e2e"]["decode_on"] == "cpu"
    assert report["e2e"]["decode_threads"] >= 1
    assert set(bench.E2E_STAGES) <= set(report["e2e"]["stages_ms_per_image"])
    assert report["e2e"]["detections_per_image"] >= 0
    json.dumps(report)  # serialisable as is


def test_stages_add_up_to_the_e2e_time():
    e2e = _tiny_report(preset=TINY_DIV, batch_size=2, iters=1)["e2e"]
    stages = e2e["stages_ms_per_image"]
    assert all(v >= 0 for v in stages.values())
    assert stages["copy"] == 0 and stages["copy_back"] == 0  # no copies on the CPU
    timed = sum(stages.values())
    assert timed + e2e["untimed_ms_per_image"] == pytest.approx(e2e["ms_per_image"])
    assert 0 <= e2e["untimed_ms_per_image"] <= 0.05 * e2e["ms_per_image"] + 2.0


def test_images_folder_is_cycled(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    cv2.imwrite(str(folder / "a.jpg"), synthetic_image(120, 160, seed=1))
    cv2.imwrite(str(folder / "b.png"), synthetic_image(90, 150, seed=2))
    report = _tiny_report(images=folder, batch_size=1, warmup=0, iters=3)
    assert report["images"]["source"] == f"{folder}: 2 files"
    assert report["images"]["timed_files"] == 2 and report["e2e"]["images"] == 3


def test_every_image_given_is_timed(tmp_path):
    """--images with more files than --iters batches hold: e2e runs on until each file was timed once."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(5):
        cv2.imwrite(str(folder / f"im{i}.jpg"), synthetic_image(64 + 8 * i, 96, seed=i))
    report = _tiny_report(images=folder, batch_size=2, warmup=1, iters=1)
    assert report["images"]["timed_files"] == 5
    assert report["e2e"]["iterations"] == 3 and report["e2e"]["images"] == 6  # ceil(5 / 2) batches
    assert report["engine"]["iterations"] == 1  # exactly --iters where no file needs it


def test_without_iters_each_figure_is_timed_long_enough(monkeypatch):
    """The default: timed batches until each figure has MIN_TIMED_BATCHES and MIN_TIMED_SECONDS (both)."""
    from paadet.bench import settings as bench_settings

    monkeypatch.setattr(bench_settings, "MIN_TIMED_BATCHES", 4)
    monkeypatch.setattr(bench_settings, "MIN_TIMED_SECONDS", 0.5)
    report = _tiny_report(batch_size=1, warmup=0, iters=None)
    for name in ("engine", "e2e"):
        figure = report[name]
        assert figure["iterations"] >= 4 and figure["seconds"] >= 0.5, (name, figure["iterations"], figure["seconds"])
        # it stopped at the first batch that completed both conditions
        assert figure["iterations"] == 4 or figure["seconds"] - figure["latency_ms_per_batch"]["max"] / 1000 < 0.5


def test_cli_writes_json_and_table(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = main(["bench", "--preset", "tiny", "--warmup", "0", "--iters", "1", "--json", str(out)])
    assert rc == 0
    captured = capsys.readouterr()
    printed = captured.out
    assert "engine" in printed and "e2e" in printed and "timing only" in printed
    report = json.loads(out.read_text())
    said = (captured.out + captured.err).count("--backend auto")
    assert said == (1 if report["auto"] else 0), (captured.out, captured.err)  # said once, in the report
    assert report["device"] == "cpu" and report["batch_size"] == 1  # CPU defaults
    assert report["e2e"]["iterations"] == 1 and report["engine"]["iterations"] == 1


@pytest.mark.parametrize(
    "argv, message",
    [
        # --batch-size 0, --iters 0 and --warmup -1 are refused by argparse: tests/test_robustness.py
        (["--images", "/no/such/folder"], "no such folder"),
        (["--backend", "onnxruntime", "--model", "missing.onnx"], "missing.onnx: ONNX model file not found"),
        (["--backend", "torch", "--model", "x.onnx"], "--model is for --backend onnxruntime"),
        (["--fp16", "--device", "cpu"], "--fp16 needs a CUDA device"),
        (["--decode", "gpu", "--device", "cpu"], "--decode gpu needs"),
        (["--backend", "torch", "--cuda-graphs", "--device", "cpu"], "need a CUDA device"),
        (["--cuda-graphs", "--device", "cpu"], "options of the torch backend on CUDA"),
        (["--backend", "torch", "--fold-bn", "--device", "cpu"], "fold_bn need a CUDA device"),
        (
            ["--fold-bn", "--fp16-weights", "--device", "cpu"],
            "--fold-bn, --fp16-weights are options of the torch backend",
        ),
    ],
)
def test_bad_arguments_give_one_line_errors(argv, message, capsys):
    rc = main(["bench", "--preset", "tiny", "--iters", "1", "--warmup", "0", *argv])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and err.startswith("paadet bench: error:") and message in err, err


def test_empty_images_folder(tmp_path, capsys):
    assert main(["bench", "--preset", "tiny", "--images", str(tmp_path)]) == 2
    assert "no image files" in capsys.readouterr().err


def test_cuda_batch_normalisation_matches_the_cpu_path():
    """The CUDA fast path's batched normalise-and-pad equals per-image normalize_pad (checked on CPU tensors)."""
    from paadet.model import PAANet
    from paadet.runtime.torch_backend import TorchBackend

    backend = TorchBackend(PAANet(), preset=TINY, device="cpu")
    rng = np.random.default_rng(0)
    shapes, pad = [(64, 90), (50, 96), (64, 96)], (64, 96)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in shapes]
    staging = torch.from_numpy(rng.integers(0, 256, (3, *pad, 3), dtype=np.uint8))  # garbage padding
    for i, img in enumerate(images):
        staging[i, : img.shape[0], : img.shape[1]] = torch.from_numpy(img)
    batched = backend._normalize_pad_batch(staging.permute(0, 3, 1, 2).flip(1), shapes)
    reference = torch.stack([normalize_pad(img, pad) for img in images])
    assert torch.equal(batched, reference)


def test_onnxruntime_backend(tmp_path):
    """``--backend onnxruntime --model`` goes through build_detector; engine falls back to the network stage."""
    from paadet import export
    from paadet.model import PAANet

    net = PAANet()
    net.load_state_dict(_cached_weights(0))
    model = tmp_path / "tiny.onnx"
    export.export_onnx(net, model, preset=TINY, batch_size=1, verify=False, simplify=False)
    report = bench.run_benchmark(
        DetectorSpec(backend="onnxruntime", model=str(model), preset="tiny"), bench.BenchTiming(warmup=0, iters=1)
    )
    assert report["backend"] == "onnxruntime" and report["timing_only"] is False
    assert report["batch_size"] == 1 and report["engine"]["images_per_s"] > 0
    assert "onnxruntime backend's 'network' stage" in report["engine"]["definition"]
    assert report["e2e"]["stages_ms_per_image"]["network"] > 0


def test_auto_backend_on_cpu_probes_the_fp32_backends_and_says_which(tmp_path, capsys):
    """``paadet bench`` with no backend on a CPU times every installed fp32 exported-graph backend on the first
    image, runs the fastest, and names it once (in the report); never a reduced precision."""
    from paadet.bench.auto import available_cpu_candidates

    out = tmp_path / "auto.json"
    assert main(["bench", "--preset", "tiny", "--iters", "1", "--warmup", "0", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    candidates = available_cpu_candidates()
    assert report["device"] == "cpu" and report["backend"] in candidates
    assert report["timing_only"] is True and "timing only" in report["weights"]
    assert report["e2e"]["images_per_s"] > 0
    captured = capsys.readouterr()
    assert captured.err.count("temporary ONNX graph") == 1  # the weights are exported once, for every candidate
    if len(candidates) > 1:
        auto = report["auto"]
        assert sorted(auto["candidates_ms"]) == sorted(candidates) and auto["chosen"] == report["backend"]
        assert auto["candidates_ms"][auto["chosen"]] == min(auto["candidates_ms"].values())
        said = (captured.out + captured.err).count("--backend auto")
        assert said == 1 and f"--backend auto chose {report['backend']}" in captured.out  # once, in the report
    assert report["precision"] in ("fp32", "f32")
    assert bench.choose_backend(DetectorSpec(backend="auto", device="cpu", model="x.onnx")) == "onnxruntime"
    assert bench.choose_backend(DetectorSpec(backend="auto", device="cpu", precision="bf16")) == "openvino"
    assert bench.choose_backend(DetectorSpec(backend="auto", device="cpu", model="m.xml")) == "openvino"
    with_providers = _tiny_report(backend="auto", batch_size=1, iters=1, warmup=0, providers="CPUExecutionProvider")
    assert with_providers["backend"] == "onnxruntime" and with_providers["auto"] is None  # --providers: ORT, no probe
    assert bench.choose_backend(DetectorSpec(backend="auto", device="cpu", fp16=True)) == "torch"
    assert bench.choose_backend(DetectorSpec(backend="torch", device="cpu")) == "torch"


def test_gpu_decode_resize_and_pad_groups_by_size():
    """The GPU-decoding path's resize + pad (run here on CPU tensors): images resized in one call per
    source size equal each image resized alone; metas as the OpenCV path's; padding exactly zero."""
    import torch.nn.functional as F

    from paadet.preprocess import get_preset
    from paadet.runtime.torch_backend import resize_pad_decoded

    preset = get_preset("800")
    gen = torch.Generator().manual_seed(0)
    shapes = [(48, 64), (60, 40), (48, 64), (30, 100)]
    decoded = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=gen) for h, w in shapes]
    rgb, metas = resize_pad_decoded(decoded, preset)
    assert rgb.shape == (4, 3, 800, 800) and rgb.dtype == torch.float32
    for img, out, meta, (h, w) in zip(decoded, rgb, metas, shapes, strict=False):
        _, cv_meta = resize(np.zeros((h, w, 3), np.uint8), preset)
        assert meta == cv_meta
        nh, nw = meta.img_shape
        alone = (
            F.interpolate(img[None].float(), size=(nh, nw), mode="bilinear", align_corners=False)
            .round()
            .clamp(0, 255)[0]
        )
        assert torch.equal(out[:, :nh, :nw], alone)
        assert not out[:, nh:, :].any() and not out[:, :, nw:].any()
    with pytest.raises(ValueError, match="one padded size"):
        resize_pad_decoded(decoded[:2], get_preset("mmdet"))


def test_detections_to_host_packs_one_copy_and_keeps_everything():
    from paadet.postprocess import Candidates, PostprocessConfig, multiclass_nms
    from paadet.runtime.torch_backend import detections_to_host

    gen = torch.Generator().manual_seed(1)
    ctr = torch.rand(2, 300, 2, generator=gen) * 300
    boxes = torch.cat([ctr, ctr + 20 + torch.rand(2, 300, 2, generator=gen) * 40], -1)
    scores = torch.rand(2, 300, 80, generator=gen) ** 3
    scores[1, 12:] = 0.0  # image 1: at most 12 anchors x 3 classes
    scores[1, :, 3:] = 0.0
    dets = multiclass_nms(Candidates(boxes, scores), PostprocessConfig())
    host = detections_to_host(dets)
    assert dets.num_dets.tolist()[1] < 100
    for a, b in zip(dets, host, strict=False):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_gpu_report_tables_and_targets(tmp_path):
    """tools/gpu_report.py on a real bench report (its figures set to known values) and gpu_check-shaped
    parity/profile files: the tables carry the figures and the targets are judged."""
    import subprocess
    import sys
    from pathlib import Path

    report = _tiny_report(batch_size=2, iters=1, warmup=0)
    report["batch_size"] = 32
    report["hardware"]["gpu"] = "Test GPU 80GB"
    report["engine"]["images_per_s"] = 1200.0
    report["e2e"]["images_per_s"] = 500.0
    report["e2e"]["stages_ms_per_image"]["postprocess"] = 0.125  # 4 ms per batch of 32
    (tmp_path / "bench_b32.json").write_text(json.dumps(report))
    row = {
        "weights": "dense",
        "preset": "800",
        "variant": "fp16_channels_last",
        "rule": "iou>=0.95",
        "reference": 600,
        "ours": 601,
        "matched": 597,
        "extra": 4,
        "matched_fraction": 597 / 600,
        "pass": True,
    }
    (tmp_path / "parity.json").write_text(json.dumps({"ok": True, "rows": [row]}))
    (tmp_path / "profile_b32.json").write_text(json.dumps({"engine": {"error": "RuntimeError: boom"}}))
    train_rows = [
        {"setting": "recipe 1333x800 b2", "amp": "fp32", "s_per_iter": 0.5, "speedup": 1.0, "n": 10},
        {"setting": "recipe 1333x800 b2", "amp": "fp16", "s_per_iter": 0.2, "speedup": 2.5, "n": 10},
    ]
    (tmp_path / "train_amp.json").write_text(json.dumps({"device": "cuda", "rows": train_rows}))
    tool = Path(__file__).resolve().parents[1] / "tools" / "gpu_report.py"
    out = subprocess.run([sys.executable, str(tool), str(tmp_path)], capture_output=True, text=True, check=True).stdout
    assert "| Test GPU 80GB | 32 | fp32 | 1,200.0 | 500.0 | 4.00 |" in out
    assert "dense 597/600 (99.50%)" in out
    assert "| engine images per s >= 1,000 | 1,200.0 | met |" in out
    assert "| e2e images per s >= 600 | 500.0 | missed by 17% |" in out
    assert "| post-processing < 5 ms | 4.00 (in e2e) | met |" in out
    assert "network profile: RuntimeError: boom" in out
    assert "| recipe 1333x800 b2 | fp16 | 0.200 | 2.50 | 10 |" in out
    assert "Not read: variants_b32.json (FileNotFoundError), bench_b1.json" in out
    bad = subprocess.run([sys.executable, str(tool), str(tmp_path / "nope")], capture_output=True, text=True)
    assert bad.returncode == 2 and "no such folder" in bad.stderr


def test_choose_fastest_takes_the_lower_median(tmp_path):
    """The auto probe picks the backend whose timed calls are faster, and reports every candidate."""
    import time

    from paadet.bench.auto import choose_fastest

    class Sleeper:
        def __init__(self, seconds):
            self.seconds, self.calls = seconds, 0

        def infer(self, images, metas, timer=None):
            self.calls += 1
            time.sleep(self.seconds)

    path = tmp_path / "a.jpg"
    cv2.imwrite(str(path), synthetic_image(40, 50, seed=0))
    slow, fast = Sleeper(0.03), Sleeper(0.001)
    chosen, report = choose_fastest({"slow": slow, "fast": fast}, [path], TINY, rounds=3)
    assert chosen == "fast" and report["chosen"] == "fast"
    assert report["candidates_ms"]["slow"] >= 30 > report["candidates_ms"]["fast"]
    assert slow.calls == fast.calls == 4  # one warm-up and three timed calls each
