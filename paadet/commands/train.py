"""``paadet train``: train or fine-tune PAA R50-FPN or R101-FPN on a COCO-format dataset (mmdetection 3.3's recipes)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from paadet.commands.options import (
    bounded_float,
    nonnegative_float,
    nonnegative_int,
    positive_int,
    probability,
)
from paadet.data.coco import DatasetError, layout_paths, resolve_layout
from paadet.errors import PaadetError
from paadet.fileio import check_output_dir
from paadet.train.config import DEPTHS, MAX_DIST_TIMEOUT_S, MAX_SCALE
from paadet.zoo import RECIPES, find_model

if TYPE_CHECKING:
    from paadet.train.config import TrainConfig
    from paadet.train.hooks import TrainHook

DESCRIPTION = """\
Train PAA (ResNet-50 or ResNet-101 + FPN) on a COCO-format dataset, with mmdetection 3.3's recipe as the
defaults: SGD, momentum 0.9, weight decay 1e-4, linear warm-up over 500 iterations from 0.001x, lr x0.1 after
epochs 8 and 11 of 12, stem and layer1 frozen, BatchNorm in eval mode, images resized to fit 1333x800
and flipped with probability 0.5. --recipe picks another of mmdetection's schedules (epochs, lr steps and
training resize; flags given explicitly override it): 1x (12 epochs, steps 8,11), 1.5x (18; 12,16), 2x (24;
16,22), ms-3x (36; 28,34; each image's scale drawn between 1333x640 and 1333x800, as RandomResize does).

The classes are the annotation file's categories, in its order; they are saved in the checkpoints
(names and category ids), so `paadet predict/eval/export` use them. Start from a PAA checkpoint
(--checkpoint: a file, or a name of `paadet models`; with another class count its classifier is
re-initialised), from torchvision's ImageNet ResNet-50 (--backbone resnet50-0676ba61.pth, downloaded by
you) or ResNet-101 (--depth 101 --backbone resnet101-63fe2227.pth), or from scratch (--from-scratch, best
with --bn-train). The depth is the file's; a --depth that disagrees with it is refused.

The lr: 0.01 is for 16 images per iteration (8 GPUs x 2 images). Scale it linearly with the images per
iteration: --lr 0.000625 x images, e.g. --lr 0.00125 for --batch-size 2 on one GPU.

The output folder gets metrics.jsonl (a row per iteration), epoch_N.pth, latest.pth, best.pth (with
--val-ann/--val-images) and metrics.png. --resume continues an interrupted run (Ctrl-C and SIGTERM save
first, then exit 130 and 143; a killed run restarts from its last latest.pth, written every 10 minutes and at
each epoch's end).

Many GPUs or machines: PyTorch DDP over torchrun, e.g. `torchrun --nproc-per-node 8 -m paadet train
--device cuda ...` (NCCL; gloo on CPUs), or `--nproc N` on one machine. --batch-size is per process,
rank 0 writes the outputs, --resume needs the same number of processes (docs/ddp.md).
"""

TRAIN_SPLIT = "train2017"
TRAIN_ANNOTATIONS, _ = layout_paths(TRAIN_SPLIT)


def scale_spec(text: str) -> tuple[int, int] | tuple[tuple[int, int], tuple[int, int]]:
    """argparse type: ``LONGxSHORT`` (``1333x800``), or two of them comma-separated (``1333x640,1333x800``): the
    range each image's training scale is drawn from (mmdetection's ``RandomResize``)."""
    parts = text.split(",")
    if len(parts) > 2:
        raise argparse.ArgumentTypeError(
            f"expected LONGxSHORT or two of them as a range (1333x640,1333x800), got {text!r}"
        )
    pairs = tuple(scale_pair(part.strip()) for part in parts)
    return pairs[0] if len(pairs) == 1 else pairs  # type: ignore[return-value]


def scale_pair(text: str) -> tuple[int, int]:
    """argparse type: ``LONGxSHORT`` (``1333x800``) as two integers from 1 to :data:`MAX_SCALE`."""
    parts = text.lower().split("x")
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) != 2 or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected LONGxSHORT such as 1333x800, got {text!r}")
    if max(values) > MAX_SCALE:
        raise argparse.ArgumentTypeError(f"{text} cannot fit: each side must be at most {MAX_SCALE} px (docs/train.md)")
    return values  # type: ignore[return-value]


momentum_value = bounded_float(0.0, 1.0, upper_open=True)
"""argparse type of ``--momentum``: a number in [0, 1) (SGD diverges from 1 on)."""
dist_timeout = bounded_float(0.0, MAX_DIST_TIMEOUT_S, lower_open=True)
"""argparse type of ``--dist-timeout``: seconds, > 0 and at most 30 days."""


def epoch_list(text: str) -> tuple[int, ...]:
    """argparse type: comma-separated increasing epochs >= 1 (``8,11``); empty for none."""
    if not text.strip():
        return ()
    try:
        values = tuple(int(p) for p in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated epochs such as 8,11, got {text!r}") from None
    if min(values) < 1 or list(values) != sorted(values):
        raise argparse.ArgumentTypeError(f"expected increasing epochs >= 1, got {text!r}")
    return values


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train",
        help="train or fine-tune PAA on a COCO-format dataset",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    d = p.add_argument_group("data")
    d.add_argument(
        "--data",
        metavar="ROOT",
        default=None,
        help=f"dataset root: ROOT/{TRAIN_ANNOTATIONS.as_posix()}, images in ROOT/images/train2017/ or ROOT/train2017/",
    )
    d.add_argument("--ann", metavar="FILE", default=None, help="COCO annotation file (instead of --data)")
    d.add_argument(
        "--images", metavar="DIR", default=None, help="folder the annotation file's file_name entries are relative to"
    )
    d.add_argument(
        "--scale",
        metavar="LONGxSHORT[,LONGxSHORT]",
        type=scale_spec,
        default=None,
        help=f"keep-ratio resize to fit LONG x SHORT, each at most {MAX_SCALE}; two scales are a range that each "
        "image's scale is drawn from, as mmdetection's RandomResize (e.g. 1333x640,1333x800) (default: the "
        "recipe's, 1333x800)",
    )
    d.add_argument(
        "--flip-prob", metavar="P", type=probability, default=0.5, help="horizontal flip probability (default: 0.5)"
    )
    d.add_argument("--batch-size", metavar="N", type=positive_int, default=2, help="images per iteration (default: 2)")
    d.add_argument("--no-shuffle", action="store_true", help="the annotation file's image order every epoch")
    d.add_argument(
        "--seed",
        type=nonnegative_int,
        default=0,
        help="seed of the order, the flips and the initialisation (default: 0)",
    )
    d.add_argument("--workers", metavar="N", type=nonnegative_int, default=2, help="image-loading threads (default: 2)")
    i = p.add_argument_group("initialisation (one of)")
    start = i.add_mutually_exclusive_group()
    start.add_argument(
        "--checkpoint",
        metavar="FILE|NAME",
        default=None,
        help="a PAA checkpoint to fine-tune: a model name of `paadet models` (downloaded once) or any "
        "paadet/mmdetection PAA .pth",
    )
    start.add_argument(
        "--backbone",
        metavar="FILE",
        default=None,
        help="torchvision's ImageNet ResNet weights (resnet50-*.pth, or resnet101-*.pth with --depth 101); neck "
        "and head as mmdetection initialises them",
    )
    start.add_argument(
        "--from-scratch", action="store_true", help="no weights: mmdetection's initialisation everywhere"
    )
    i.add_argument(
        "--depth",
        type=int,
        choices=DEPTHS,
        default=None,
        help="the ResNet's depth, 50 or 101; refused when the --checkpoint or --backbone file is of another "
        "(default: the file's, 50 from scratch, the run's own with --resume)",
    )
    o = p.add_argument_group("optimisation")
    o.add_argument(
        "--recipe",
        choices=tuple(RECIPES),
        default=None,
        help="mmdetection's schedule: the default epochs, lr steps and training scale(s): 1x (12, 8,11), 1.5x "
        "(18, 12,16), 2x (24, 16,22), ms-3x (36, 28,34, scale 1333x640,1333x800); --epochs, --lr-steps and "
        "--scale override it (default: 1x)",
    )
    o.add_argument(
        "--lr",
        type=nonnegative_float,
        default=0.01,
        help="lr after warm-up, for 16 images per iteration (default: 0.01); scale it linearly with the "
        "images per iteration (all processes): 0.000625 x images, e.g. 0.00125 for --batch-size 2",
    )
    o.add_argument(
        "--optimizer",
        choices=("sgd", "adamw"),
        default="sgd",
        help="sgd (the recipe's momentum SGD) or adamw (torch's AdamW, betas 0.9, 0.999: fewer steps to "
        "learn from scratch; give it its own --lr, e.g. 0.0003, and --weight-decay) (default: sgd)",
    )
    o.add_argument("--momentum", type=momentum_value, default=0.9, help="SGD momentum, in [0, 1) (default: 0.9)")
    o.add_argument(
        "--weight-decay",
        type=nonnegative_float,
        default=1e-4,
        help="SGD's L2 weight decay, or AdamW's decoupled one (default: 1e-4)",
    )
    o.add_argument("--epochs", type=positive_int, default=None, help="epochs (default: the recipe's, 12)")
    o.add_argument(
        "--lr-steps",
        metavar="E1,E2",
        type=epoch_list,
        default=None,
        help="epochs after which the lr is multiplied by 0.1 (default: the recipe's, 8,11)",
    )
    o.add_argument(
        "--warmup-iters",
        metavar="N",
        type=nonnegative_int,
        default=500,
        help="iterations of linear warm-up (default: 500; 0: none)",
    )
    o.add_argument(
        "--warmup-ratio",
        metavar="R",
        type=probability,
        default=0.001,
        help="the warm-up starts at R x lr (default: 0.001)",
    )
    o.add_argument("--max-iters", metavar="N", type=positive_int, default=None, help="stop after N iterations in all")
    o.add_argument(
        "--bn-train",
        action="store_true",
        help="train BatchNorm statistics (default: frozen, as the recipe; use it with --from-scratch)",
    )
    o.add_argument(
        "--frozen-stages",
        metavar="N",
        type=int,
        choices=range(-1, 5),
        default=1,
        help="ResNet stages kept frozen: 1 (the recipe) the stem and layer1, 0 the stem, -1 none "
        "(for --from-scratch) (default: 1)",
    )
    o.add_argument(
        "--amp",
        choices=("bf16", "fp16"),
        default=None,
        help="mixed precision for the network: bf16 (CPUs with AVX512-BF16 or AMX, or CUDA) or fp16 (CUDA, with a "
        "gradient scaler); the assignment and the losses stay float32 (default: float32)",
    )
    o.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the network in channels-last (NHWC) memory format: other convolution kernels, often faster "
        "(docs/benchmarks.md), equal to float32 rounding (default: on with --amp bf16 on a CPU, 2.15x "
        "bf16 NCHW measured at 800x800 on AMX; off otherwise, NCHW as mmdetection; a resumed run keeps its own)",
    )
    o.add_argument(
        "--device",
        default="cpu",
        help="cpu or cuda[:N] (default: cpu); under torchrun give cuda: each process takes cuda:LOCAL_RANK",
    )
    m = p.add_argument_group("many processes (PyTorch DDP; or start this command with torchrun)")
    m.add_argument(
        "--nproc",
        metavar="N",
        type=positive_int,
        default=None,
        help="train with N processes on this machine (torchrun's launcher, standalone): one per GPU "
        "with --device cuda; --batch-size is per process",
    )
    m.add_argument(
        "--dist-timeout",
        metavar="S",
        type=dist_timeout,
        default=1800.0,
        help="seconds a process waits for the others (a validation on rank 0 included) before the run "
        "fails (default: 1800)",
    )
    r = p.add_argument_group("output")
    r.add_argument(
        "--output-dir",
        metavar="DIR",
        required=True,
        help="metrics.jsonl, epoch_N.pth, latest.pth, best.pth and metrics.png go here",
    )
    r.add_argument("--resume", action="store_true", help="continue the run in --output-dir from its latest.pth")
    r.add_argument("--val-ann", metavar="FILE", default=None, help="validation annotation file (COCO format)")
    r.add_argument("--val-images", metavar="DIR", default=None, help="validation image folder")
    r.add_argument(
        "--val-interval",
        metavar="N",
        type=positive_int,
        default=1,
        help="validate every N epochs and after the last (default: 1)",
    )
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def train_files(data: str | None, ann: str | None, images: str | None) -> tuple[Path, Path]:
    """The annotation file and image folder named by ``--data`` or ``--ann``/``--images``, checked to exist."""
    if data is not None:
        if ann is not None or images is not None:
            raise DatasetError("give the dataset as --data ROOT or as --ann FILE --images DIR, not both")
        return resolve_layout(data, TRAIN_SPLIT)
    if ann is None:
        raise DatasetError("no dataset: give --data ROOT, or --ann FILE --images DIR")
    if images is None:
        raise DatasetError(f"--ann {ann} needs --images DIR (the folder its file_name entries are relative to)")
    check_input(ann, "--ann", "annotation file")
    check_input(images, "--images", "image folder")
    return Path(ann), Path(images)


def check_input(path: str, flag: str, what: str) -> None:
    """Raise :class:`DatasetError` (one line) unless ``path`` exists and is ``what`` (a ``... folder`` or a file)."""
    target = Path(path)
    if what.endswith("folder") and target.is_file():
        raise DatasetError(f"{path}: {flag} needs a folder, but this is a file")
    if not what.endswith("folder") and target.is_dir():
        raise DatasetError(f"{path}: {flag} needs a file, but this is a folder")
    if not target.exists():
        raise DatasetError(f"{path}: {what} not found")


def _init_choice(args: argparse.Namespace) -> tuple[str, str | None]:
    if args.checkpoint is not None:
        mode, path = "checkpoint", args.checkpoint
    elif args.backbone is not None:
        mode, path = "backbone", args.backbone
    elif args.from_scratch:
        return "scratch", None
    elif args.resume:
        return "checkpoint", None
    else:
        raise PaadetError(
            "no initialisation: give --checkpoint FILE (fine-tune a PAA model), --backbone FILE "
            "(torchvision's ImageNet ResNet-50 or ResNet-101) or --from-scratch"
        )
    if mode == "checkpoint" and not Path(path).expanduser().exists() and find_model(path) is not None:
        return mode, path  # a model name: its cached file, downloaded once the output folder is checked
    check_input(path, f"--{mode}", f"--{mode} file")
    return mode, path


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The :class:`~paadet.train.TrainConfig` of the parsed flags, after the start-up checks of the inputs and the
    output folder (one line each, before any work)."""
    ann_file, image_dir = train_files(args.data, args.ann, args.images)
    init, init_file = _init_choice(args)
    if (args.val_ann is None) != (args.val_images is None):
        raise PaadetError("validation needs both --val-ann FILE and --val-images DIR")
    if args.val_ann is not None:
        check_input(args.val_ann, "--val-ann", "validation annotation file")
        check_input(args.val_images, "--val-images", "validation image folder")
    inputs = [p for p in (ann_file, init_file, args.val_ann) if p is not None]
    check_output_dir(args.output_dir, "--output-dir", inputs=inputs)
    if init == "checkpoint" and init_file is not None:
        from paadet.hub import resolve_checkpoint

        init_file = str(resolve_checkpoint(init_file))

    from paadet.train import TrainConfig

    return TrainConfig(
        ann_file=ann_file,
        image_dir=image_dir,
        output_dir=args.output_dir,
        init=init,
        init_file=init_file,
        depth=args.depth,
        recipe=args.recipe or "1x",
        scale=args.scale,
        flip_prob=args.flip_prob,
        batch_size=args.batch_size,
        shuffle=not args.no_shuffle,
        seed=args.seed,
        workers=args.workers,
        optimizer=args.optimizer,
        lr=args.lr,
        momentum=args.momentum,
        weight_decay=args.weight_decay,
        epochs=args.epochs,
        lr_steps=args.lr_steps,
        warmup_iters=args.warmup_iters,
        warmup_ratio=args.warmup_ratio,
        max_iters=args.max_iters,
        bn_train=args.bn_train,
        frozen_stages=args.frozen_stages,
        amp=args.amp,
        channels_last=args.channels_last,
        device=args.device,
        resume=args.resume,
        val_ann=args.val_ann,
        val_images=args.val_images,
        val_interval=args.val_interval,
        progress=not args.no_progress,
        dist_timeout_s=args.dist_timeout,
    )


EXIT_TERMINATED = 143
"""The exit status after SIGTERM (128 + 15, as a process killed by it reports), once ``latest.pth`` is saved."""


def run(args: argparse.Namespace, hooks: Iterable[TrainHook] = ()) -> int:
    """Train as the flags say (``hooks``: :class:`~paadet.train.TrainHook` s for scripts that run the command
    themselves); returns the exit status: 0, or 143 after SIGTERM (Ctrl-C raises ``KeyboardInterrupt``)."""
    config = config_from_args(args)
    from paadet.train import TrainingTerminated

    try:
        if args.nproc is not None and args.nproc > 1 and "WORLD_SIZE" not in os.environ:
            from paadet.train.launch import launch_local

            print(launch_local(config, args.nproc))  # hooks run in this process only
            return 0
        from paadet.train import train

        summary = train(config, hooks=hooks)
    except TrainingTerminated:
        print("paadet: terminated (SIGTERM); continue with --resume", file=sys.stderr)
        return EXIT_TERMINATED
    if summary.rank == 0:
        print(summary.line())
    return 0
