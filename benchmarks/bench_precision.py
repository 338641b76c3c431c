"""Reduced precision judged by AP: the trained stand-in evaluated in every precision paadet offers here.

    python benchmarks/bench_precision.py --standin DIR [--json FILE] [--modes torch-fp32,torch-bf16,...]

``DIR`` is the output of ``tools/train_standin.py`` (``standin.pth``, ``val/annotations.json``,
``val/images/``). Each mode runs paadet's own evaluation (``paadet.evaluation.run.evaluate_detector``, the code
behind ``paadet eval``) over the stand-in's val split, in this one process, one after another:

* ``torch-fp32``: the torch backend, float32 (the reference of every difference below);
* ``torch-bf16``: the torch backend under bfloat16 autocast (``paadet eval --bf16``; AVX512-BF16 or AMX on the CPU);
* ``ort-fp32`` / ``ort-fp16``: ``paadet export`` graphs (fp32, and ``--fp16``) on ONNX Runtime's CPU
  provider (``paadet eval --backend onnxruntime --model ...``);
* ``ov-f32`` / ``ov-bf16``: the fp32 graph on OpenVINO's CPU plugin (``--backend openvino --precision f32|bf16``);
* ``ov-int8`` / ``ort-int8``: the graph quantised by ``paadet quantize`` (NNCF, calibrated on 300 images of
  the stand-in's *train* split, never on val) on OpenVINO and on ONNX Runtime;
* ``ov-int8-ortq`` / ``ort-int8-ortq``: the same with ``paadet quantize --method ort`` (ONNX Runtime's
  static quantiser), to choose the default method;
* ``torch-fp16``: the torch backend under float16 autocast, only on CUDA (``--device cuda``).

For each: AP (and AP50, AP75), its difference from fp32 in AP points, the fraction of the fp32 detections
that the mode reproduces under the FP16 rule (same label, IoU >= 0.95, |score difference| <= 0.01, per
image; ``paadet.compare.match_detections``), the extra detections, and images/s of the evaluation
(whole pipeline: decode, resize, network, post-processing). Graphs are exported into ``DIR/precision/``.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import shutil
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from paadet import DetectorSpec
from paadet.compare import MatchReport, match_detections
from paadet.data.coco import CocoDataset
from paadet.detector import Detector
from paadet.evaluation.run import evaluate_detector
from paadet.fileio import atomic_write_json
from paadet.runtime.registry import model_classes

FP16_RULE = {"iou_thr": 0.95, "score_tol": 1e-2}
"""The export issue's FP16 parity rule (docs/benchmarks.md)."""

CPU_MODES = (
    "torch-fp32",
    "torch-bf16",
    "ort-fp32",
    "ort-fp16",
    "ov-f32",
    "ov-bf16",
    "ov-int8",
    "ort-int8",
    "ov-int8-ortq",
    "ort-int8-ortq",
)
CALIBRATION_IMAGES = 300


def _by_image(detections: list[dict]) -> dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """COCO results (``bbox`` xywh) -> per image id: xyxy boxes, scores, category ids."""
    grouped: dict[int, list[dict]] = defaultdict(list)
    for d in detections:
        grouped[int(d["image_id"])].append(d)
    out = {}
    for image_id, dets in grouped.items():
        xywh = np.array([d["bbox"] for d in dets], np.float64).reshape(-1, 4)
        out[image_id] = (
            np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1),
            np.array([d["score"] for d in dets]),
            np.array([d["category_id"] for d in dets]),
        )
    return out


def match_runs(reference: list[dict], ours: list[dict], image_ids: list[int], **rule: float) -> MatchReport:
    """How many of ``reference``'s detections ``ours`` reproduces, image by image, under ``rule``."""
    ref, mine = _by_image(reference), _by_image(ours)
    empty = (np.zeros((0, 4)), np.zeros(0), np.zeros(0))
    total = MatchReport()
    for image_id in image_ids:
        total += match_detections(*ref.get(image_id, empty), *mine.get(image_id, empty), **rule)
    return total


def _detector(mode: str, standin: Path, work: Path, device: str):
    weights = standin / "standin.pth"
    if mode.startswith("torch-"):
        precision = mode.split("-", 1)[1]
        return Detector.from_spec(
            DetectorSpec(
                checkpoint=str(weights), device=device, batch_size=1, fp16=precision == "fp16", bf16=precision == "bf16"
            )
        )
    from paadet.export import export_onnx

    fp16 = mode == "ort-fp16"
    graph = work / f"standin_{'fp16' if fp16 else 'fp32'}.onnx"
    if _stale(graph, weights):  # (re-)export for these weights
        export_onnx(str(weights), graph, preset=None, fp16=fp16, dynamic_batch=True)
    if "int8" in mode:
        method = "ort" if mode.endswith("-ortq") else "nncf"
        int8 = work / f"standin_int8_{method}.onnx"
        if _stale(int8, weights):
            from paadet.export.quantize import quantize_export

            logging.getLogger("nncf").setLevel(logging.WARNING)
            report = quantize_export(
                graph, standin / "train" / "images", int8, method=method, max_images=CALIBRATION_IMAGES, progress=False
            )
            print(report, file=sys.stderr)
        graph = int8
    if mode.startswith("ov-"):
        return Detector.from_spec(
            DetectorSpec(
                backend="openvino", model=str(graph), batch_size=1, precision="bf16" if mode == "ov-bf16" else "f32"
            )
        )
    return Detector.from_spec(DetectorSpec(backend="onnxruntime", model=str(graph), batch_size=1, fp16=fp16))


def _stale(path: Path, weights: Path) -> bool:
    return not path.is_file() or path.stat().st_mtime < weights.stat().st_mtime


def run(standin: Path, modes: list[str], device: str) -> dict:
    ann, images = standin / "val" / "annotations.json", standin / "val" / "images"
    work = standin / "precision"
    work.mkdir(exist_ok=True)
    dataset = CocoDataset.load(
        ann, images, classes=model_classes(DetectorSpec(checkpoint=str(standin / "standin.pth")))
    )
    rows, detections = [], {}
    for mode in modes:
        detector = _detector(mode, standin, work, device)
        out = work / mode
        shutil.rmtree(out, ignore_errors=True)  # this script's own folder: each run evaluates afresh
        start = time.perf_counter()
        report = evaluate_detector(detector, dataset, output_dir=out, progress=False)
        wall = time.perf_counter() - start
        detections[mode] = json.loads((out / "detections.json").read_text())
        m = report.metrics.to_json()
        rows.append(
            {
                "mode": mode,
                "AP": m["AP"],
                "AP50": m["AP50"],
                "AP75": m["AP75"],
                "images_per_s": report.timings.get("images_per_second"),
                "network_ms": report.timings.get("ms_per_image", {}).get("network"),
                "wall_s": wall,
                "backend": report.backend,
            }
        )
        print(f"{mode}: AP {m['AP']:.4f} in {wall:.1f} s", file=sys.stderr, flush=True)
    ref = next((r for r in rows if r["mode"] == "torch-fp32"), rows[0])
    image_ids = list(dataset.image_ids)
    for row in rows:
        match = match_runs(detections[ref["mode"]], detections[row["mode"]], image_ids, **FP16_RULE)
        row.update(
            AP_diff_points=100 * (row["AP"] - ref["AP"]),
            matched_fraction=match.matched_fraction,
            reference_detections=match.reference,
            detections=match.ours,
            extra=match.extra,
        )
    return {
        "reference": ref["mode"],
        "rule": FP16_RULE,
        "rows": rows,
        "images": len(image_ids),
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


def table(result: dict) -> str:
    lines = [
        "| mode | AP | AP50 | AP75 | AP - fp32 (points) | fp32 detections matched (FP16 rule) "
        "| extra | img/s | network ms/img |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['mode']} | {r['AP']:.4f} | {r['AP50']:.4f} | {r['AP75']:.4f} | {r['AP_diff_points']:+.2f} | "
            f"{100 * r['matched_fraction']:.2f}% of {r['reference_detections']} | {r['extra']} | "
            f"{r['images_per_s'] or 0:.2f} | {r['network_ms'] or 0:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--standin", type=Path, required=True, metavar="DIR", help="output folder of tools/train_standin.py")
    p.add_argument(
        "--modes", default=None, help=f"comma-separated (default: {','.join(CPU_MODES)}, plus torch-fp16 on CUDA)"
    )
    p.add_argument("--device", default="cpu", help="device of the torch modes (default: cpu)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)
    if not (args.standin / "standin.pth").is_file():
        raise SystemExit(
            f"{args.standin}: no standin.pth; make it with `python tools/train_standin.py --output-dir {args.standin}`"
        )
    modes = (
        args.modes.split(",")
        if args.modes
        else list(CPU_MODES) + (["torch-fp16"] if args.device.startswith("cuda") else [])
    )
    result = run(args.standin, modes, args.device)
    print(table(result))
    if args.json is not None:
        atomic_write_json(args.json, result, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
