"""One-line console output: messages on stderr that do not break a progress bar, and short lists for messages."""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator, Sequence
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


RAY_TOKEN_NOTICE_LOGGER = "ray._private.authentication.authentication_token_setup"
"""Where Ray logs, on every ``ray.init()`` that starts a local instance, that it turned token authentication on
(or that it is off). For the local instance paadet starts, that is Ray's default and needs nothing from the user
(the token is ``~/.ray/auth_token``), so :func:`quieted` hides the notice there."""


@contextlib.contextmanager
def quieted(logger: str, level: int = logging.ERROR) -> Iterator[None]:
    """Within the block, ``logger`` logs only at ``level`` and above; its level is put back afterwards."""
    log = logging.getLogger(logger)
    before = log.level
    log.setLevel(level)
    try:
        yield
    finally:
        log.setLevel(before)
