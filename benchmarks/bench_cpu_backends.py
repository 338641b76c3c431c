"""Every CPU backend and precision side by side, with mmdetection in the same run: end-to-end images/s on the
same JPEG files, the fraction of the machine's measured peak that the network reaches, and where the time goes.

    python benchmarks/bench_cpu_backends.py --num-images 6 --presets mmdet,800 --json cpu_backends.json
    python benchmarks/bench_cpu_backends.py --depths 50,101 --num-images 4 --presets mmdet --modes torch-fp32,ort-fp32

Contenders (``--modes``; each after one untimed warm-up image, batch 1, ``paadet predict``'s code path:
JPEG files -> COCO results JSON on disk, two decoding threads ahead of the network):

* ``torch-fp32`` / ``torch-bf16``: the torch backend (``paadet predict``; ``--bf16`` = bfloat16 autocast);
* ``ort-fp32``: a ``paadet export`` graph of the same weights on ONNX Runtime (all graph optimisations):
  the baseline of the ``x ort`` ratios;
* ``ov-f32`` / ``ov-bf16``: the same graph on OpenVINO (``--backend openvino --precision f32|bf16``);
* ``ov-int8`` / ``ort-int8``: that graph quantised by ``paadet quantize`` (NNCF; calibrated on the timed
  images themselves: these random weights are for speed only, AP is judged on the stand-in by
  ``bench_precision.py``) on OpenVINO and ONNX Runtime;
* ``ov-f32-s2`` / ``ov-bf16-s2`` / ``ov-int8-s2`` (asked by name): the same on 2 OpenVINO streams
  (``--streams 2``: two images in flight, the threads split between them);
* ``mmdet``: ``mmdet.apis.inference_detector(model, path)`` per file (mmcv decoding, mmdet's test pipeline,
  the model, its post-processing) in the mmdetection environment (``--mmdet-python``), as a subprocess.

Weights: ``paadet.model.seeded.seeded_state_dict`` (``--weights dense``: thousands of candidates per image, so NMS
and score voting work hard; ``sparse``: a few dozen), saved once as an mmdetection checkpoint per backbone depth
(``--depths 50,101``: R-50 and R-101 in the same run, each against mmdetection's ``paa_r<depth>_fpn_1x_coco``).
Detections of every contender are matched against mmdetection's (same label, IoU >= 0.99, |score difference| <= 1e-4).

**Peak.** Measured, not taken from a data sheet (this VM reports no clock): the best GFLOP/s of a large kernel in
each precision on all cores (fp32 and bf16: ``torch.mm`` on 2048- and 4096-square matrices and a 3x3 convolution,
oneDNN; int8: ONNX Runtime's ``MatMulInteger``, uint8 x int8 -> int32, MLAS's VNNI kernel, 2048 and 4096), counting
2 operations per multiply-add. The network's operations are counted by ``torch.utils.flop_counter`` on the padded
input of each image; the fraction of peak is (operations / the ``network`` stage's time) / the precision's peak.
For the exported graphs the ``network`` stage is the whole graph call (in-graph normalisation, decoding, NMS and
score voting included), so their fraction is a lower bound.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from paadet.model.seeded import SEEDED_WEIGHTS

MMDET_PRESETS = {"mmdet": ((1333, 800), 32), "800": ((800, 800), 800)}  # preset -> (Resize scale, pad divisor)
WEIGHTS = SEEDED_WEIGHTS


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (other work on the machine skews CPU timings)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def run_paadet(name: str, detector, folder: Path, files: list[Path], out_json: Path) -> dict[str, Any]:
    """Time ``paadet predict``'s path over ``folder`` after one warm-up image."""
    from paadet.predict import predict_files

    warm = time.perf_counter()
    detector.predict([str(files[0])])
    warmup_seconds = time.perf_counter() - warm
    start, cpu_start = time.perf_counter(), time.process_time()
    done, skipped, timer = predict_files([str(folder)], str(out_json), detector, progress=False)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    if skipped:
        raise RuntimeError(f"{name}: {skipped} files skipped")
    return {
        "name": name,
        "images": done,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "images_per_s": done / seconds,
        "ms_per_image": 1000.0 * seconds / done,
        "stages_ms_per_image": timer.ms_per_image(done),
        "stages_note": "decode and preprocess run in 2 threads ahead of the network, so stages overlap",
        "backend": detector.backend.describe(),
        "warmup_seconds_untimed": warmup_seconds,
    }


def paadet_detections(results_json: Path, folder: Path) -> dict[str, tuple]:
    """COCO results JSON -> ``{file name: (boxes xyxy, scores, labels)}``."""
    import numpy as np

    from paadet.classes import LABEL_OF_CATEGORY

    per_file: dict[str, list] = {p.name: [] for p in folder.iterdir()}
    for entry in json.loads(results_json.read_text()):
        x, y, w, h = entry["bbox"]
        per_file[entry["file_name"]].append(
            (x, y, x + w, y + h, entry["score"], LABEL_OF_CATEGORY[entry["category_id"]])
        )
    out = {}
    for name, rows in per_file.items():
        arr = np.asarray(rows, np.float64).reshape(-1, 6)
        out[name] = (arr[:, :4], arr[:, 4], arr[:, 5].astype(np.int64))
    return out


def parity(reference: dict[str, dict], ours: dict[str, tuple]) -> dict[str, Any]:
    """Match ``ours`` against mmdetection's detections (IoU >= 0.99, |score diff| <= 1e-4, same label)."""
    from paadet.compare import MatchReport, match_detections

    total = MatchReport()
    for name, ref in reference.items():
        boxes, scores, labels = ours[name]
        total += match_detections(ref["boxes"], ref["scores"], ref["labels"], boxes, scores, labels)
    return {
        "reference": total.reference,
        "matched": total.matched,
        "extra": total.extra,
        "matched_fraction": total.matched_fraction,
    }


def mmdet_command(
    python: str,
    folder: Path,
    checkpoint: Path,
    preset: str,
    out: Path,
    threads: int | None = None,
    whole: bool = False,
    depth: int = 50,
) -> list[str]:
    """This script's ``--mmdet-worker`` command line under ``python``."""
    cmd = [
        python,
        os.path.abspath(__file__),
        "--mmdet-worker",
        "--images-dir",
        str(folder),
        "--checkpoint",
        str(checkpoint),
        "--preset",
        preset,
        "--worker-out",
        str(out),
        "--depth",
        str(depth),
    ]
    if threads is not None:
        cmd += ["--threads", str(threads)]
    return cmd + (["--whole"] if whole else [])


def run_mmdet_subprocess(
    python: str, folder: Path, checkpoint: Path, preset: str, out: Path, threads: int | None = None, depth: int = 50
) -> dict[str, Any]:
    """Run this script's ``--mmdet-worker`` mode under ``python`` and read its JSON."""
    proc = subprocess.run(
        mmdet_command(python, folder, checkpoint, preset, out, threads, depth=depth), capture_output=True, text=True
    )
    if proc.returncode != 0:
        tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
        raise RuntimeError(f"mmdetection worker failed ({python}): {tail}")
    return json.loads(out.read_text())


def mmdet_worker(folder: Path, checkpoint: Path, preset: str, out: Path, whole: bool = False, depth: int = 50) -> None:
    """In the mmdetection environment: time ``inference_detector`` per file (config ``paa_r<depth>_fpn_1x_coco``),
    profile its parts, write JSON."""
    import functools
    import platform

    import mmcv
    import mmdet
    import torch
    from mmdet.apis import inference_detector, init_detector
    from mmengine.config import Config

    scale, divisor = MMDET_PRESETS[preset]
    config = f"paa_r{depth}_fpn_1x_coco.py"
    cfg = Config.fromfile(os.path.join(os.path.dirname(mmdet.__file__), ".mim/configs/paa", config))
    cfg.model.backbone.init_cfg = None
    cfg.model.data_preprocessor.pad_size_divisor = divisor
    for step in cfg.test_dataloader.dataset.pipeline:
        if step["type"] == "Resize":
            step["scale"] = scale
    model = init_detector(cfg, str(checkpoint), device="cpu")
    parts = {"backbone_neck": 0.0, "head_forward": 0.0, "postprocess": 0.0}

    def timed(name, fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                parts[name] += time.perf_counter() - start

        return wrapper

    model.extract_feat = timed("backbone_neck", model.extract_feat)
    model.bbox_head.forward = timed("head_forward", model.bbox_head.forward)
    model.bbox_head.predict_by_feat = timed("postprocess", model.bbox_head.predict_by_feat)

    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg"))
    with torch.no_grad():
        if not whole:  # the whole-command run has no warm-up: a user's script would not have one
            inference_detector(model, str(files[0]))
        for key in parts:
            parts[key] = 0.0
        detections = {}
        start, cpu_start = time.perf_counter(), time.process_time()
        for path in files:
            pred = inference_detector(model, str(path)).pred_instances
            detections[path.name] = {
                "boxes": pred.bboxes.tolist(),
                "scores": pred.scores.tolist(),
                "labels": pred.labels.tolist(),
            }
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    n = len(files)
    stages = {k: 1000.0 * v / n for k, v in parts.items()}
    stages["pipeline_and_rest"] = 1000.0 * seconds / n - sum(stages.values())
    out.write_text(
        json.dumps(
            {
                "name": f"mmdetection inference_detector ({config})",
                "images": n,
                "seconds": seconds,
                "cpu_seconds": cpu_seconds,
                "images_per_s": n / seconds,
                "ms_per_image": 1000.0 * seconds / n,
                "stages_ms_per_image": stages,
                "stages_note": "pipeline_and_rest = decoding, resizing, normalising (mmdet's data pipeline) and glue",
                "versions": {
                    "mmdet": mmdet.__version__,
                    "mmcv": mmcv.__version__,
                    "torch": torch.__version__,
                    "python": platform.python_version(),
                },
                "torch_threads": torch.get_num_threads(),
                "detections": detections,
            }
        )
    )


MODES = ("torch-fp32", "torch-bf16", "ort-fp32", "ov-f32", "ov-bf16", "ov-int8", "ort-int8")
STREAM_MODES = ("ov-f32-s2", "ov-bf16-s2", "ov-int8-s2")
"""OpenVINO with 2 streams (``--streams 2``: two images in flight, each on one of the threads); asked by name."""
PRECISION_OF = {
    "torch-fp32": "fp32",
    "torch-bf16": "bf16",
    "ort-fp32": "fp32",
    "ov-f32": "fp32",
    "ov-bf16": "bf16",
    "ov-int8": "int8",
    "ort-int8": "int8",
}


def split_mode(mode: str) -> tuple[str, int]:
    """``("ov-bf16", 2)`` for ``ov-bf16-s2``; ``(mode, 1)`` for a mode without streams."""
    base, _, streams = mode.rpartition("-s")
    return (base, int(streams)) if base and streams.isdigit() else (mode, 1)


def measure_peaks(repeats: int = 5) -> dict[str, Any]:
    """The best GFLOP/s of a few large kernels in fp32, bf16 (torch / oneDNN) and int8 (ONNX Runtime / MLAS).

    fp32 and bf16: ``torch.mm`` on 2048- and 4096-square matrices and a 3x3 convolution 256 -> 256 channels on
    a 200x200 map; int8: ``MatMulInteger`` (uint8 x int8 -> int32) on 2048- and 4096-square matrices. Each
    kernel's best of ``repeats`` calls; the precision's peak is its best kernel.
    """
    import numpy as np
    import torch

    out: dict[str, Any] = {
        "how": "best kernel of: mm 2048^3, mm 4096^3, conv3x3 256->256 on 200x200 (torch, fp32/bf16); "
        "MatMulInteger 2048^3 and 4096^3 (onnxruntime, int8); 2 ops per multiply-add, all cores",
        "kernels": {},
    }
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        for size in (2048, 4096):
            a, b = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)
            torch.mm(a, b)
            out["kernels"][f"{name} mm {size}"] = (
                2.0 * size**3 / min(_timed(lambda a=a, b=b: torch.mm(a, b)) for _ in range(repeats)) / 1e9
            )
        x, w = torch.randn(1, 256, 200, 200).to(dtype), torch.randn(256, 256, 3, 3).to(dtype)
        conv = lambda x=x, w=w: torch.nn.functional.conv2d(x, w, padding=1)  # noqa: E731
        conv()
        out["kernels"][f"{name} conv3x3"] = (
            2.0 * 256 * 256 * 9 * 200 * 200 / min(_timed(conv) for _ in range(repeats)) / 1e9
        )
        out[name] = max(v for k, v in out["kernels"].items() if k.startswith(name))
    try:
        import onnxruntime as ort
        from onnx import TensorProto, helper

        for size in (2048, 4096):
            graph = helper.make_graph(
                [helper.make_node("MatMulInteger", ["a", "b"], ["c"])],
                "int8_gemm",
                [
                    helper.make_tensor_value_info("a", TensorProto.UINT8, [size, size]),
                    helper.make_tensor_value_info("b", TensorProto.INT8, [size, size]),
                ],
                [helper.make_tensor_value_info("c", TensorProto.INT32, [size, size])],
            )
            model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
            session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
            rng = np.random.default_rng(0)
            feeds = {
                "a": rng.integers(0, 255, (size, size), dtype=np.uint8),
                "b": rng.integers(-127, 127, (size, size), dtype=np.int8),
            }
            session.run(None, feeds)
            best = min(_timed(lambda session=session, feeds=feeds: session.run(None, feeds)) for _ in range(repeats))
            out["kernels"][f"int8 MatMulInteger {size}"] = 2.0 * size**3 / best / 1e9
        out["int8"] = max(v for k, v in out["kernels"].items() if k.startswith("int8"))
    except ImportError:
        out["int8"] = None
    return out


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def network_gflop(files: list[Path], preset: str, depth: int = 50) -> float:
    """Mean GFLOP (2 per multiply-add) of the network's forward pass over the padded inputs of ``files``."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from paadet.data.images import read_image
    from paadet.model import PAANet
    from paadet.preprocess import resize

    net = PAANet(depth=depth).eval()
    per_shape: dict[tuple[int, int], float] = {}
    total = 0.0
    for path in files:
        _, meta = resize(read_image(path), preset)
        shape = tuple(meta.pad_shape)
        if shape not in per_shape:
            counter = FlopCounterMode(display=False)
            with torch.no_grad(), counter:
                net(torch.zeros(1, 3, *shape))
            per_shape[shape] = counter.get_total_flops() / 1e9
        total += per_shape[shape]
    return total / len(files)


def build_contender(mode: str, checkpoint: Path, graphs: dict[str, Path], preset: str, threads: int | None):
    """The :class:`~paadet.Detector` of one mode."""
    from paadet.detector import Detector

    mode, streams = split_mode(mode)
    if mode.startswith("torch-"):
        return Detector.from_checkpoint(str(checkpoint), preset=preset, device="cpu", bf16=mode == "torch-bf16")
    graph = graphs["int8" if mode.endswith("int8") else "fp32"]
    if mode.startswith("ov-"):
        from paadet.runtime.openvino_backend import OpenVinoBackend

        precision = "bf16" if mode == "ov-bf16" else "f32"
        return Detector(
            OpenVinoBackend.from_file(graph, preset=preset, precision=precision, threads=threads, streams=streams)
        )
    import onnxruntime as ort

    from paadet.runtime.onnxruntime_backend import OnnxRuntimeBackend

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads is not None:
        options.intra_op_num_threads = threads
    return Detector(OnnxRuntimeBackend.from_file(graph, preset=preset, session_options=options))


def make_graphs(checkpoint: Path, folder: Path, preset: str, modes: list[str], tmp: Path) -> dict[str, Any]:
    """The fp32 export of ``checkpoint`` (and its int8 copy when an int8 mode is asked), with their times."""
    import logging

    from paadet.export import export_onnx

    out: dict[str, Any] = {}
    if not any(m.startswith(("ort-", "ov-")) for m in modes):
        return out
    start = time.perf_counter()
    out["fp32"] = tmp / f"paa_{preset}.onnx"
    export_onnx(str(checkpoint), out["fp32"], preset=preset, batch_size=1, verify=False)
    out["export_seconds"] = time.perf_counter() - start
    if any(split_mode(m)[0].endswith("int8") for m in modes):
        from paadet.export.quantize import quantize_export

        logging.getLogger("nncf").setLevel(logging.WARNING)
        start = time.perf_counter()
        out["int8"] = tmp / f"paa_{preset}_int8.onnx"
        quantize_export(out["fp32"], folder, out["int8"], method="nncf", progress=False)
        out["quantize_seconds"] = time.perf_counter() - start
    return out


WHOLE_MODES = ("ort-fp32", "ov-f32", "ov-bf16", "ov-int8", *STREAM_MODES)


def predict_command(
    mode: str, folder: Path, checkpoint: Path, graphs: dict[str, Any], preset: str, out: Path
) -> list[str]:
    """The ``paadet predict`` command line a user would type for ``mode``."""
    cmd = [sys.executable, "-m", "paadet", "predict", str(folder), "--output", str(out), "--no-progress"]
    mode, streams = split_mode(mode)
    if streams != 1:
        cmd += ["--streams", str(streams)]
    if mode.startswith("torch-"):
        return (
            cmd + ["--checkpoint", str(checkpoint), "--preset", preset] + (["--bf16"] if mode == "torch-bf16" else [])
        )
    graph = graphs["int8" if mode.endswith("int8") else "fp32"]
    if mode.startswith("ov-"):
        return [
            *cmd,
            "--backend",
            "openvino",
            "--model",
            str(graph),
            "--precision",
            "bf16" if mode == "ov-bf16" else "f32",
        ]
    return [*cmd, "--backend", "onnxruntime", "--model", str(graph)]


def _timed_run(cmd: list[str], env: dict[str, str] | None, what: str) -> float:
    """Wall seconds of one subprocess ``cmd``; a failure raises with its last stderr line."""
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{what} ({' '.join(cmd)}) failed: {proc.stderr.strip().splitlines()[-1:]}")
    return seconds


def whole_commands(
    folder: Path,
    checkpoint: Path,
    graphs: dict[str, Any],
    preset: str,
    modes: list[str],
    mmdet_python: str | None,
    threads: int | None,
    tmp: Path,
    repeats: int = 1,
    depth: int = 50,
) -> dict[str, Any]:
    """Wall seconds of each whole command (process start, imports, model load or compilation, every image):
    ``repeats`` rounds, every command once per round in turn, the order rotated by one each round; the median
    of each kept."""
    import statistics

    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    commands: dict[str, tuple[list[str], dict[str, str] | None, str]] = {}
    for mode in (m for m in WHOLE_MODES if m in modes):
        cmd = predict_command(mode, folder, checkpoint, graphs, preset, tmp / f"whole_{mode}.json")
        commands[mode] = (cmd, env, " ".join(cmd[2:]))
    if mmdet_python is not None:
        cmd = mmdet_command(
            mmdet_python, folder, checkpoint, preset, tmp / "whole_mmdet.json", threads, whole=True, depth=depth
        )
        commands["mmdet"] = (cmd, None, "python: init_detector + inference_detector per file (no warm-up)")
    times: dict[str, list[float]] = {name: [] for name in commands}
    names = list(commands)
    for round_index in range(repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            cmd, cmd_env, _text = commands[name]
            times[name].append(_timed_run(cmd, cmd_env, name))
    out: dict[str, Any] = {
        name: {"seconds": statistics.median(times[name]), "all_seconds": times[name], "command": text}
        for name, (_cmd, _env, text) in commands.items()
    }
    if "mmdet" in out:
        for mode, entry in out.items():
            entry["speedup_vs_mmdet"] = out["mmdet"]["seconds"] / entry["seconds"]
            entry["speedups_vs_mmdet_per_round"] = [m / t for m, t in zip(times["mmdet"], times[mode], strict=False)]
    return out


def compare(
    num_images: int,
    preset: str,
    weights: str,
    mmdet_python: str | None,
    modes: list[str],
    threads: int | None,
    peaks: dict[str, Any],
    whole_repeats: int = 1,
    whole_only: bool = False,
    depth: int = 50,
) -> dict[str, Any]:
    """Run every contender of one preset on the same files and weights (an R-``depth`` backbone); return that
    preset's report (``whole_only``: the whole commands alone, ``whole_repeats`` rounds of them)."""
    import torch

    from paadet.bench.images import write_generated_images
    from paadet.model.seeded import seeded_state_dict

    seed, cls_bias = WEIGHTS[weights]
    report: dict[str, Any] = {
        "preset": preset,
        "depth": depth,
        "num_images": num_images,
        "load_average_before": load_average(),
        "contenders": {},
    }
    with tempfile.TemporaryDirectory(prefix="paadet-cpu-backends-") as tmp:
        tmp_path = Path(tmp)
        folder = tmp_path / "images"
        files = write_generated_images(folder, num_images)
        checkpoint = tmp_path / f"seeded{seed}_r{depth}.pth"
        state_dict = seeded_state_dict(seed, cls_bias=cls_bias, depth=depth)
        torch.save({"meta": {"seed": seed, "cls_bias": cls_bias}, "state_dict": state_dict}, checkpoint)
        report["images"] = sorted({f"{w}x{h}" for h, w in (_size(p) for p in files)})
        gflop = None if whole_only or not peaks else network_gflop(files, preset, depth)
        report["network_gflop_per_image"] = gflop
        graphs = make_graphs(checkpoint, folder, preset, modes, tmp_path)
        report["untimed"] = {k: v for k, v in graphs.items() if k.endswith("_seconds")}
        contenders, ours = report["contenders"], {}
        for mode in [] if whole_only else modes:
            detector = build_contender(mode, checkpoint, graphs, preset, threads)
            result = run_paadet(f"paadet {mode}", detector, folder, files, tmp_path / f"{mode}.json")
            network_ms = result["stages_ms_per_image"].get("network")
            base_mode, streams = split_mode(mode)
            peak = peaks.get(PRECISION_OF[base_mode])
            if network_ms and peak:
                # with streams the network stage sums overlapping calls: take the wall rate (a lower bound) instead
                achieved = gflop / (network_ms / 1000.0) if streams == 1 else gflop * result["images_per_s"]
                result["network_gflops"] = achieved
                result["fraction_of_peak"] = achieved / peak
            contenders[mode] = result
            ours[mode] = paadet_detections(tmp_path / f"{mode}.json", folder)
            del detector
        if mmdet_python is not None and not whole_only:
            mm = run_mmdet_subprocess(
                mmdet_python, folder, checkpoint, preset, tmp_path / "mmdet.json", threads, depth=depth
            )
            reference = mm.pop("detections")
            if gflop and peaks:
                network_ms = mm["stages_ms_per_image"]["backbone_neck"] + mm["stages_ms_per_image"]["head_forward"]
                mm["network_gflops"] = gflop / network_ms * 1000.0
                mm["fraction_of_peak"] = mm["network_gflops"] / peaks["fp32"]
            contenders["mmdet"] = mm
            for mode, dets in ours.items():
                contenders[mode]["parity_vs_mmdet"] = parity(reference, dets)
        report["whole_command"] = (
            whole_commands(
                folder, checkpoint, graphs, preset, modes, mmdet_python, threads, tmp_path, whole_repeats, depth
            )
            if whole_repeats
            else {}
        )
    ratios: dict[str, float] = {}
    if "ort-fp32" in contenders:
        base = contenders["ort-fp32"]["images_per_s"]
        ratios.update({f"{m} / ort-fp32": c["images_per_s"] / base for m, c in contenders.items() if m != "ort-fp32"})
    if "mmdet" in contenders:
        base = contenders["mmdet"]["images_per_s"]
        ratios.update({f"{m} / mmdet": c["images_per_s"] / base for m, c in contenders.items() if m != "mmdet"})
    report["ratios"] = ratios
    report["load_average_after"] = load_average()
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-images", type=int, default=6, help="generated JPEGs to time per preset (default 6)")
    parser.add_argument("--presets", default="mmdet,800", help="comma-separated presets (default: mmdet,800)")
    parser.add_argument(
        "--depths",
        default="50",
        help="comma-separated backbone depths, 50 and/or 101, each against mmdetection's paa_r<depth>_fpn_1x_coco "
        "(default: 50)",
    )
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated (default: {','.join(MODES)})")
    parser.add_argument(
        "--weights",
        choices=tuple(WEIGHTS),
        default="dense",
        help="seeded random weights: dense (thousands of candidates per image, default) or sparse",
    )
    parser.add_argument("--mmdet-python", default="/tmp/mmref/bin/python", help="python of the mmdetection environment")
    parser.add_argument("--no-mmdet", action="store_true", help="skip the mmdetection baseline")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for every contender (default: each library's own, all cores)",
    )
    parser.add_argument(
        "--whole-repeats",
        type=int,
        default=1,
        help="rounds of the whole commands, taken in turn; the median is reported (default 1; 0: no whole commands)",
    )
    parser.add_argument(
        "--whole-only", action="store_true", help="time only the whole commands (no in-process contenders, no peaks)"
    )
    parser.add_argument(
        "--no-peaks",
        action="store_true",
        help="skip measuring the CPU's peak GFLOP/s and the network's fraction of it (minutes on a busy machine)",
    )
    parser.add_argument("--json", default=None, help="write the full report here")
    parser.add_argument("--mmdet-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--preset", choices=tuple(MMDET_PRESETS), default="mmdet", help=argparse.SUPPRESS)
    parser.add_argument("--images-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--whole", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--depth", type=int, default=50, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    if args.mmdet_worker:
        mmdet_worker(args.images_dir, args.checkpoint, args.preset, args.worker_out, whole=args.whole, depth=args.depth)
        return 0
    if args.num_images < 1 or args.whole_repeats < (1 if args.whole_only else 0):
        parser.error("--num-images must be >= 1, --whole-repeats >= 0 (>= 1 with --whole-only)")
    presets, modes = args.presets.split(","), args.modes.split(",")
    for name in presets:
        if name not in MMDET_PRESETS:
            parser.error(f"unknown preset {name!r}; use {', '.join(MMDET_PRESETS)}")
    depths = [int(d) for d in args.depths.split(",") if d.strip().isdigit()]
    if not depths or any(d not in (50, 101) for d in depths) or len(depths) != len(args.depths.split(",")):
        parser.error(f"--depths {args.depths}: comma-separated 50 and/or 101")
    for mode in modes:
        if mode not in MODES + STREAM_MODES:
            parser.error(f"unknown mode {mode!r}; use {', '.join(MODES + STREAM_MODES)}")
    mmdet_python = None if args.no_mmdet else args.mmdet_python
    if mmdet_python is not None and not Path(mmdet_python).is_file():
        parser.error(f"--mmdet-python {mmdet_python}: not found (see ../shared/wheels/README.md), or give --no-mmdet")
    from paadet.bench.run import hardware_info, versions

    peaks = {} if args.whole_only or args.no_peaks else measure_peaks()
    report = {
        "weights": f"{args.weights}: seeded_state_dict{WEIGHTS[args.weights]}",
        "threads": args.threads if args.threads is not None else "library defaults",
        "hardware": hardware_info("cpu"),
        "versions": versions(),
        "peak_gflops": peaks,
        "presets": {
            (name if depth == 50 else f"{name} R{depth}"): compare(
                args.num_images,
                name,
                args.weights,
                mmdet_python,
                modes,
                args.threads,
                peaks,
                args.whole_repeats,
                args.whole_only,
                depth,
            )
            for name in presets
            for depth in depths
        },
    }
    print_report(report)
    if args.json:
        from paadet.fileio import atomic_write_json

        atomic_write_json(args.json, report, indent=2)
        print(f"wrote {args.json}")
    return 0


def _size(path: Path) -> tuple[int, int]:
    import cv2

    h, w = cv2.imread(str(path)).shape[:2]
    return h, w


def print_report(report: dict[str, Any]) -> None:
    hw, peaks = report["hardware"], report["peak_gflops"]
    print(f"CPU: {hw['cpu']}, {hw['cpu_cores_usable']} cores, threads {report['threads']}; weights {report['weights']}")
    if peaks:
        print(
            "measured peak GFLOP/s (best kernel): "
            + ", ".join(f"{k} {peaks[k]:.0f}" for k in ("fp32", "bf16", "int8") if peaks.get(k))
            + "; kernels: "
            + ", ".join(f"{k} {v:.0f}" for k, v in peaks["kernels"].items())
        )
    for rep in report["presets"].values():
        gflop = rep["network_gflop_per_image"]
        arch = f"PAA R{rep.get('depth', 50)}-FPN"
        print(
            f"\n{arch}, preset {rep['preset']}: {rep['num_images']} generated JPEGs {', '.join(rep['images'])}; "
            + (f"network {gflop:.0f} GFLOP/image; " if gflop else "")
            + f"load average before {rep['load_average_before']}, after {rep['load_average_after']}"
        )
        if rep["contenders"]:
            print(f"{'':26s} {'img/s':>7s} {'ms/img':>7s} {'x ort':>6s} {'x mmdet':>7s} {'peak':>5s}  stages ms/image")
        ort = rep["contenders"].get("ort-fp32", {}).get("images_per_s")
        mm = rep["contenders"].get("mmdet", {}).get("images_per_s")
        for mode, c in rep["contenders"].items():
            stages = ", ".join(f"{k} {v:.0f}" for k, v in c["stages_ms_per_image"].items())
            par = c.get("parity_vs_mmdet")
            match = f"  [vs mmdet: matched {par['matched']}/{par['reference']}, {par['extra']} extra]" if par else ""
            fraction = f"{100 * c['fraction_of_peak']:4.0f}%" if c.get("fraction_of_peak") else "    -"
            print(
                f"{mode:26s} {c['images_per_s']:7.3f} {c['ms_per_image']:7.0f} "
                f"{c['images_per_s'] / ort if ort else float('nan'):6.2f} "
                f"{c['images_per_s'] / mm if mm else float('nan'):7.2f} "
                f"{fraction}  {stages}{match}"
            )
        whole = rep.get("whole_command") or {}
        if whole:
            rounds = len(next(iter(whole.values()))["all_seconds"])
            print(
                f"whole command, {rep['num_images']} images (start, imports, model load/compile, every image), "
                f"median of {rounds} round(s): "
                + ", ".join(
                    f"{m} {w['seconds']:.1f} s"
                    + (f" ({w['speedup_vs_mmdet']:.2f}x mmdet)" if "speedup_vs_mmdet" in w else "")
                    for m, w in whole.items()
                )
            )
            if rounds > 1:
                for m, w in whole.items():
                    per_round = ", ".join(f"{t:.1f}" for t in w["all_seconds"])
                    ratios = ", ".join(f"{r:.2f}x" for r in w.get("speedups_vs_mmdet_per_round", []))
                    print(f"  {m}: {per_round} s" + (f" ({ratios})" if ratios else ""))


if __name__ == "__main__":
    sys.exit(main())
