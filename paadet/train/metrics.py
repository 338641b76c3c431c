"""``metrics.jsonl``: one JSON object per training iteration (and one per validation), appended as the run goes.

Training rows hold ``iter`` (1-based, over the whole run), ``epoch`` (1-based), ``lr``, ``loss``,
``loss_cls``, ``loss_bbox``, ``loss_iou``, ``num_pos`` (positives after PAA's reassignment, summed over
the batch), ``files`` and ``time``; validation rows hold ``epoch``, ``iter`` and ``val`` (the COCO
metrics). Rows are flushed as written, so a killed run loses at most the row being written; a resumed
run first drops the rows past its checkpoint (and a torn last line), so the file ends up as an
uninterrupted run's would (timings aside). A failed write (a full disk) raises
:class:`~paadet.fileio.OutputWriteError` naming the file, at the row that could not be written.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from paadet.fileio import OutputWriteError, atomic_write_text, writing

__all__ = ["METRICS_NAME", "MetricsLog", "read_rows"]

METRICS_NAME = "metrics.jsonl"


def _plain(value: Any) -> Any:
    """JSON-safe: non-finite floats become None (JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def read_rows(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of a ``metrics.jsonl`` (a torn or unparsable last line is dropped; none when absent)."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


class MetricsLog:
    """An append-only ``metrics.jsonl``.

    Args:
        path: the file.
        keep_upto: ``(iteration, epoch)`` of the checkpoint a resumed run continues from: rows past it
            (training rows with a larger ``iter``, validation rows of a later ``epoch``) are dropped
            first. None starts a new file.
    """

    def __init__(self, path: str | os.PathLike, keep_upto: tuple[int, int] | None = None) -> None:
        self.path = Path(path)
        self.rows: list[dict[str, Any]] = []
        if keep_upto is not None:
            iteration, epoch = keep_upto
            self.rows = [r for r in read_rows(self.path) if _kept(r, iteration, epoch)]
        self._failed = False
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in self.rows))
        with writing(self.path):
            self._stream = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (open for the run, closed by close())

    def append(self, row: dict[str, Any]) -> None:
        """Write one row and flush it.

        Raises:
            OutputWriteError: the row could not be written (a full disk); the message names the file.
        """
        row = _plain(row)
        with self._write():
            self._stream.write(json.dumps(row) + "\n")
            self._stream.flush()
        self.rows.append(row)

    def sync(self) -> None:
        """fsync the rows written so far."""
        with self._write():
            self._stream.flush()
            os.fsync(self._stream.fileno())

    def close(self) -> None:
        """Sync and close; after a failed write, close without raising again (the first error is the one to see)."""
        if self._stream.closed:
            return
        try:
            if not self._failed:
                self.sync()
        finally:
            with contextlib.suppress(OSError):  # the unwritten rest of a failed write: already reported
                self._stream.close()

    @contextlib.contextmanager
    def _write(self) -> Iterator[None]:
        try:
            with writing(self.path):
                yield
        except OutputWriteError:
            self._failed = True
            raise


def _kept(row: dict[str, Any], iteration: int, epoch: int) -> bool:
    if "val" in row:
        return isinstance(row.get("epoch"), int) and row["epoch"] <= epoch
    return isinstance(row.get("iter"), int) and row["iter"] <= iteration
