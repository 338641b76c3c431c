"""Mixed precision in training: ``paadet train`` s/iter in float32 and with ``--amp bf16``, same run, same data.

    python benchmarks/bench_amp.py [--iters 6] [--json FILE]

Two settings: the recipe's (scale 1333x800, batch 2, frozen stem and BatchNorm) and the stand-in's (160x160, batch
4, from scratch with BatchNorm trained; docs/standin.md; the 256 px synthetic images resized). For each,
``paadet.train.train`` (the code behind ``paadet train``) runs ``--iters`` iterations in float32, then in bfloat16,
then float32 and bfloat16 again (alternating, so that a change in the machine's load hits both), on synthetic
images (``paadet.data.synthetic``), from the same seeded initialisation. Each run's first iteration is a warm-up
and is left out; the figure is the median of the remaining rows' ``time`` in ``metrics.jsonl`` (loading, forward,
loss, backward and SGD step). ``--amp fp16`` needs CUDA and is timed with ``--device cuda``. Every run names its
memory format: the rows ``fp32`` and ``bf16`` are NCHW (``--no-channels-last``, although
``paadet train --amp bf16`` on a CPU defaults to channels-last); ``--channels-last`` times every mode a second time
in NHWC (``--channels-last``), in the same alternation, as the rows ``fp32+cl``, ``bf16+cl`` (and ``fp16+cl`` on
CUDA); the JSON rows carry ``amp`` and ``channels_last`` apart. Every speed-up is against float32 NCHW.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from paadet.data.synthetic import SyntheticSpec, generate_split
from paadet.fileio import atomic_write_json
from paadet.train import TrainConfig, train
from paadet.train.metrics import METRICS_NAME, read_rows

SETTINGS = {
    "recipe 1333x800 b2": {
        "scale": (1333, 800),
        "batch_size": 2,
        "init": "scratch",
        "bn_train": False,
        "frozen_stages": 1,
    },
    "stand-in 160x160 b4": {
        "scale": (160, 160),
        "batch_size": 4,
        "init": "scratch",
        "bn_train": True,
        "frozen_stages": -1,
    },
}


def iteration_times(config: TrainConfig, skip: int = 1) -> list[float]:
    """Run ``paadet.train.train(config)``; the seconds of each training iteration after the first ``skip``
    (the rows' ``time`` in its ``metrics.jsonl``)."""
    train(config, log=lambda message: None)
    return [r["time"] for r in read_rows(Path(config.output_dir) / METRICS_NAME) if "loss" in r][skip:]


def run_facts(device: str) -> dict:
    """What every training benchmark's JSON starts with: the CPU, torch's thread count and version, the device."""
    return {
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": device,
    }


def time_run(
    data: tuple[Path, Path],
    out: Path,
    amp: str | None,
    iters: int,
    device: str,
    channels_last: bool = False,
    **settings,
) -> list[float]:
    config = TrainConfig(
        ann_file=data[0],
        image_dir=data[1],
        output_dir=out,
        max_iters=iters,
        amp=amp,
        device=device,
        progress=False,
        workers=1,
        lr=0.001,
        warmup_iters=0,
        seed=0,
        channels_last=channels_last,
        **settings,
    )
    return iteration_times(config)


def mode_name(amp: str | None, channels_last: bool) -> str:
    """A row's name: ``fp32``, ``bf16``, ``fp16``, with ``+cl`` for channels-last."""
    return (amp or "fp32") + ("+cl" if channels_last else "")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--iters", type=int, default=6, help="iterations per run, the first one a warm-up (default: 6)")
    p.add_argument("--rounds", type=int, default=2, help="rounds of the modes, alternating (default: 2)")
    p.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated names of SETTINGS")
    p.add_argument("--device", default="cpu")
    p.add_argument("--channels-last", action="store_true", help="also time each mode with --channels-last")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    amps = [None, "bf16"] + (["fp16"] if args.device.startswith("cuda") else [])
    layouts = [False, True] if args.channels_last else [False]
    modes = [(amp, cl) for cl in layouts for amp in amps]
    result = {**run_facts(args.device), "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        data = generate_split(Path(tmp) / "data", 16, seed=0, spec=SyntheticSpec())
        for name in args.settings.split(","):
            times: dict[str, list[float]] = {mode_name(*m): [] for m in modes}
            for round_ in range(args.rounds):
                for amp, cl in modes:
                    out = Path(tmp) / f"{name.split()[0]}-{mode_name(amp, cl)}-{round_}"
                    times[mode_name(amp, cl)] += time_run(data, out, amp, args.iters, args.device, cl, **SETTINGS[name])
            base = statistics.median(times["fp32"])
            for amp, cl in modes:
                mode, values = mode_name(amp, cl), times[mode_name(amp, cl)]
                row = {
                    "setting": name,
                    "amp": amp or "fp32",
                    "channels_last": cl,
                    "s_per_iter": statistics.median(values),
                    "speedup": base / statistics.median(values),
                    "n": len(values),
                }
                result["rows"].append(row)
                print(
                    f"{name}: {mode} {row['s_per_iter']:.3f} s/iter "
                    f"({row['speedup']:.2f}x float32; {len(values)} iterations)",
                    flush=True,
                )
    if args.json is not None:
        atomic_write_json(args.json, result, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
