"""The ``paadet`` command: ``predict``, ``eval``, ``export``, ``bench``, ``batch``."""
from __future__ import annotations

import argparse
import importlib
import sys

from . import __version__
from .errors import PaadetError

COMMANDS = ("predict", "eval", "export", "bench", "batch")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="paadet", description="PAA object detector: predict, evaluate, export, benchmark, batch-predict over Ray.")
    parser.add_argument("--version", action="version", version=f"paadet {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"paadet.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"paadet.commands.{name}":
                raise
            continue
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
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
