"""The terminal table of a ``paadet bench`` report (:func:`paadet.bench.run_benchmark`'s dict)."""

from __future__ import annotations

from typing import Any

__all__ = ["format_report"]


def format_report(report: dict[str, Any]) -> str:
    """The report as a short table for the terminal."""
    hw = report["hardware"]
    where = f"{hw['gpu']} + {hw['cpu']}" if hw.get("gpu") else f"{hw['cpu']}, {hw['cpu_cores_usable']} cores"
    lines = [
        f"paadet bench: {report['backend']} on {report['device']} ({where}), {report['precision']}, "
        f"batch {report['batch_size']}, preset {report['preset']} ({report['input_size']})",
        f"weights: {report['weights']}" + (f" ({report['architecture']})" if report.get("architecture") else ""),
        *(
            [
                f"--backend auto chose {report['auto']['chosen']}, the fastest backend here for this graph's precision "
                "(probe ms: " + ", ".join(f"{k} {v:.0f}" for k, v in report["auto"]["candidates_ms"].items()) + ")"
            ]
            if report.get("auto")
            else []
        ),
        f"images: {report['images']['source']}; {report['warmup']} warm-up "
        f"batch{'es' if report['warmup'] != 1 else ''}, then timed: "
        + ", ".join(
            f"{name} {report[name]['iterations']} batches in {report[name]['seconds']:.1f} s"
            for name in ("engine", "e2e")
            if report.get(name)
        ),
        "",
        f"{'':8s} {'images/s':>10s} {'ms/image':>10s} {'p50 ms':>10s} {'p90 ms':>10s} {'p99 ms':>10s}"
        "  (latency per batch)",
    ]
    for name in ("engine", "e2e"):
        r = report.get(name)
        if not r:
            continue
        lat = r["latency_ms_per_batch"]
        lines.append(
            f"{name:8s} {r['images_per_s']:10.2f} {r['ms_per_image']:10.2f} "
            f"{lat['p50']:10.1f} {lat['p90']:10.1f} {lat['p99']:10.1f}"
        )
    e2e = report["e2e"]
    stages = " | ".join(f"{k} {v:.2f}" for k, v in e2e["stages_ms_per_image"].items())
    threads = e2e.get("decode_threads")
    decode = e2e["decode_on"] if threads is None else f"{e2e['decode_on']}, {threads} threads"
    lines += [
        "",
        f"e2e ms/image by stage (decode on {decode}): {stages} | untimed {e2e['untimed_ms_per_image']:.2f}",
        f"e2e detections per image: {e2e['detections_per_image']:.1f}",
        "engine = the network alone on a device-resident batch; e2e = JPEG files -> detections in host memory, "
        "stage by stage, synchronised",
    ]
    note = engine_note(report)
    if note:
        lines.append(note)
    if report["timing_only"]:
        lines.append("timing only: random weights, the detections mean nothing")
    return "\n".join(lines)


def engine_note(report: dict[str, Any]) -> str | None:
    """Why ``engine`` was slower than ``e2e`` in this run, when it was (it times less work, so it is the exception).

    ``engine`` repeats the first image's input, ``e2e`` goes through every image: a first image larger than the
    others (a bigger padded input), or more candidates for NMS in a graph that holds it, makes ``engine`` the slower
    one; otherwise the machine's load changed between the two figures.
    """
    engine, e2e = report.get("engine"), report["e2e"]
    if not engine or engine["ms_per_image"] <= e2e["ms_per_image"]:
        return None
    first = engine.get("input_shape")
    why = (
        f"engine timed the first image only (input {'x'.join(str(v) for v in first[2:])}), e2e every image"
        if first
        else "engine timed the first image only, e2e every image"
    )
    network = e2e["stages_ms_per_image"].get("network")
    if network is not None and network < engine["ms_per_image"]:
        why += f", whose network stage took {network:.2f} ms/image: their inputs are smaller or easier"
    else:
        why += ": the machine's load changed between the two figures; rerun, or give more --iters"
    slower = f"engine ({engine['ms_per_image']:.2f} ms/image) was slower than e2e ({e2e['ms_per_image']:.2f})"
    return f"note: {slower}: {why}"
