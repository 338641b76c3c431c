"""One-line console output: messages on stderr that do not break a progress bar, and short lists for messages."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

MAX_LISTED = 5


def listed(values: Sequence[Any], most: int = MAX_LISTED) -> str:
    """``1, 2, 3 and 4 more``: the first ``most`` values of a list, for one-line messages."""
    head = ", ".join(str(v) for v in values[:most])
    return head + (f" and {len(values) - most} more" if len(values) > most else "")


def stderr(message: str) -> None:
    """Write one line to stderr, above any tqdm progress bar (tqdm is imported only here, when used)."""
    from tqdm import tqdm

    tqdm.write(message, file=sys.stderr)
