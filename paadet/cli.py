"""The ``paadet`` command: ``predict``, ``eval``, ``export``, ``bench``, ``batch``."""
from __future__ import annotations

import argparse
import importlib
import sys

from . import __version__
from .errors import PaadetError, one_line

COMMANDS = ("predict", "eval", "export", "bench", "batch")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="paadet", description="PAA object detector: predict, evaluate, export, benchmark, batch-predict over Ray.")
    parser.add_argument("--version", action="version", version=f"paadet {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
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
        raise RuntimeError(f"`paadet {name}` needs the Python package {missing!r}, which is not installed "
                           f"({one_line(exc)}); install it with pip")

    p.set_defaults(func=run, accepts_any_arguments=True)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "accepts_any_arguments", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("paadet: interrupted", file=sys.stderr)
        return 130
    except (PaadetError, FileNotFoundError, ValueError, RuntimeError) as exc:
        print(f"paadet {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
