"""``paadet batch``: detection over many images on a Ray cluster, into a resumable sharded output folder.

This module imports nothing heavy: the output paths are checked (within a second, before torch and
Ray are imported) and only then is :mod:`paadet.batch` loaded.
"""

from __future__ import annotations

import argparse
import sys

from paadet.commands.options import ModelOptions, nonnegative_float, positive_float, positive_int

MODEL = ModelOptions()
DEFAULT_START_TIMEOUT = 120.0  # paadet.batch.DEFAULT_START_TIMEOUT (not imported here: it pulls in torch)


def gpu_amount(text: str) -> float:
    """argparse type of ``--gpus-per-worker``: a number >= 0, whole when above 1 (fractions only below 1)."""
    value = nonnegative_float(text)
    if value > 1 and value != int(value):
        raise argparse.ArgumentTypeError(
            f"must be a whole number when above 1 (Ray shares a GPU only in fractions below 1), got {text}"
        )
    return value


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "batch",
        help="detect on many images with a pool of Ray workers (resumable)",
        description="Detect objects in image files, folders (searched recursively) and .txt lists of image paths "
        "with a pool of Ray actors, one model each. Results go to sharded JSON Lines files under "
        "--output-dir, each committed with a manifest; running again with the same folder does only "
        "what is left. Needs the ray extra: pip install 'paadet[ray]'.",
        epilog="In a .txt list, one path a line, relative to the list's folder; '#' at the start of a line or after "
        "whitespace starts a comment ('a.jpg  # the cat' is a.jpg), elsewhere it is part of the name.",
    )
    p.add_argument(
        "inputs", nargs="+", metavar="INPUT", help="image files, folders and/or .txt files listing image paths"
    )
    p.add_argument("--output-dir", "-o", required=True, help="output folder (shards/, errors.jsonl, summary.json)")
    p.add_argument(
        "--ray",
        metavar="ADDRESS",
        default=None,
        help="join this Ray cluster (auto, HOST:PORT or ray://HOST:PORT); default: start a local instance",
    )
    p.add_argument(
        "--num-workers",
        type=positive_int,
        default=None,
        metavar="N",
        help="Ray actors, one model each (default: as many as the cluster's nodes hold)",
    )
    p.add_argument(
        "--cpus-per-worker",
        type=positive_float,
        default=1.0,
        metavar="C",
        help="CPUs per actor, also its torch threads (default: 1)",
    )
    p.add_argument(
        "--gpus-per-worker",
        type=gpu_amount,
        default=None,
        metavar="G",
        help="GPUs per actor (default: 1 with --device cuda, else 0; 0.5 puts two models on a GPU)",
    )
    p.add_argument(
        "--shard-size",
        type=positive_int,
        default=None,
        metavar="N",
        help="images per shard: the unit of commit and retry (default: min(64, ceil(images / (4 x workers))), "
        "i.e. 64 on a large input, about 4 shards per worker on a small one)",
    )
    p.add_argument(
        "--max-attempts",
        type=positive_int,
        default=3,
        metavar="N",
        help="tries per image before it is left for a re-run; a failed shard is retried, then split (default: 3)",
    )
    p.add_argument(
        "--start-timeout",
        type=positive_float,
        default=DEFAULT_START_TIMEOUT,
        metavar="SECONDS",
        help="give up when Ray has started no worker in this time (the cluster's resources are taken; "
        f"default: {DEFAULT_START_TIMEOUT:g}); workers it has not started by then are dropped",
    )
    p.add_argument(
        "--coco",
        metavar="FILE",
        default=None,
        help="also write all results as one COCO results JSON, as `paadet predict --output` does",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    MODEL.add_to(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from paadet.fileio import check_output_dir, check_output_file

    check_output_dir(args.output_dir, "--output-dir", args.inputs)  # before torch and Ray are even imported
    if args.coco is not None:
        check_output_file(args.coco, "--coco", args.inputs)
    from paadet.batch import run_batch

    summary = run_batch(
        args.inputs,
        args.output_dir,
        MODEL.spec(args),
        address=args.ray,
        num_workers=args.num_workers,
        cpus_per_worker=args.cpus_per_worker,
        gpus_per_worker=args.gpus_per_worker,
        shard_size=args.shard_size,
        max_attempts=args.max_attempts,
        coco_output=args.coco,
        progress=not args.no_progress,
        start_timeout=args.start_timeout,
    )
    for line in summary.lines():
        print(line)
    if summary.failed:
        print(
            f"paadet batch: {summary.failed} images failed; run the same command again to retry them", file=sys.stderr
        )
        return 2
    return 1 if summary.errors_listed else 0
