"""Markdown tables for ``docs/benchmarks.md`` from the files ``scripts/gpu_check.sh`` wrote, with the targets checked.

    python tools/gpu_report.py /path/to/gpu_check/out > /tmp/gpu_tables.md

Reads ``bench_b{1,8,32}.json`` (``paadet bench``), ``parity.json``, ``profile_b32.json``,
``variants_b32.json`` and ``train_amp.json`` (``benchmarks/bench_amp.py --device cuda``); any that is missing or
unreadable is named in the output and skipped.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

TARGETS = {
    "engine_images_per_s": 1000.0,
    "e2e_images_per_s": 600.0,
    "postprocess_ms_per_batch": 5.0,
}  # issue 5, batch 32


def _load(folder: Path, name: str, missing: list[str]) -> Any:
    path = folder / name
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        missing.append(f"{name} ({type(exc).__name__})")
        return None


def _fmt(value: float | None, digits: int = 1) -> str:
    return "" if value is None else f"{value:,.{digits}f}"


def _fp16_matched(parity: Any) -> str:
    """Matched fractions of the FP16 channels-last rows (the bench's default options), per weight set, preset 800."""
    if not parity:
        return ""
    cells = []
    for row in parity.get("rows", []):
        if row.get("variant") == "fp16_channels_last" and row.get("preset") == "800" and "matched" in row:
            cells.append(f"{row['weights']} {row['matched']}/{row['reference']} ({100 * row['matched_fraction']:.2f}%)")
    return ", ".join(cells)


def bench_table(folder: Path, parity: Any, missing: list[str]) -> tuple[list[str], dict[str, float]]:
    lines = [
        "| GPU | batch | precision | engine images/s | e2e images/s | post-processing ms/batch | "
        "e2e ms/image: decode / preprocess / copy / network / postprocess / copy_back | FP16 matched vs CPU FP32 |",
        "|---|---:|---|---:|---:|---:|---|---|",
    ]
    at32: dict[str, float] = {}
    for name in ("bench_b1.json", "bench_b8.json", "bench_b32.json"):
        report = _load(folder, name, missing)
        if not report:
            continue
        batch = report["batch_size"]
        engine, e2e = report.get("engine") or {}, report["e2e"]
        stages = e2e["stages_ms_per_image"]
        post = stages.get("postprocess", 0.0) * batch
        gpu = report["hardware"].get("gpu") or report["hardware"].get("cpu")
        split = " / ".join(
            _fmt(stages.get(k, 0.0), 2) for k in ("decode", "preprocess", "copy", "network", "postprocess", "copy_back")
        )
        lines.append(
            f"| {gpu} | {batch} | {report['precision']} | {_fmt(engine.get('images_per_s'))} | "
            f"{_fmt(e2e['images_per_s'])} | {_fmt(post, 2)} | {split} (decode on {e2e['decode_on']}) | "
            f"{_fp16_matched(parity) if batch == 32 else ''} |"
        )
        if batch == 32:
            at32 = {
                "engine_images_per_s": engine.get("images_per_s", 0.0),
                "e2e_images_per_s": e2e["images_per_s"],
                "postprocess_ms_per_batch": post,
            }
    return lines, at32


def target_lines(at32: dict[str, float], profile: Any) -> list[str]:
    if not at32:
        return ["Targets: no batch-32 bench result."]
    post_alone = None
    if profile and "postprocess_dense" in profile and "batched_ms_per_batch" in profile["postprocess_dense"]:
        post_alone = profile["postprocess_dense"]["batched_ms_per_batch"]
    lines = ["| target (batch 32, FP16, 800x800) | measured | verdict |", "|---|---:|---|"]
    for key, goal in TARGETS.items():
        value = at32[key]
        if key == "postprocess_ms_per_batch":
            shown = f"{value:.2f} (in e2e)" + ("" if post_alone is None else f", {post_alone:.2f} alone")
            best = value if post_alone is None else min(value, post_alone)
            verdict = "met" if best < goal else f"missed by {100 * (best / goal - 1):.0f}%"
            lines.append(f"| post-processing < {goal:g} ms | {shown} | {verdict} |")
        else:
            verdict = "met" if value >= goal else f"missed by {100 * (1 - value / goal):.0f}%"
            lines.append(f"| {key.replace('_', ' ')} >= {goal:,.0f} | {value:,.1f} | {verdict} |")
    return lines


def parity_table(parity: Any) -> list[str]:
    if not parity:
        return []
    lines = ["| weights | preset | variant | matched | extra | verdict |", "|---|---|---|---:|---:|---|"]
    for row in parity.get("rows", []):
        if "error" in row:
            lines.append(
                f"| {row['weights']} | {row['preset']} | {row['variant']} | error: {row['error'][:80]} | | FAIL |"
            )
            continue
        verdict = "pass" if row["pass"] else ("FAIL" if row.get("judged", True) else "not judged")
        lines.append(
            f"| {row['weights']} | {row['preset']} | {row['variant']} | {row['matched']}/{row['reference']} "
            f"({100 * row['matched_fraction']:.2f}%) | {row['extra']} | {verdict} |"
        )
    return lines


def variants_table(variants: Any) -> list[str]:
    if not variants:
        return []
    lines = [
        "| option set (batch 32) | engine images/s | e2e images/s | post-processing ms/batch |",
        "|---|---:|---:|---:|",
    ]
    for name, r in variants.get("results", {}).items():
        if "error" in r:
            lines.append(f"| {name} | error: {r['error'][:80]} | | |")
        else:
            lines.append(
                f"| {name} | {_fmt(r['engine_images_per_s'])} | {_fmt(r['e2e_images_per_s'])} | "
                f"{_fmt(r['postprocess_ms_per_batch'], 2)} |"
            )
    return lines


def profile_lines(profile: Any) -> list[str]:
    if not profile:
        return []
    lines = []
    for weights in ("dense", "sparse"):
        row = profile.get(f"postprocess_{weights}")
        if row and "batched_ms_per_batch" in row:
            work = row["batched_call"]
            lines.append(
                f"- post-processing alone, {weights} weights ({row['detections_per_image']:.0f} detections/image): "
                f"{row['batched_ms_per_batch']:.2f} ms per batch of {row['batch_size']} "
                f"({row['per_image_ms_per_batch']:.2f} ms image by image, {row['batched_speedup']:.1f}x); "
                f"{work['kernels']} kernels, {work['syncs']} host syncs"
            )
        elif row:
            lines.append(f"- post-processing alone, {weights} weights: {row.get('error', 'no result')}")
    engine = profile.get("engine")
    if engine and "kernel_ms_by_kind" in engine:
        kinds = ", ".join(f"{k} {v:.2f}" for k, v in engine["kernel_ms_by_kind"].items())
        lines.append(
            f"- network, batch {engine['batch_size']}: {engine['wall_ms_per_batch']:.2f} ms per batch "
            f"({engine['images_per_s']:,.0f} images/s), {engine['kernel_launches']} kernel launches; "
            f"GPU ms by kind: {kinds}"
        )
    elif engine:
        lines.append(f"- network profile: {engine.get('error', 'no result')}")
    return lines


def train_table(train: Any) -> list[str]:
    """``paadet train`` s/iter on the GPU per mixed-precision mode (``benchmarks/bench_amp.py``'s rows)."""
    if not train:
        return []
    lines = [
        f"`paadet train` on {train.get('device', '?')} (benchmarks/bench_amp.py; median s/iter, first iteration "
        "of each run left out):",
        "",
        "| setting | precision | s/iter | x float32 | iterations |",
        "|---|---|---:|---:|---:|",
    ]
    for row in train.get("rows", []):
        lines.append(
            f"| {row['setting']} | {row['amp']} | {row['s_per_iter']:.3f} | {row['speedup']:.2f} | {row['n']} |"
        )
    return lines


def report(folder: Path) -> str:
    missing: list[str] = []
    parity = _load(folder, "parity.json", missing)
    profile = _load(folder, "profile_b32.json", missing)
    variants = _load(folder, "variants_b32.json", missing)
    bench_lines, at32 = bench_table(folder, parity, missing)
    train = _load(folder, "train_amp.json", missing)
    sections = [
        bench_lines,
        target_lines(at32, profile),
        profile_lines(profile),
        variants_table(variants),
        train_table(train),
        parity_table(parity),
    ]
    out = "\n\n".join("\n".join(s) for s in sections if s)
    if missing:
        out += "\n\nNot read: " + ", ".join(missing)
    return out + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="the OUT folder of scripts/gpu_check.sh")
    args = parser.parse_args(argv)
    if not args.folder.is_dir():
        print(f"gpu_report: {args.folder}: no such folder", file=sys.stderr)
        return 2
    sys.stdout.write(report(args.folder))
    return 0


if __name__ == "__main__":
    sys.exit(main())
