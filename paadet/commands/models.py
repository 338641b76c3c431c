"""``paadet models``: the published PAA checkpoints that ``--checkpoint NAME`` takes, and which are cached here.

Reads :mod:`paadet.zoo` only (no torch): a table on stdout, or with ``--json`` every fact of every entry.
"""

from __future__ import annotations

import argparse
import json

from paadet.zoo import MODELS, PARAMETERS, ModelEntry, cache_dir

SIZE_NOTE = (
    "size: estimated from the float32 state dict ({}), not measured on the download; the file adds a few kB of "
    "metadata".format(", ".join(f"R-{depth} {count / 1e6:.1f}M parameters" for depth, count in PARAMETERS.items()))
)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "models",
        help="the published PAA checkpoints by name (--checkpoint NAME), and which are in the cache",
        description="List mmdetection's seven PAA checkpoints (COCO, box AP as published with score voting / "
        "without) and whether each is in the cache folder. Any name is a --checkpoint of predict, eval, export, "
        "bench, batch, serve and train: its file is downloaded to the cache once, with its hash checked.",
    )
    p.add_argument("--json", action="store_true", help="print every entry's facts as JSON instead of a table")
    p.set_defaults(func=run)
    return p


def _ap(entry: ModelEntry) -> str:
    none = f"{entry.box_ap_no_voting:.1f}" if entry.box_ap_no_voting is not None else "-"
    return f"{entry.box_ap:.1f} / {none}"


def _schedule(entry: ModelEntry) -> str:
    recipe = entry.schedule
    return f"{recipe.name} ({recipe.epochs} ep{', multi-scale' if recipe.multi_scale else ''})"


def table() -> str:
    """The table ``paadet models`` prints: one row per checkpoint, then the cache folder and the size note."""
    header = ("name", "backbone", "schedule", "box AP (voting / none)", "size", "cached")
    rows = [
        (
            e.name,
            e.backbone,
            _schedule(e),
            _ap(e),
            f"~{e.estimated_bytes / 1e6:.0f} MB",
            "yes" if e.cached_path().is_file() else "no",
        )
        for e in MODELS.values()
    ]
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows]
    title = "  ".join(cell.ljust(width) for cell, width in zip(header, widths, strict=True)).rstrip()
    return "\n".join(
        [
            title,
            *lines,
            "",
            f"cache folder: {cache_dir()} ($PAADET_CACHE, else $XDG_CACHE_HOME/paadet, else ~/.cache/paadet)",
            SIZE_NOTE,
            "use: --checkpoint NAME (downloaded once); an existing file of that name is used instead",
        ]
    )


def run(args: argparse.Namespace) -> int:
    if args.json:
        document = {
            "cache_dir": str(cache_dir()),
            "size_note": SIZE_NOTE,
            "models": [entry.to_json() for entry in MODELS.values()],
        }
        print(json.dumps(document, indent=2))
    else:
        print(table())
    return 0
