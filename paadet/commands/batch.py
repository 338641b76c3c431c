"""``paadet batch``: detection over many images on a Ray cluster, into a resumable sharded output folder."""
from __future__ import annotations

import argparse
import sys

from ..distributed import ModelSpec, run_batch
from .common import add_model_options


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "batch", help="detect on many images with a pool of Ray workers (resumable)",
        description="Detect objects in image files, folders (searched recursively) and .txt lists of image paths "
                    "with a pool of Ray actors, one model each. Results go to sharded JSON Lines files under "
                    "--output-dir, each committed with a manifest; running again with the same folder does only "
                    "what is left. Needs the ray extra: pip install 'paadet[ray]'.",
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders and/or .txt files listing image paths")
    p.add_argument("--output-dir", "-o", required=True, help="output folder (shards/, errors.jsonl, summary.json)")
    p.add_argument("--ray", metavar="ADDRESS", default=None,
                   help="join this Ray cluster (auto, HOST:PORT or ray://HOST:PORT); default: start a local instance")
    p.add_argument("--num-workers", type=int, default=None,
                   help="Ray actors, one model each (default: as many as the cluster's GPUs, or CPUs, hold)")
    p.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs per actor, also its torch threads (default: 1)")
    p.add_argument("--gpus-per-worker", type=float, default=None,
                   help="GPUs per actor (default: 1 with --device cuda, else 0)")
    p.add_argument("--shard-size", type=int, default=64, help="images per shard: the unit of commit and retry (default: 64)")
    p.add_argument("--max-attempts", type=int, default=3,
                   help="tries per shard before its images are left for a re-run (default: 3)")
    p.add_argument("--coco", metavar="FILE", default=None,
                   help="also write all results as one COCO results JSON, as `paadet predict --output` does")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_model_options(p)
    p.set_defaults(func=run)


def spec_from_args(args: argparse.Namespace) -> ModelSpec:
    """The model options of :func:`~paadet.commands.common.add_model_options` as a :class:`ModelSpec`.

    The torch backend's preset is made explicit (so a re-run with or without ``--preset mmdet`` is the
    same run); ONNX Runtime keeps None, meaning the graph's.
    """
    preset = args.preset if args.preset is not None or args.backend != "torch" else args.default_preset
    return ModelSpec(
        backend=args.backend, checkpoint=args.checkpoint, model=args.model, providers=args.providers,
        preset=preset, device=args.device, batch_size=args.batch_size, fp16=args.fp16,
        score_voting=not args.no_score_voting, workers=args.workers, optimize=args.optimize,
    )


def run(args: argparse.Namespace) -> int:
    summary = run_batch(
        args.inputs, args.output_dir, spec_from_args(args), address=args.ray, num_workers=args.num_workers,
        cpus_per_worker=args.cpus_per_worker, gpus_per_worker=args.gpus_per_worker, shard_size=args.shard_size,
        max_attempts=args.max_attempts, coco_output=args.coco, progress=not args.no_progress,
    )
    for line in summary.lines():
        print(line)
    if summary.failed:
        print(f"paadet batch: {summary.failed} images failed; run the same command again to retry them", file=sys.stderr)
        return 2
    return 1 if summary.errors_listed else 0
