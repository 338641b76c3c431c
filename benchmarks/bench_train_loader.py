"""What the training loader's threads cost: ``paadet train`` s/iter with images loaded inline and by threads.

    python benchmarks/bench_train_loader.py [--iters 12] [--rounds 2] [--workers 2] [--json FILE]

For each setting, ``paadet.train.train`` (the code behind ``paadet train``) runs ``--iters`` iterations with
``workers=0`` (each batch decoded, resized and normalised in the training thread: the baseline) and with
``workers=N`` loader threads that prepare the next batches while the step runs, alternating ``--rounds``
times so that a change in the machine's load hits both, on the same synthetic images
(``paadet.data.synthetic``) from the same seeded initialisation. The first two iterations of each run are
left out; the figure is the median of the remaining rows' ``time`` in ``metrics.jsonl``.

The ratio ``inline / threads`` is above 1 when the threads pay for themselves, below 1 when they slow the
step down. On a machine whose cores the step keeps busy there is little to gain, but nothing should be lost:
before the loader normalised in numpy, a torch kernel run from a loader thread started an OpenMP team of
its own whose spinning threads competed with the step (see docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

from bench_amp import iteration_times, run_facts  # this folder's bench_amp.py (the script's folder is on sys.path)

from paadet.data.synthetic import SyntheticSpec, generate_split
from paadet.fileio import atomic_write_json
from paadet.train import TrainConfig

SETTINGS = {
    "stand-in 160x160 b4 bf16": {"size": 160, "scale": (160, 160), "batch_size": 4, "amp": "bf16"},
    "256x256 b4 bf16": {"size": 256, "scale": (256, 256), "batch_size": 4, "amp": "bf16"},
}
COMMON = {
    "init": "scratch",
    "bn_train": True,
    "frozen_stages": -1,
    "lr": 0.001,
    "warmup_iters": 0,
    "seed": 0,
    "channels_last": False,
}  # NCHW, as the recorded table was measured (bf16 on a CPU defaults to NHWC now)
SKIPPED = 2  # first iterations of each run left out (allocation, first-call costs)


def time_run(data: tuple[Path, Path], out: Path, workers: int, iters: int, device: str, settings: dict) -> list[float]:
    """Seconds of each iteration after the first ``SKIPPED`` of one ``train`` run."""
    options = {k: v for k, v in settings.items() if k != "size"}
    config = TrainConfig(
        ann_file=data[0],
        image_dir=data[1],
        output_dir=out,
        max_iters=iters,
        device=device,
        progress=False,
        workers=workers,
        **COMMON,
        **options,
    )
    return iteration_times(config, SKIPPED)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--iters", type=int, default=12, help=f"iterations per run, the first {SKIPPED} left out (default: 12)"
    )
    p.add_argument("--rounds", type=int, default=2, help="inline / threads alternations (default: 2)")
    p.add_argument(
        "--workers", type=int, default=2, help="loader threads of the threaded runs (default: 2, paadet train's)"
    )
    p.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated names of SETTINGS")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if args.iters <= SKIPPED:
        p.error(f"--iters must be more than {SKIPPED}")
    result = {**run_facts(args.device), "workers": args.workers, "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.settings.split(","):
            setting = SETTINGS[name]
            images = args.iters * setting["batch_size"]
            spec = SyntheticSpec(size=setting["size"], max_size=0.8 * setting["size"])
            data = generate_split(Path(tmp) / f"data{setting['size']}", images, seed=0, spec=spec)
            times: dict[int, list[float]] = {0: [], args.workers: []}
            for round_ in range(args.rounds):
                for workers in times:
                    out = Path(tmp) / f"{setting['size']}-w{workers}-{round_}"
                    times[workers] += time_run(data, out, workers, args.iters, args.device, setting)
            inline, threaded = statistics.median(times[0]), statistics.median(times[args.workers])
            row = {
                "setting": name,
                "inline_s_per_iter": inline,
                "threads_s_per_iter": threaded,
                "inline_over_threads": inline / threaded,
                "n": len(times[0]),
            }
            result["rows"].append(row)
            print(
                f"{name}: inline {inline:.3f} s/iter, {args.workers} loader threads {threaded:.3f} s/iter "
                f"(inline / threads {row['inline_over_threads']:.2f}; {row['n']} iterations each)",
                flush=True,
            )
    if args.json is not None:
        atomic_write_json(args.json, result, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
