"""GPU checks for paadet, run by ``scripts/gpu_check.sh`` on a machine with CUDA.

``parity``: detections of the torch backend on CUDA (FP32 with TF32 off, FP16, channels-last, CUDA graphs,
GPU JPEG decoding) against the CPU FP32 results, on generated images, with seeded random weights,
by :func:`paadet.compare.match_detections`: FP32 needs IoU >= 0.99 and |score diff| <= 1e-4, FP16
IoU >= 0.95 and |score diff| <= 1e-2. A variant passes with >= 99.5% (FP32) or >= 97% (FP16) of the
CPU detections matched and no more than 0.5% (FP32) or 3% (FP16) extra. GPU-decoded images differ
from OpenCV's by rounding, so that row is reported, not judged.

``variants``: ``paadet bench`` (engine and e2e) at one batch size, FP16, for each CUDA option alone
and together, so that each one's effect is measured on the same machine in the same process.

``profile``: where the time goes at one batch size: the post-processing alone (batched vs image by
image, kernels and host syncs; ``benchmarks/bench_postprocess.py``) for both weight sets, and the GPU
kernels of one FP16 channels-last network call grouped by kind (convolution, GroupNorm, ...).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch

from paadet.bench import BenchTiming, hardware_info, run_benchmark, versions
from paadet.compare import MatchReport, match_detections
from paadet.data.synthetic import synthetic_image
from paadet.detector import Detector, split_detections
from paadet.errors import one_line
from paadet.fileio import atomic_write_json
from paadet.model import PAANet
from paadet.model.seeded import SEEDED_WEIGHTS, seeded_state_dict
from paadet.runtime.base import StageTimer
from paadet.runtime.spec import DetectorSpec, TorchOptions
from paadet.runtime.torch_backend import TorchBackend, gpu_decode_available

TORCH_OPTION_NAMES = {f.name for f in dataclasses.fields(TorchOptions)}

IMAGES = [(480, 640, 1), (427, 640, 2), (640, 480, 3), (375, 500, 4), (300, 400, 5), (200, 1000, 6)]
WEIGHTS = SEEDED_WEIGHTS
RULES = {"fp32": (0.99, 1e-4, 0.995, 0.005), "fp16": (0.95, 1e-2, 0.97, 0.03)}  # iou, score tol, min matched, max extra
CUDA_VARIANTS = {
    "fp32": dict(fp16=False),
    "fp32_channels_last": dict(fp16=False, channels_last=True),
    "fp16": dict(fp16=True),
    "fp16_channels_last": dict(fp16=True, channels_last=True),
    "fp16_channels_last_cuda_graphs": dict(fp16=True, channels_last=True, cuda_graphs=True),
    "fp16_channels_last_fold_bn": dict(fp16=True, channels_last=True, fold_bn=True),
    "fp16_weights_channels_last_fold_bn": dict(fp16=True, fp16_weights=True, channels_last=True, fold_bn=True),
}


def _error(exc: BaseException) -> str:
    """An exception as one short line for the JSON."""
    return f"{type(exc).__name__}: {one_line(exc)[:300]}"


def _net(weights: str) -> PAANet:
    seed, cls_bias = WEIGHTS[weights]
    net = PAANet()
    net.load_state_dict(seeded_state_dict(seed, cls_bias=cls_bias))
    return net


def _detections(backend: TorchBackend, arrays: list[np.ndarray], batch_size: int) -> list:
    return Detector(backend, batch_size=batch_size, workers=0).predict(arrays)


def _compare(reference: list, ours: list, precision: str) -> dict[str, Any]:
    iou_thr, score_tol, min_matched, max_extra = RULES[precision]
    total = MatchReport()
    for ref, res in zip(reference, ours, strict=False):
        total += match_detections(
            ref.boxes, ref.scores, ref.labels, res.boxes, res.scores, res.labels, iou_thr=iou_thr, score_tol=score_tol
        )
    extra_fraction = total.extra / max(total.reference, 1)
    return {
        "rule": f"iou>={iou_thr}, |score diff|<={score_tol}",
        "reference": total.reference,
        "ours": total.ours,
        "matched": total.matched,
        "extra": total.extra,
        "matched_fraction": total.matched_fraction,
        "pass": total.matched_fraction >= min_matched and extra_fraction <= max_extra,
    }


def parity(out: Path) -> bool:
    """Run every CUDA variant against CPU FP32 for both weight sets and both presets; write ``out``."""
    arrays = [synthetic_image(h, w, seed=s) for h, w, s in IMAGES]
    rows: list[dict[str, Any]] = []
    for weights in WEIGHTS:
        net = _net(weights)
        for preset in ("800", "mmdet"):
            start = time.perf_counter()
            reference = _detections(TorchBackend(net, preset=preset, device="cpu"), arrays, batch_size=1)
            cpu_seconds = time.perf_counter() - start
            for name, options in CUDA_VARIANTS.items():
                row = {"weights": weights, "preset": preset, "variant": name, "cpu_reference_seconds": cpu_seconds}
                try:
                    backend = TorchBackend(net, preset=preset, device="cuda", **options)
                    row.update(
                        _compare(
                            reference, _detections(backend, arrays, batch_size=8), "fp16" if options["fp16"] else "fp32"
                        )
                    )
                except Exception as exc:  # record and go on: the other rows still tell something
                    row.update({"pass": False, "error": _error(exc)})
                rows.append(row)
                print(_line(row), flush=True)
            if preset == "800":
                row = _gpu_decode_row(net, arrays, weights)
                rows.append(row)
                print(_line(row), flush=True)
    ok = all(r["pass"] for r in rows if r.get("judged", True))
    atomic_write_json(
        out,
        {"ok": ok, "rows": rows, "rules": RULES, "hardware": hardware_info("cuda"), "versions": versions()},
        indent=2,
    )
    return ok


def _gpu_decode_row(net: PAANet, arrays: list[np.ndarray], weights: str) -> dict[str, Any]:
    """FP16 with nvJPEG decoding and GPU resizing vs CPU FP32 on the same JPEG files (reported, not judged)."""
    import cv2

    row: dict[str, Any] = {
        "weights": weights,
        "preset": "800",
        "variant": "fp16_channels_last_gpu_decode",
        "judged": False,
    }
    if not gpu_decode_available():
        row.update({"pass": False, "error": "torchvision.io.decode_jpeg is not available"})
        return row
    try:
        encoded = [cv2.imencode(".jpg", a, [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes() for a in arrays]
        decoded = [cv2.imdecode(np.frombuffer(e, np.uint8), cv2.IMREAD_COLOR) for e in encoded]
        reference = _detections(TorchBackend(net, preset="800", device="cpu"), decoded, batch_size=1)
        backend = TorchBackend(net, preset="800", device="cuda", fp16=True, channels_last=True)
        dets, metas = backend.infer_encoded(encoded)
        ours = split_detections(dets, metas, [None] * len(metas))
        row.update(_compare(reference, ours, "fp16"))
    except Exception as exc:
        row.update({"pass": False, "error": _error(exc)})
    return row


def _line(row: dict[str, Any]) -> str:
    head = f"{row['weights']:6s} {row['preset']:5s} {row['variant']:32s}"
    if "error" in row:
        return f"{head} ERROR {row['error']}"
    verdict = "pass" if row["pass"] else ("FAIL" if row.get("judged", True) else "(not judged)")
    return (
        f"{head} matched {row['matched']}/{row['reference']} ({100 * row['matched_fraction']:.2f}%), "
        f"{row['extra']} extra [{row['rule']}] {verdict}"
    )


def variants(out: Path, batch_size: int, iters: int, with_compile: bool) -> None:
    """``run_benchmark`` for each CUDA option at ``batch_size`` (FP16, preset 800); write ``out``."""
    configs: dict[str, dict[str, Any]] = {
        "fp32_tf32_off": dict(fp16=False, channels_last=False),
        "fp32_tf32_channels_last": dict(fp16=False, tf32=True, channels_last=True),
        "fp16": dict(fp16=True, channels_last=False),
        "fp16_no_cudnn_benchmark": dict(fp16=True, channels_last=False, cudnn_benchmark=False),
        "fp16_channels_last": dict(fp16=True, channels_last=True),
        "fp16_channels_last_cuda_graphs": dict(fp16=True, channels_last=True, cuda_graphs=True),
        "fp16_channels_last_cpu_decode": dict(fp16=True, channels_last=True, decode="cpu"),
        "fp16_channels_last_fold_bn": dict(fp16=True, channels_last=True, fold_bn=True),
        "fp16_weights_channels_last": dict(fp16=True, fp16_weights=True, channels_last=True),
        "fp16_weights_channels_last_fold_bn": dict(fp16=True, fp16_weights=True, channels_last=True, fold_bn=True),
        "fp16_weights_channels_last_fold_bn_cuda_graphs": dict(
            fp16=True, fp16_weights=True, channels_last=True, fold_bn=True, cuda_graphs=True
        ),
    }
    if with_compile:
        configs["fp16_channels_last_compile"] = dict(fp16=True, channels_last=True, compile_mode="default")
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        from paadet.bench import write_generated_images

        write_generated_images(tmp, 64)
        for name, options in configs.items():
            start = time.perf_counter()
            try:
                cuda = {k: v for k, v in options.items() if k in TORCH_OPTION_NAMES}
                rest = {k: v for k, v in options.items() if k not in TORCH_OPTION_NAMES and k != "decode"}
                spec = DetectorSpec(
                    backend="torch",
                    preset="800",
                    device="cuda",
                    batch_size=batch_size,
                    cuda=TorchOptions(**cuda),
                    **rest,
                )
                report = run_benchmark(
                    spec, BenchTiming(warmup=3, iters=iters, images=tmp, decode=options.get("decode", "auto"))
                )
                e2e, engine = report["e2e"], report["engine"]
                results[name] = {
                    "engine_images_per_s": engine["images_per_s"],
                    "e2e_images_per_s": e2e["images_per_s"],
                    "e2e_stages_ms_per_image": e2e["stages_ms_per_image"],
                    "e2e_decode_on": e2e["decode_on"],
                    "postprocess_ms_per_batch": e2e["stages_ms_per_image"]["postprocess"] * batch_size,
                    "engine_latency_ms_per_batch": engine["latency_ms_per_batch"],
                    "options": report["options"],
                    "wall_seconds": time.perf_counter() - start,
                }
                print(
                    f"{name:34s} engine {engine['images_per_s']:8.1f} img/s   e2e {e2e['images_per_s']:8.1f} img/s   "
                    f"post {results[name]['postprocess_ms_per_batch']:.1f} ms/batch   "
                    f"({time.perf_counter() - start:.0f} s)",
                    flush=True,
                )
            except Exception as exc:
                results[name] = {"error": _error(exc), "traceback": traceback.format_exc()[-2000:]}
                print(f"{name:34s} ERROR {results[name]['error']}", flush=True)
            torch.cuda.empty_cache()
            atomic_write_json(
                out,
                {
                    "batch_size": batch_size,
                    "iters": iters,
                    "preset": "800",
                    "results": results,
                    "hardware": hardware_info("cuda"),
                    "versions": versions(),
                },
                indent=2,
            )


KERNEL_KINDS = (  # (kind, substrings of the kernel name, lower case), first match wins
    ("groupnorm", ("group_norm", "groupnorm", "rowwisemoments", "computefusedparams")),
    (
        "convolution",
        ("conv", "implicit_gemm", "cudnn", "xmma", "sm90_", "sm80_", "cutlass", "gemm", "fprop", "dgrad", "wgrad"),
    ),
    ("batchnorm", ("batch_norm", "batchnorm", "bn_fw")),
    ("elementwise", ("elementwise", "vectorized", "unrolled", "relu", "add", "mul", "copy", "cat")),
    ("reduction_sort_topk", ("reduce", "sort", "topk", "scan", "radix")),
)


def _kernel_kind(name: str) -> str:
    lower = name.lower()
    for kind, keys in KERNEL_KINDS:
        if any(k in lower for k in keys):
            return kind
    return "other"


def _device_us(event: Any, self_only: bool = True) -> float:
    for attr in (
        ("self_device_time_total", "self_cuda_time_total") if self_only else ("device_time_total", "cuda_time_total")
    ):
        value = getattr(event, attr, None)
        if value is not None:
            return float(value)
    return 0.0


def engine_profile(batch_size: int) -> dict[str, Any]:
    """GPU kernels of one FP16 channels-last network call at ``batch_size`` x 3 x 800 x 800, by kind and the top 15."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    backend = TorchBackend(
        _net("dense"), preset="800", device="cuda", fp16=True, channels_last=True, cudnn_benchmark=True
    )
    batch = torch.randn(batch_size, 3, 800, 800, device="cuda").contiguous(memory_format=torch.channels_last)
    for _ in range(3):
        backend.network(batch)
    timer = StageTimer("cuda")
    with timer.stage("network"):
        for _ in range(5):
            backend.network(batch)
    wall_ms = timer.totals["network"] * 1e3 / 5
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        backend.network(batch)
        torch.cuda.synchronize()
    kernels = [
        e
        for e in prof.key_averages()
        if _device_us(e) > 0 and not e.key.startswith(("aten::", "cuda", "Memcpy", "Memset"))
    ]
    by_kind: dict[str, float] = {}
    for e in kernels:
        by_kind[_kernel_kind(e.key)] = by_kind.get(_kernel_kind(e.key), 0.0) + _device_us(e) / 1e3
    total = sum(by_kind.values())
    top = sorted(kernels, key=_device_us, reverse=True)[:15]
    return {
        "what": "network alone, FP16 autocast, channels-last, cudnn.benchmark, random input on the device",
        "batch_size": batch_size,
        "wall_ms_per_batch": wall_ms,
        "images_per_s": batch_size / wall_ms * 1e3,
        "kernel_ms_total": total,
        "kernel_ms_by_kind": {k: round(v, 3) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
        "kernel_launches": int(sum(e.count for e in kernels)),
        "top_kernels": [
            {"name": e.key[:160], "calls": e.count, "ms": round(_device_us(e) / 1e3, 3), "kind": _kernel_kind(e.key)}
            for e in top
        ],
    }


def profile(out: Path, batch_size: int) -> None:
    """Post-processing alone (both weight sets) and the network's kernels at ``batch_size``; write ``out``."""
    from benchmarks.bench_postprocess import measure

    result: dict[str, Any] = {"hardware": hardware_info("cuda"), "versions": versions()}
    for weights in WEIGHTS:
        try:
            row = measure(batch_size=batch_size, device="cuda", weights=weights, images=8, warmup=3, iters=20)
            row.pop("hardware", None)
            row.pop("versions", None)
            result[f"postprocess_{weights}"] = row
            work = row["batched_call"]
            print(
                f"postprocess {weights:6s} batch {batch_size}: {row['batched_ms_per_batch']:.2f} ms/batch batched, "
                f"{row['per_image_ms_per_batch']:.2f} image by image ({row['batched_speedup']:.1f}x); "
                f"{work['kernels']} kernels, {work['syncs']} syncs",
                flush=True,
            )
        except Exception as exc:
            result[f"postprocess_{weights}"] = {"error": _error(exc), "traceback": traceback.format_exc()[-2000:]}
            print(f"postprocess {weights}: ERROR {result[f'postprocess_{weights}']['error']}", flush=True)
        atomic_write_json(out, result, indent=2)
    try:
        result["engine"] = engine_profile(batch_size)
        eng = result["engine"]
        print(
            f"engine batch {batch_size}: {eng['wall_ms_per_batch']:.2f} ms/batch ({eng['images_per_s']:.0f} img/s); "
            f"kernel ms by kind {eng['kernel_ms_by_kind']}",
            flush=True,
        )
    except Exception as exc:
        result["engine"] = {"error": _error(exc), "traceback": traceback.format_exc()[-2000:]}
        print(f"engine profile: ERROR {result['engine']['error']}", flush=True)
    atomic_write_json(out, result, indent=2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="step", required=True)
    p = sub.add_parser("parity", help="CUDA FP32/FP16 detections vs CPU FP32")
    p.add_argument("--out", type=Path, required=True)
    v = sub.add_parser("variants", help="bench each CUDA option at one batch size")
    v.add_argument("--out", type=Path, required=True)
    v.add_argument("--batch-size", type=int, default=32)
    v.add_argument("--iters", type=int, default=10)
    v.add_argument("--no-compile", action="store_true")
    f = sub.add_parser("profile", help="post-processing alone and the network's kernels at one batch size")
    f.add_argument("--out", type=Path, required=True)
    f.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_check: CUDA is not available", file=sys.stderr)
        return 2
    if args.step == "parity":
        return 0 if parity(args.out) else 1
    if args.step == "profile":
        profile(args.out, args.batch_size)
        return 0
    variants(args.out, args.batch_size, args.iters, not args.no_compile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
