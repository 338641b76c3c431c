"""paadet vs mmdetection on the CPU: end-to-end images per second on the same JPEG files, same run.

What is timed, for each contender, after one warm-up image:

* ``paadet torch``: ``paadet predict``'s code path (:func:`paadet.commands.predict.predict_files` with a
  :class:`~paadet.Detector`, batch 1, two decoding threads): JPEG files -> COCO results JSON on disk.
* ``paadet torch --optimize``: the same with the network traced, frozen and optimised for inference
  (BatchNorm folded, oneDNN); the one-off trace happens in the warm-up image and is reported apart.
* ``paadet onnxruntime`` (when ONNX Runtime is installed): the same, with a full graph exported by
  ``paadet export`` from the same weights (the export itself is not timed), opened as ``--backend
  onnxruntime`` opens it (all graph optimisations) plus the ``--threads`` setting.
* ``mmdetection``: ``mmdet.apis.inference_detector(model, path)`` for each file in turn (mmcv decoding,
  mmdet's test pipeline, the model, its post-processing), in the mmdetection environment given by
  ``--mmdet-python``, run as a subprocess of this script.

All use the same weights: ``paadet.testing.seeded_state_dict`` (``--weights dense``: seed 0, thousands
of candidates per image, so NMS and score voting work hard; ``sparse``: seed 2, a few dozen) saved
once as an mmdetection-format checkpoint, the same generated JPEGs, the same preset, and the CPU threads PyTorch picks by default.
The detections are also compared (``paadet.compare.match_detections``) to show both did the same work.

    python benchmarks/bench_cpu_vs_mmdet.py --num-images 6 --json cpu_vs_mmdet.json
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

from paadet.testing import SEEDED_WEIGHTS

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
    from paadet.commands.predict import predict_files

    warm = time.perf_counter()
    detector.predict([str(files[0])])
    warmup_seconds = time.perf_counter() - warm
    start, cpu_start = time.perf_counter(), time.process_time()
    done, skipped, timer = predict_files([str(folder)], str(out_json), detector, progress=False)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    if skipped:
        raise RuntimeError(f"{name}: {skipped} files skipped")
    return {
        "name": name, "images": done, "seconds": seconds, "cpu_seconds": cpu_seconds, "images_per_s": done / seconds,
        "ms_per_image": 1000.0 * seconds / done, "stages_ms_per_image": timer.ms_per_image(done),
        "stages_note": "decode and preprocess run in 2 threads ahead of the network, so stages overlap",
        "backend": detector.backend.describe(), "warmup_seconds_untimed": warmup_seconds,
    }


def paadet_detections(results_json: Path, folder: Path) -> dict[str, tuple]:
    """COCO results JSON -> ``{file name: (boxes xyxy, scores, labels)}``."""
    import numpy as np

    from paadet.coco import LABEL_OF_CATEGORY

    per_file: dict[str, list] = {p.name: [] for p in folder.iterdir()}
    for entry in json.loads(results_json.read_text()):
        x, y, w, h = entry["bbox"]
        per_file[entry["file_name"]].append((x, y, x + w, y + h, entry["score"], LABEL_OF_CATEGORY[entry["category_id"]]))
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
    return {"reference": total.reference, "matched": total.matched, "extra": total.extra,
            "matched_fraction": total.matched_fraction}


def run_mmdet_subprocess(python: str, folder: Path, checkpoint: Path, preset: str, out: Path,
                         threads: int | None = None) -> dict[str, Any]:
    """Run this script's ``--mmdet-worker`` mode under ``python`` and read its JSON."""
    cmd = [python, os.path.abspath(__file__), "--mmdet-worker", "--images-dir", str(folder),
           "--checkpoint", str(checkpoint), "--preset", preset, "--worker-out", str(out)]
    if threads is not None:
        cmd += ["--threads", str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
        raise RuntimeError(f"mmdetection worker failed ({python}): {tail}")
    return json.loads(out.read_text())


def mmdet_worker(folder: Path, checkpoint: Path, preset: str, out: Path) -> None:
    """In the mmdetection environment: time ``inference_detector`` per file, profile its parts, write JSON."""
    import functools
    import platform

    import mmcv
    import mmdet
    import torch
    from mmdet.apis import inference_detector, init_detector
    from mmengine.config import Config

    scale, divisor = MMDET_PRESETS[preset]
    cfg = Config.fromfile(os.path.join(os.path.dirname(mmdet.__file__), ".mim/configs/paa/paa_r50_fpn_1x_coco.py"))
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
        inference_detector(model, str(files[0]))
        for key in parts:
            parts[key] = 0.0
        detections = {}
        start, cpu_start = time.perf_counter(), time.process_time()
        for path in files:
            pred = inference_detector(model, str(path)).pred_instances
            detections[path.name] = {"boxes": pred.bboxes.tolist(), "scores": pred.scores.tolist(),
                                     "labels": pred.labels.tolist()}
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    n = len(files)
    stages = {k: 1000.0 * v / n for k, v in parts.items()}
    stages["pipeline_and_rest"] = 1000.0 * seconds / n - sum(stages.values())
    out.write_text(json.dumps({
        "name": "mmdetection inference_detector", "images": n, "seconds": seconds, "cpu_seconds": cpu_seconds,
        "images_per_s": n / seconds,
        "ms_per_image": 1000.0 * seconds / n, "stages_ms_per_image": stages,
        "stages_note": "pipeline_and_rest = decoding, resizing, normalising (mmdet's data pipeline) and glue",
        "versions": {"mmdet": mmdet.__version__, "mmcv": mmcv.__version__, "torch": torch.__version__,
                     "python": platform.python_version()},
        "torch_threads": torch.get_num_threads(), "detections": detections,
    }))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-images", type=int, default=6, help="generated JPEGs to time (default 6)")
    parser.add_argument("--preset", choices=tuple(MMDET_PRESETS), default="mmdet", help="pre-processing (default mmdet)")
    parser.add_argument("--weights", choices=tuple(WEIGHTS), default="dense",
                        help="seeded random weights: dense (thousands of candidates per image, default) or sparse")
    parser.add_argument("--mmdet-python", default="/tmp/mmref/bin/python", help="python of the mmdetection environment")
    parser.add_argument("--no-onnx", action="store_true", help="skip the ONNX Runtime contender")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for every contender (torch.set_num_threads, ONNX Runtime intra-op); "
                             "default: each library's own (all cores). 1 avoids thread thrashing on a busy machine")
    parser.add_argument("--json", default=None, help="write the full report here")
    parser.add_argument("--mmdet-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--images-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    if args.mmdet_worker:
        mmdet_worker(args.images_dir, args.checkpoint, args.preset, args.worker_out)
        return 0
    if args.num_images < 1:
        parser.error("--num-images must be >= 1")
    if not Path(args.mmdet_python).is_file():
        parser.error(f"--mmdet-python {args.mmdet_python}: not found (see ../shared/wheels/README.md)")
    report = compare(args.num_images, args.preset, args.weights, args.mmdet_python, not args.no_onnx, args.threads)
    print_report(report)
    if args.json:
        from paadet.fileio import atomic_write_json

        atomic_write_json(args.json, report, indent=2)
        print(f"wrote {args.json}")
    return 0


def compare(num_images: int, preset: str, weights: str, mmdet_python: str, with_onnx: bool,
            threads: int | None = None) -> dict[str, Any]:
    """Run every contender on the same files and weights; return the report."""
    import torch

    from paadet.bench import hardware_info, versions, write_generated_images
    from paadet.detector import Detector
    from paadet.testing import seeded_state_dict

    seed, cls_bias = WEIGHTS[weights]
    report: dict[str, Any] = {"preset": preset, "num_images": num_images, "load_average_before": load_average(),
                              "weights": f"{weights}: seeded_state_dict({seed}, cls_bias={cls_bias})",
                              "threads": threads if threads is not None else "library defaults",
                              "hardware": hardware_info("cpu"), "versions": versions(), "contenders": {}}
    with tempfile.TemporaryDirectory(prefix="paadet-vs-mmdet-") as tmp:
        tmp_path = Path(tmp)
        folder = tmp_path / "images"
        files = write_generated_images(folder, num_images)
        checkpoint = tmp_path / f"seeded{seed}.pth"
        torch.save({"meta": {"seed": seed, "cls_bias": cls_bias},
                    "state_dict": seeded_state_dict(seed, cls_bias=cls_bias)}, checkpoint)
        report["images"] = sorted({f"{w}x{h}" for h, w in (_size(p) for p in files)})
        contenders = report["contenders"]

        detector = Detector.from_checkpoint(str(checkpoint), preset=preset, device="cpu")
        contenders["paadet_torch"] = run_paadet("paadet torch (predict)", detector, folder, files, tmp_path / "torch.json")
        ours = {"paadet_torch": paadet_detections(tmp_path / "torch.json", folder)}
        optimized = Detector.from_checkpoint(str(checkpoint), preset=preset, device="cpu", optimize=True)
        contenders["paadet_torch_optimize"] = run_paadet("paadet torch --optimize (predict)", optimized, folder, files,
                                                         tmp_path / "torch_opt.json")
        ours["paadet_torch_optimize"] = paadet_detections(tmp_path / "torch_opt.json", folder)

        if with_onnx and versions()["onnxruntime"] is not None:
            import onnxruntime as ort

            from paadet.export import export_onnx
            from paadet.runtime.onnxruntime_backend import OnnxRuntimeBackend

            start = time.perf_counter()
            export_onnx(str(checkpoint), tmp_path / "paa.onnx", preset=preset, batch_size=1, verify=False)
            export_seconds = time.perf_counter() - start
            options = ort.SessionOptions()
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            if threads is not None:
                options.intra_op_num_threads = threads
            ort_backend = OnnxRuntimeBackend.from_file(tmp_path / "paa.onnx", preset=preset, session_options=options)
            ort_detector = Detector(ort_backend)
            contenders["paadet_onnxruntime"] = run_paadet("paadet onnxruntime (predict)", ort_detector, folder, files,
                                                          tmp_path / "ort.json")
            contenders["paadet_onnxruntime"]["export_seconds_untimed"] = export_seconds
            ours["paadet_onnxruntime"] = paadet_detections(tmp_path / "ort.json", folder)

        mm = run_mmdet_subprocess(mmdet_python, folder, checkpoint, preset, tmp_path / "mmdet.json", threads)
        reference = mm.pop("detections")
        contenders["mmdet"] = mm
        for key, dets in ours.items():
            contenders[key]["parity_vs_mmdet"] = parity(reference, dets)

    base = contenders["mmdet"]["images_per_s"]
    report["ratios"] = {f"{key}/mmdet": c["images_per_s"] / base for key, c in contenders.items() if key != "mmdet"}
    report["cpu_time_ratios"] = {f"{key}/mmdet": contenders["mmdet"]["cpu_seconds"] / c["cpu_seconds"]
                                 for key, c in contenders.items() if key != "mmdet"}
    if "paadet_onnxruntime" in contenders:
        report["ratios"]["paadet_onnxruntime/paadet_torch"] = (
            contenders["paadet_onnxruntime"]["images_per_s"] / contenders["paadet_torch"]["images_per_s"])
    report["load_average_after"] = load_average()
    return report


def _size(path: Path) -> tuple[int, int]:
    import cv2

    h, w = cv2.imread(str(path)).shape[:2]
    return h, w


def print_report(report: dict[str, Any]) -> None:
    hw = report["hardware"]
    print(f"CPU: {hw['cpu']}, {hw['cpu_cores_usable']} cores, threads {report['threads']}; preset {report['preset']}; weights {report['weights']}; "
          f"{report['num_images']} generated JPEGs {', '.join(report['images'])}; "
          f"load average before {report['load_average_before']}, after {report['load_average_after']}")
    print(f"{'':34s} {'images/s':>9s} {'ms/image':>9s} {'cpu s':>7s}  stages ms/image")
    for c in report["contenders"].values():
        stages = ", ".join(f"{k} {v:.0f}" for k, v in c["stages_ms_per_image"].items())
        par = c.get("parity_vs_mmdet")
        match = f"  [matched {par['matched']}/{par['reference']}, {par['extra']} extra]" if par else ""
        print(f"{c['name']:34s} {c['images_per_s']:9.3f} {c['ms_per_image']:9.0f} {c['cpu_seconds']:7.1f}  {stages}{match}")
    print("throughput ratios (wall clock): " + ", ".join(f"{k} {v:.2f}x" for k, v in report["ratios"].items()))
    print("CPU-time ratios (less sensitive to other load): "
          + ", ".join(f"{k} {v:.2f}x" for k, v in report["cpu_time_ratios"].items()))


if __name__ == "__main__":
    sys.exit(main())
