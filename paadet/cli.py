"""The ``paadet`` command: ``predict``, ``eval``, ``export``, ``quantize``, ``bench``, ``batch``, ``train``, ``serve``,
``models``.

Only the module of the command being run is imported (the others are listed by name and one line
of help), so ``paadet --help`` and ``paadet --version`` return at once, without importing torch.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import sys

from paadet.errors import PaadetError, one_line
from paadet.version import __version__

COMMANDS: dict[str, str] = {
    "predict": "detect objects in images",
    "eval": "COCO box metrics of the model (or of a results file) on an annotated dataset",
    "export": "export PAA to ONNX (one graph: uint8 pixels in, detections out)",
    "quantize": "INT8 post-training quantisation of an exported graph (runs on openvino or onnxruntime)",
    "bench": "measure throughput and latency (engine and end to end)",
    "batch": "detect on many images with a pool of Ray workers (resumable)",
    "train": "train or fine-tune PAA on a COCO-format dataset",
    "data": "write a data set to train on (the synthetic shapes, COCO format)",
    "serve": "serve detections over HTTP (dynamic batching, limits, a web page)",
    "models": "the published PAA checkpoints by name (--checkpoint NAME), and which are in the cache",
}
"""Every sub-command and its one-line help (the module ``paadet.commands.<name>`` implements it)."""

NO_TORCH_THREADS = frozenset({"data", "models"})
"""The commands that run no torch: the others look at the CPU's load before torch loads
(:func:`paadet.cpu.choose_openmp_wait_policy`)."""


def _command_in(argv: list[str]) -> str | None:
    """The sub-command named by ``argv`` (its first argument that is not an option), if it is one of ours."""
    for arg in argv:
        if not arg.startswith("-"):
            return arg if arg in COMMANDS else None
    return None


def build_parser(command: str | None = None, all_commands: bool = True) -> argparse.ArgumentParser:
    """The parser. With ``all_commands`` every command is loaded; otherwise only ``command`` (others are stubs)."""
    parser = argparse.ArgumentParser(
        prog="paadet",
        description="PAA object detector: predict, evaluate, export, benchmark, batch-predict over Ray, train.",
    )
    parser.add_argument("--version", action="version", version=f"paadet {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, summary in COMMANDS.items():
        if not all_commands and name != command:
            sub.add_parser(name, help=summary, add_help=False)
            continue
        try:
            module = importlib.import_module(f"paadet.commands.{name}")
        except ImportError as exc:  # an optional dependency of one command must not break the others
            add_unavailable(sub, name, exc)
            continue
        module.add_parser(sub)
    return parser


def add_unavailable(subparsers: argparse._SubParsersAction, name: str, exc: ImportError) -> None:
    """Register ``name`` so that running it says which package is missing, in one line."""
    missing = exc.name or str(exc)
    p = subparsers.add_parser(name, help=f"(unavailable: needs {missing})", add_help=False)

    def run(args: argparse.Namespace) -> int:
        raise RuntimeError(
            f"`paadet {name}` needs the Python package {missing!r}, which is not installed "
            f"({one_line(exc)}); install it with pip"
        )

    p.set_defaults(func=run, accepts_any_arguments=True)


_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}
"""A full disk, a quota, a file too large, a read-only file system: the user's to fix, not a traceback."""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(_command_in(argv), all_commands=False)
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "accepts_any_arguments", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    if args.command not in NO_TORCH_THREADS:
        from paadet.cpu import choose_openmp_wait_policy

        choose_openmp_wait_policy()  # a tenth of a second; on a busy CPU, torch's threads then wait passively
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("paadet: interrupted", file=sys.stderr)
        return 130
    except (PaadetError, FileNotFoundError, ValueError, RuntimeError) as exc:
        print(f"paadet {args.command}: error: {one_line(exc)}", file=sys.stderr)
        return 2
    except OSError as exc:
        if exc.errno not in _WRITE_ERRNOS:
            raise
        # a write that no command wrapped: still one line, naming the file where the OS says which
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"paadet {args.command}: error: {where}cannot write ({exc.strerror or exc})", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
