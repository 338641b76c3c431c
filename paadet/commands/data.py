"""``paadet data synthetic``: write paadet's synthetic shapes data set (COCO format) to train and evaluate on.

``DIR/train/`` and ``DIR/val/`` each get ``annotations.json`` (COCO ``instances``) and ``images/*.jpg``, written by
:func:`paadet.data.synthetic.generate_split` (every file atomically, the annotation file last). The defaults are
the data of the quick recipe (docs/standin.md): 128x128 images, 1 class (circles), objects of 40 to 112 px, up
to 3 per image, at most 1 distractor. The command prints the ``paadet train`` line that trains the quick recipe on
what it wrote.
"""

from __future__ import annotations

import argparse
import shlex
import time
from pathlib import Path

from paadet.commands.options import nonnegative_int, positive_int
from paadet.errors import PaadetError
from paadet.fileio import OutputPathError, check_output_dir

SHAPE_COUNT = 8
"""How many shape classes the generator has (``paadet.data.synthetic.SHAPES``; not imported here, so that
``--help`` stays light)."""

QUICK_TRAIN_FLAGS = (
    "--from-scratch",
    "--bn-train",
    "--frozen-stages",
    "-1",
    "--batch-size",
    "4",
    "--optimizer",
    "adamw",
    "--lr",
    "0.0003",
    "--weight-decay",
    "0.05",
    "--epochs",
    "3",
    "--lr-steps",
    "2",
    "--warmup-iters",
    "100",
    "--val-interval",
    "2",
)
"""The quick recipe's ``paadet train`` flags besides the data and ``--scale`` (docs/standin.md; the same as
``tools/train_standin.py --minutes 20``)."""


def size_range(text: str) -> tuple[int, int]:
    """argparse type: ``MIN,MAX`` object sizes in pixels, ``4 <= MIN <= MAX``."""
    parts = text.split(",")
    try:
        low, high = (int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN,MAX in pixels such as 32,112, got {text!r}") from None
    if not 4 <= low <= high:
        raise argparse.ArgumentTypeError(f"expected 4 <= MIN <= MAX, got {text!r}")
    return low, high


def class_count(text: str) -> int:
    """argparse type: a class count from 1 to :data:`SHAPE_COUNT`."""
    value = positive_int(text)
    if value > SHAPE_COUNT:
        raise argparse.ArgumentTypeError(f"the generator has {SHAPE_COUNT} shapes; got {value}")
    return value


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "data",
        help="write a data set to train on (the synthetic shapes, COCO format)",
        description="Write a data set. `paadet data synthetic --output DIR` writes paadet's synthetic shapes in COCO "
        "format (DIR/train and DIR/val), the data of the quick recipe that trains a usable model on a CPU in about "
        "20 minutes (docs/data.md).",
    )
    sub = p.add_subparsers(dest="data_command", metavar="KIND", required=True)
    s = sub.add_parser(
        "synthetic",
        help="shapes on cluttered backgrounds, boxes and classes in COCO format",
        description="Write DIR/train/ and DIR/val/ (each annotations.json + images/): square JPEGs of shapes (circle, "
        "square, triangle, star, cross, ring, hexagon, heart: the first --classes of them) with random fills, "
        "rotations and occlusion on cluttered backgrounds. Every image is a function of (--seed, split, index). "
        "The defaults are the quick recipe's data; it prints the `paadet train` command that trains on it.",
    )
    s.add_argument("--output", metavar="DIR", required=True, help="a new or empty folder for train/ and val/")
    s.add_argument("--train", metavar="N", type=positive_int, default=800, help="train images (default: 800)")
    s.add_argument("--val", metavar="M", type=positive_int, default=150, help="val images (default: 150)")
    s.add_argument(
        "--size", metavar="S", type=positive_int, default=128, help="image side in pixels, >= 32 (default: 128)"
    )
    s.add_argument(
        "--classes",
        metavar="K",
        type=class_count,
        default=1,
        help=f"classes, the first K shapes (circle, square, triangle, star, ...), 1 to {SHAPE_COUNT} (default: 1, "
        "circles)",
    )
    s.add_argument(
        "--object-sizes",
        metavar="MIN,MAX",
        type=size_range,
        default=(40, 112),
        help="object sizes in pixels, log-uniform; MAX at most --size; objects under ~20 px get no anchor "
        "(default: 40,112)",
    )
    s.add_argument(
        "--max-objects", metavar="N", type=positive_int, default=3, help="objects per image: 1 to N (default: 3)"
    )
    s.add_argument(
        "--clutter",
        metavar="N",
        type=nonnegative_int,
        default=1,
        help="distractors per image (lines, dots, arcs, blobs): 0 to N (default: 1)",
    )
    s.add_argument("--seed", type=nonnegative_int, default=0, help="seed of every image (default: 0)")
    s.set_defaults(func=run)
    return p


def check_empty_output(path: str) -> Path:
    """The ``--output`` folder, checked before any work: writable, and new or empty (one-line errors)."""
    out = check_output_dir(path, "--output")
    if out.is_dir() and any(out.iterdir()):
        raise OutputPathError(f"{out}: --output is not empty; give a new or empty folder")
    return out


def next_command(out: Path, size: int) -> str:
    """The ``paadet train`` command line of the quick recipe on the data set in ``out``."""
    train, val = out / "train", out / "val"
    cmd = ["paadet", "train", "--ann", str(train / "annotations.json"), "--images", str(train / "images")]
    cmd += ["--val-ann", str(val / "annotations.json"), "--val-images", str(val / "images")]
    cmd += ["--output-dir", str(out / "run"), "--scale", f"{size}x{size}", *QUICK_TRAIN_FLAGS]
    return shlex.join(cmd)


def run(args: argparse.Namespace) -> int:
    from paadet.data.synthetic import SyntheticSpec, generate_split

    low, high = args.object_sizes
    if args.size < 32:
        raise PaadetError(f"--size {args.size}: images must be at least 32 px")
    if high > args.size:
        raise PaadetError(f"--object-sizes {low},{high}: MAX must be at most --size ({args.size})")
    spec = SyntheticSpec(
        size=args.size,
        min_size=low,
        max_size=high,
        max_objects=args.max_objects,
        clutter=args.clutter,
        classes=args.classes,
    )
    out = check_empty_output(args.output)
    for split, count in (("train", args.train), ("val", args.val)):
        start = time.perf_counter()
        ann, _ = generate_split(out / split, count, split=split, seed=args.seed, spec=spec)
        print(f"wrote {count} {split} images and {ann} in {time.perf_counter() - start:.1f} s", flush=True)
    print(f"next (the quick recipe, docs/standin.md):\n  {next_command(out, args.size)}")
    return 0
