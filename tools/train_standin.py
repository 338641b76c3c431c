"""Train the stand-in: PAA R50-FPN from scratch on paadet's synthetic shapes, on a CPU, in under 90 minutes
(80 on a 2-core EPYC in NCHW, 63 on a 2-core Xeon with AMX in channels-last), or a quick model in 20.

    python tools/train_standin.py --output-dir DIR                # the full recipe: 8 classes, 160x160
    python tools/train_standin.py --output-dir DIR --minutes 20   # the quick recipe: 1 class, 128x128, float32

1. writes the synthetic dataset (``paadet.data.synthetic``): ``DIR/train/`` and ``DIR/val/`` (each
   ``annotations.json`` + ``images/``), seeded by ``--seed``;
2. runs ``python -m paadet train`` on it with the recipe below (printed before it starts), into
   ``DIR/run/`` (``metrics.jsonl``, ``metrics.png``, checkpoints);
3. copies the last checkpoint's weights and meta (no optimizer state) to ``DIR/standin.pth``;
4. runs ``python -m paadet eval --checkpoint DIR/standin.pth --ann DIR/val/annotations.json
   --images DIR/val/images --per-class --output-dir DIR/eval`` (the checkpoint records its input scale,
   so eval needs no preset) and writes ``DIR/standin.json``: the AP, AP per class, the times and the commands.

The recipe (see docs/standin.md for why): 160x160 images with objects of 20 to 128 px, input scale
160x160, batch 4, from scratch (mmdetection's initialisation) with BatchNorm trained and no frozen stage,
bfloat16 autocast (``--amp bf16``, AVX512-BF16 on this CPU, AMX on a recent Xeon) in channels-last memory
format (``--channels-last``, the default with bf16 on a CPU), AdamW lr 0.0003 with
weight decay 0.05 and a 500-iteration warm-up, 6 epochs of 5,200 images (7,800 iterations), lr x0.1 after epoch 5.
The run is a function of the seed and the thread count (2 here), so the same command on the same machine gives
the same weights; an interrupted run continues with ``--resume``.

The quick recipe (``--minutes 20``, :data:`MINUTES_20`; docs/standin.md): the data of ``paadet data synthetic``'s
defaults (128x128 images, 1 class (circles), objects of 40 to 112 px, up to 3 objects and 1 distractor per image;
800 train and 150 val images), input scale 128x128, float32 (no bf16 autocast: it is slow on CPUs without
AVX512-BF16 or AMX), AdamW lr 0.0003 with a 100-iteration warm-up, 3 epochs (600 iterations: 2.5 s of CPU each on
the 2-core EPYC with AVX2, 1.25 s of wall time with the machine to itself), lr x0.1 after epoch 2. The script
prints every command it runs, and the train step's wall and CPU time.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from paadet.checkpoint import safe_torch_load
from paadet.data.synthetic import SHAPES, SyntheticSpec, generate_split
from paadet.fileio import atomic_write_json, check_output_dir

RECIPE = {
    "image_size": 160,
    "object_sizes": (20, 128),
    "train_images": 5200,
    "val_images": 300,
    "scale": "160x160",
    "batch_size": 4,
    "optimizer": "adamw",
    "lr": 0.0003,
    "weight_decay": 0.05,
    "epochs": 6,
    "lr_steps": "5",
    "warmup_iters": 500,
    "amp": "bf16",
    "channels_last": True,
    "frozen_stages": -1,
    "threads": 2,
    "classes": len(SHAPES),
    "max_objects": 6,
    "clutter": 8,
    "val_interval": 2,
}
"""The stand-in recipe; ``--quick`` shrinks it to a smoke test (not a usable model)."""

MINUTES_20 = {
    **RECIPE,
    "image_size": 128,
    "object_sizes": (40, 112),
    "classes": 1,
    "max_objects": 3,
    "clutter": 1,
    "train_images": 800,
    "val_images": 150,
    "scale": "128x128",
    "lr": 0.0003,
    "epochs": 3,
    "lr_steps": "2",
    "warmup_iters": 100,
    "amp": None,
    "channels_last": False,
}
"""The quick recipe (``--minutes 20``): easier data (``paadet data synthetic``'s defaults), smaller images, float32."""

RECIPES = {80: RECIPE, 20: MINUTES_20}
"""The recipes by their time budget in minutes on a 2-core CPU."""


def _quick(recipe: dict) -> dict:
    """A smoke test of ``recipe``'s every step (not a usable model)."""
    return {**recipe, "train_images": 8, "val_images": 4, "epochs": 1, "lr_steps": "1", "warmup_iters": 2}


def _run(cmd: list[str], log: Path) -> tuple[float, float]:
    """Run ``cmd`` (its output also appended to ``log``); returns its wall time and its CPU time (user + system,
    all its threads); exits on failure."""
    print("$ " + shlex.join(cmd), flush=True)
    start = time.perf_counter()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(log, "a", encoding="utf-8") as sink:
        sink.write("$ " + shlex.join(cmd) + "\n")
        sink.flush()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            sink.write(line)
        code = proc.wait()
    if code != 0:
        raise SystemExit(f"train_standin: {' '.join(cmd[2:4])} failed with exit code {code}; see {log}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return time.perf_counter() - start, cpu


def _spec(recipe: dict) -> SyntheticSpec:
    low, high = recipe["object_sizes"]
    return SyntheticSpec(
        size=recipe["image_size"],
        min_size=low,
        max_size=high,
        classes=recipe["classes"],
        max_objects=recipe["max_objects"],
        clutter=recipe["clutter"],
    )


def _dataset(root: Path, recipe: dict, seed: int) -> dict[str, float]:
    """Write the train and val splits unless complete for this seed and spec (their annotation file
    exists); returns seconds per split written."""
    times = {}
    spec = _spec(recipe)
    for split, count in (("train", recipe["train_images"]), ("val", recipe["val_images"])):
        ann = root / split / "annotations.json"
        written = json.loads(ann.read_text()) if ann.is_file() else None
        info = written.get("info", {}) if written is not None else {}
        if info.get("seed") == seed and info.get("spec") == asdict(spec) and len(written["images"]) == count:
            print(f"{ann}: already written, kept")
            continue
        if (root / split / "images").is_dir():  # another seed or spec: no stale image may stay behind
            for old in (root / split / "images").glob(f"{split}_*.jpg"):
                old.unlink()
        start = time.perf_counter()
        generate_split(root / split, count, split=split, seed=seed, spec=spec)
        times[split] = time.perf_counter() - start
        print(f"wrote {count} {split} images and {ann} in {times[split]:.1f} s", flush=True)
    return times


def _train_command(root: Path, recipe: dict, seed: int, resume: bool) -> list[str]:
    cmd = [
        sys.executable,
        "-m",
        "paadet",
        "train",
        "--ann",
        str(root / "train" / "annotations.json"),
        "--images",
        str(root / "train" / "images"),
        "--val-ann",
        str(root / "val" / "annotations.json"),
        "--val-images",
        str(root / "val" / "images"),
        "--val-interval",
        str(recipe["val_interval"]),
        "--output-dir",
        str(root / "run"),
        "--from-scratch",
        "--bn-train",
        "--frozen-stages",
        str(recipe["frozen_stages"]),
        *(["--amp", recipe["amp"]] if recipe["amp"] else []),
        "--scale",
        recipe["scale"],
        "--batch-size",
        str(recipe["batch_size"]),
        "--optimizer",
        recipe["optimizer"],
        "--lr",
        str(recipe["lr"]),
        "--weight-decay",
        str(recipe["weight_decay"]),
        "--epochs",
        str(recipe["epochs"]),
        "--lr-steps",
        recipe["lr_steps"],
        "--warmup-iters",
        str(recipe["warmup_iters"]),
        "--seed",
        str(seed),
        "--no-progress",
    ]
    # a resumed run keeps the memory format it was started with (runs from before the setting were NCHW)
    return cmd + (["--resume"] if resume else ["--channels-last" if recipe["channels_last"] else "--no-channels-last"])


def _export_weights(run_dir: Path, out: Path) -> None:
    """``run/latest.pth`` without its optimizer and RNG state: weights and meta (classes, preset, settings)."""
    ckpt = safe_torch_load(run_dir / "latest.pth")
    slim = {"meta": ckpt["meta"], "state_dict": ckpt["state_dict"]}
    tmp = out.with_name(out.name + ".tmp")
    torch.save(slim, tmp)
    os.replace(tmp, out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--output-dir", required=True, metavar="DIR", help="where the dataset, the run and standin.pth go")
    p.add_argument("--seed", type=int, default=0, help="seed of the dataset and of the training run (default: 0)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in DIR/run")
    p.add_argument("--eval-only", action="store_true", help="only steps 3 and 4 (the run must be complete)")
    p.add_argument(
        "--minutes",
        type=int,
        choices=sorted(RECIPES),
        default=80,
        help="the recipe by its time on a 2-core CPU: 80 the stand-in (8 classes, 160x160, AP 0.55), "
        "20 the quick one (1 class, 128x128) (default: 80)",
    )
    p.add_argument("--quick", action="store_true", help="a tiny smoke run of every step (not a usable model)")
    args = p.parse_args(argv)
    root = check_output_dir(args.output_dir, "--output-dir")
    recipe = _quick(RECIPES[args.minutes]) if args.quick else RECIPES[args.minutes]
    torch.set_num_threads(recipe["threads"])
    log = root / "standin.log"
    print("recipe: " + ", ".join(f"{k} {v}" for k, v in recipe.items()), flush=True)
    times: dict[str, float] = {}
    train_cmd = _train_command(root, recipe, args.seed, args.resume)
    if not args.eval_only:
        times.update({f"dataset_{k}_s": v for k, v in _dataset(root, recipe, args.seed).items()})
        env_threads = {"OMP_NUM_THREADS": str(recipe["threads"])}
        os.environ.update(env_threads)
        times["train_s"], times["train_cpu_s"] = _run(train_cmd, log)
        print(f"train: {times['train_s'] / 60:.1f} min wall, {times['train_cpu_s'] / 60:.1f} min CPU", flush=True)
    weights = root / "standin.pth"
    _export_weights(root / "run", weights)
    eval_cmd = [
        sys.executable,
        "-m",
        "paadet",
        "eval",
        "--checkpoint",
        str(weights),
        "--ann",
        str(root / "val" / "annotations.json"),
        "--images",
        str(root / "val" / "images"),
        "--per-class",
        "--output-dir",
        str(root / "eval"),
        "--no-progress",
    ]
    if (root / "eval").is_dir():  # a fresh evaluation each time
        for f in (root / "eval").iterdir():
            if f.is_file():
                f.unlink()
    times["eval_s"], times["eval_cpu_s"] = _run(eval_cmd, log)
    metrics = json.loads((root / "eval" / "metrics.json").read_text())
    summary = {
        "ap": metrics.get("AP"),
        "metrics": metrics,
        "classes": list(SHAPES[: recipe["classes"]]),
        "seed": args.seed,
        "recipe": recipe,
        "times": times,
        "train_command": shlex.join(train_cmd),
        "eval_command": shlex.join(eval_cmd),
        "weights": str(weights),
        "torch": torch.__version__,
    }
    atomic_write_json(root / "standin.json", summary, indent=1)
    ap = f"{summary['ap']:.3f}" if isinstance(summary["ap"], float) else summary["ap"]
    print(f"stand-in: AP {ap} on {root / 'val'}; wrote {weights} and {root / 'standin.json'}")
    print(
        "next:\n  "
        + shlex.join(
            [
                "paadet",
                "eval",
                "--checkpoint",
                str(weights),
                "--ann",
                str(root / "val" / "annotations.json"),
                "--images",
                str(root / "val" / "images"),
            ]
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
