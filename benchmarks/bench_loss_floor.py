"""Where PAA's loss spends its time on a CPU, and what a fused native kernel would take instead.

    /tmp/mmref/bin/python benchmarks/bench_loss_floor.py --threads 1 [--json FILE]   # with mmdetection's time
    python benchmarks/bench_loss_floor.py --threads 1                                  # paadet's parts alone

Issue 12 (a) asks for :class:`~paadet.train.loss.PAALoss` to be 10x faster than mmdetection's
``loss_by_feat`` on the same tensors. This script times, on ``bench_train.py``'s batch (2 images padded to
800x1344, 2 x 22,400 anchors, 80 classes) at each box count, in one process and with calls alternating:

* mmdetection's ``loss_by_feat`` (when it is importable here): the 10x budget is a tenth of it;
* paadet's whole ``PAALoss`` call and its parts: the levels' class maps concatenated into ``[B * A, C]``
  (``flatten_levels``), the assignment (``PAALoss.targets``), the GMM alone (``fit_gmm_1d`` on the batch's
  candidate table) and the focal-loss sum over every anchor and class (``focal_loss_sum``, forward);
* single eager passes of torch over the same ``[B * A, C]`` logits (``sigmoid``, ``softplus``, ``exp``,
  ``log``, ``log1p``, ``mul``): what one element-wise pass costs, the unit the focal loss is made of;
* the focal loss's per-element negative term ``p^2 softplus(x)`` summed in one fused loop of C compiled
  here with the system's C compiler (``-O3 -march=native``, glibc's vector maths ``libmvec``), called through
  ctypes on the same memory: what a native kernel would take. It is a measurement aid, not part of paadet;
  without a C compiler or libmvec the row says so.

Medians of ``--iters`` rounds after ``--warmup``; every row is a separate call, so the parts do not add up to
the whole exactly (the whole call also pays for cache misses between its parts).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from bench_train import (
    NUM_CLASSES,
    MMDetPAA,
    head_outputs,
    interleaved_seconds,
    limit_threads,
    make_case,  # this folder
    mmdet_available,
    run_header,
    seeded_net,
)

from paadet.fileio import atomic_write_json
from paadet.train.focal import focal_loss_sum
from paadet.train.gmm import fit_gmm_1d
from paadet.train.loss import PAALoss, flatten_levels
from paadet.train.reassign import candidate_table

KERNEL_C = r"""
#include <math.h>
/* sum over anchors a of weight[a] * sum over classes c of p^2 softplus(x), x = logits[a * C + c] */
double neg_focal_sum(const float *logits, const float *weight, long anchors, long classes) {
  double total = 0.0;
  for (long a = 0; a < anchors; a++) {
    const float *row = logits + a * classes;
    float acc = 0.f;
    #pragma omp simd reduction(+:acc)
    for (long c = 0; c < classes; c++) {
      float v = row[c];
      float e = expf(-fabsf(v));
      float r = 1.f / (1.f + e);
      float p = v >= 0.f ? r : e * r;
      acc += p * p * (fmaxf(v, 0.f) + log1pf(e));
    }
    total += (double)(acc * weight[a]);
  }
  return total;
}
"""


def build_kernel(workdir: Path) -> tuple[Callable[[torch.Tensor, torch.Tensor], float] | None, str]:
    """The C kernel compiled here (compiled with fast maths for the vector calls, linked without it so that
    the process's floating-point modes stay as they are), or None and why not."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None, "no C compiler on PATH"
    src, obj, lib = workdir / "focal.c", workdir / "focal.o", workdir / "focal.so"
    src.write_text(KERNEL_C)
    try:
        subprocess.run(
            [
                cc,
                "-O3",
                "-march=native",
                "-mprefer-vector-width=512",
                "-ffast-math",
                "-fopenmp-simd",
                "-fPIC",
                "-c",
                str(src),
                "-o",
                str(obj),
            ],
            check=True,
            capture_output=True,
        )
        subprocess.run([cc, "-shared", str(obj), "-o", str(lib), "-lmvec", "-lm"], check=True, capture_output=True)
    except subprocess.CalledProcessError as error:
        lines = error.stderr.decode(errors="replace").strip().splitlines()
        return None, f"the C kernel did not build: {lines[-1] if lines else error}"
    fn = ctypes.CDLL(str(lib)).neg_focal_sum
    fn.restype = ctypes.c_double
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_long, ctypes.c_long]

    def call(logits: torch.Tensor, weight: torch.Tensor) -> float:
        return fn(logits.data_ptr(), weight.data_ptr(), logits.shape[0], logits.shape[1])

    return call, f"{Path(cc).name} -O3 -march=native -ffast-math, linked with libmvec"


def eager_neg_sum(logits: torch.Tensor, weight: torch.Tensor) -> float:
    """The same sum as the C kernel with torch's eager operations, in float64 (the reference)."""
    x = logits.double()
    return float(((x.sigmoid().square() * F.softplus(x)).sum(1) * weight.double()).sum())


def medians(calls: dict[str, Callable[[], Any]], warmup: int, iters: int) -> dict[str, float]:
    """Median milliseconds of each call, the calls alternating round by round."""
    return {name: statistics.median(values) * 1e3 for name, values in interleaved_seconds(calls, warmup, iters).items()}


def bench_case(
    net: torch.nn.Module, boxes: int, warmup: int, iters: int, kernel: Callable | None, with_mmdet: bool
) -> dict[str, Any]:
    case = make_case(boxes)
    cls, box, iou = head_outputs(net, case)
    loss_fn = PAALoss()
    args = (case.gt_boxes, case.gt_labels, case.pad_shapes)
    targets = loss_fn.targets(cls, box, iou, *args)
    logits = flatten_levels([c.detach() for c in cls]).reshape(-1, NUM_CLASSES).contiguous()
    weight = targets.label_weights.contiguous()
    num_gts = max(len(b) for b in case.gt_boxes)
    gt_rows = (
        (targets.pre_pos_index // targets.pre_gt_inds.shape[1]) * num_gts
        + targets.pre_gt_inds.reshape(-1)[targets.pre_pos_index]
        - 1
    )
    anchor_levels = loss_fn.anchors([tuple(c.shape[-2:]) for c in cls], logits.device)[1]
    levels = anchor_levels[targets.pre_pos_index % targets.pre_gt_inds.shape[1]]
    table = candidate_table(targets.pre_pos_scores, gt_rows, levels, len(case.gt_boxes) * num_gts, len(cls))
    out = torch.empty_like(logits)
    magnitudes = logits.abs()  # log and log1p's input (non-negative)

    calls: dict[str, Callable[[], Any]] = {}
    if with_mmdet:
        calls["mmdetection loss_by_feat"] = MMDetPAA().loss_call((cls, box, iou), case)
    calls.update(
        {
            "paadet PAALoss (whole call)": lambda: loss_fn(cls, box, iou, *args),
            "  flatten_levels of the class maps (cat)": lambda: flatten_levels(cls),
            "  PAALoss.targets (assignment, its flatten included)": lambda: loss_fn.targets(cls, box, iou, *args),
            "    fit_gmm_1d on the candidate table": lambda: fit_gmm_1d(table.scores, table.mask),
            "  focal_loss_sum forward over [B*A, C]": lambda: focal_loss_sum(
                logits, targets.labels, weight, positives=targets.pos_index
            ),
            "one eager pass: sigmoid": lambda: torch.sigmoid(logits, out=out),
            "one eager pass: softplus": lambda: F.softplus(logits),
            "one eager pass: exp": lambda: torch.exp(logits, out=out),
            "one eager pass: log": lambda: torch.log(magnitudes, out=out),
            "one eager pass: log1p": lambda: torch.log1p(magnitudes, out=out),
            "one eager pass: mul": lambda: torch.mul(logits, logits, out=out),
        }
    )
    if kernel is not None:
        calls["fused C kernel: sum of p^2 softplus(x) over [B*A, C]"] = lambda: kernel(logits, weight)
    ms = medians(calls, warmup, iters)
    result: dict[str, Any] = {
        "boxes": boxes,
        "elements": logits.numel(),
        "gmm_rows": int(table.scores.shape[0]),
        "ms": ms,
    }
    if kernel is not None:
        reference = eager_neg_sum(logits, weight)
        result["kernel_rel_diff"] = abs(kernel(logits, weight) - reference) / abs(reference)
    return result


def print_report(result: dict[str, Any]) -> None:
    for case in result["cases"]:
        ms = case["ms"]
        budget = ms.get("mmdetection loss_by_feat")
        print(
            f"\n{case['boxes']} boxes/image: [B*A, C] = {case['elements']:,} logits, {case['gmm_rows']} GMM rows"
            + (f"; the 10x budget is {budget / 10:.1f} ms" if budget else "")
        )
        print("| part | ms |\n|---|---:|")
        for name, value in ms.items():
            print(f"| {name} | {value:.2f} |")
        if "kernel_rel_diff" in case:
            print(f"fused C kernel against torch's float64 sum: relative difference {case['kernel_rel_diff']:.1e}")
    print(f"\nfused C kernel: {result['kernel']}")
    print(
        f"torch threads {result['threads']}, load average at start {result['loadavg_start'][0]:.2f}, "
        f"at the end {result['loadavg_end'][0]:.2f}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch (and BLAS) CPU threads (default: 1)")
    parser.add_argument("--boxes", default="8,50", help="boxes per image, comma-separated (default: 8,50)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=9)
    parser.add_argument("--paadet-only", action="store_true", help="leave mmdetection out even where it is installed")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    boxes = [b.strip() for b in args.boxes.split(",")]
    if args.threads < 1 or args.iters < 1 or args.warmup < 0 or not all(b.isdigit() and int(b) >= 1 for b in boxes):
        parser.error("--threads and --iters must be >= 1, --warmup >= 0, --boxes positive integers such as 8,50")
    with_mmdet = mmdet_available() and not args.paadet_only
    if not with_mmdet:
        print("mmdetection is not importable here (or --paadet-only): paadet's parts alone", flush=True)
    result = run_header(argv, with_mmdet)
    with tempfile.TemporaryDirectory() as tmp, limit_threads(args.threads):
        net = seeded_net()
        kernel, result["kernel"] = build_kernel(Path(tmp))
        result["cases"] = [bench_case(net, int(b), args.warmup, args.iters, kernel, with_mmdet) for b in boxes]
    result.update(threads=args.threads, loadavg_end=list(os.getloadavg()))
    print_report(result)
    if args.json:
        atomic_write_json(args.json, result, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
