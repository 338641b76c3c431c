"""The journal of an evaluation run: an append-only JSON Lines file, one line per image, that ``--resume`` reads back.

A header line holds the run's settings; each later line one image's detections (or why it has none).
Lines are flushed as written and fsynced once per batch of images by the caller, so a run killed at any
point loses at most the line being written; :meth:`Journal.open` with ``resume`` drops a torn last line
and refuses a journal made with other settings or damaged before its end. A write that fails (a full disk)
is an :class:`~paadet.fileio.OutputWriteError` naming the journal, in one line that says to ``--resume``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from paadet.console import stderr
from paadet.data.coco import is_coco_id
from paadet.errors import PaadetError
from paadet.fileio import writing

JOURNAL_NAME = "journal.jsonl"
JOURNAL_FORMAT = "paadet-eval-journal"
JOURNAL_VERSION = 1
RESUME_HINT = "the images before it are kept: free some space, then rerun with --resume to continue"


class JournalError(PaadetError):
    """An evaluation journal that cannot be resumed (other settings, other dataset, corrupt)."""


def journal_entries(image_id: int, dets: list[list[float]]) -> list[dict]:
    """Journal detections ``[category_id, x, y, w, h, score]`` -> COCO results entries."""
    return [
        {"image_id": image_id, "category_id": int(d[0]), "bbox": [d[1], d[2], d[3], d[4]], "score": d[5]} for d in dets
    ]


@dataclass
class JournalRecord:
    """One image's line of the journal.

    Attributes:
        image_id: COCO image id.
        file_name: the image's file name in the annotation file (checked on resume).
        status: ``ok``, ``missing`` (no such file) or ``unreadable`` (cannot be decoded).
        dets: detections as ``[category_id, x, y, w, h, score]`` (COCO results values).
        error: the reason, when not ``ok``.
    """

    image_id: int
    file_name: str
    status: str
    dets: list[list[float]]
    error: str | None = None

    def to_line(self) -> bytes:
        obj: dict[str, Any] = {
            "image_id": self.image_id,
            "file_name": self.file_name,
            "status": self.status,
            "dets": self.dets,
        }
        if self.error is not None:
            obj["error"] = self.error
        return (json.dumps(obj, separators=(",", ":")) + "\n").encode("utf-8")

    @classmethod
    def from_obj(cls, obj: Any) -> JournalRecord:
        if not isinstance(obj, dict) or not is_coco_id(obj.get("image_id")) or not isinstance(obj.get("dets"), list):
            raise ValueError("not an image record")
        return cls(obj["image_id"], str(obj.get("file_name")), str(obj.get("status")), obj["dets"], obj.get("error"))


class Journal:
    """The append-only JSON Lines file of an evaluation run (header line, then one line per image).

    Use :meth:`open`; :meth:`append` writes and flushes one record, :meth:`sync` fsyncs.
    """

    def __init__(self, path: Path, stream: io.BufferedWriter, records: dict[int, JournalRecord]) -> None:
        self.path = path
        self._stream = stream
        self.records = records
        self._unsynced = 0

    @classmethod
    def open(
        cls, path: str | os.PathLike, settings: dict[str, Any], resume: bool, log: Callable[[str], None] = stderr
    ) -> Journal:
        """Create a journal, or with ``resume`` continue an existing one made with the same ``settings``.

        Raises:
            JournalError: a journal exists and ``resume`` is false; or its settings differ; or it is corrupt.
        """
        path = Path(path)
        header = {"format": JOURNAL_FORMAT, "version": JOURNAL_VERSION, "settings": settings}
        records: dict[int, JournalRecord] = {}
        if path.exists() and not resume:
            raise JournalError(
                f"{path}: a journal from an earlier run is here; pass --resume to continue it, "
                f"or choose another --output-dir (or delete the folder) to start over"
            )
        if resume and path.exists():
            good_bytes, stored, records = cls._read(path)
            if stored is not None:
                if stored.get("settings") != settings:
                    raise JournalError(
                        f"{path}: cannot resume, the journal was made with other settings "
                        f"({_diff(stored.get('settings'), settings)})"
                    )
                if good_bytes < path.stat().st_size:
                    log(f"warning: {path}: dropping a torn last line (the earlier run stopped while writing it)")
                with writing(path, RESUME_HINT):
                    stream = open(path, "r+b")  # noqa: SIM115 (the journal's handle, open until close())
                    stream.truncate(good_bytes)
                    stream.seek(good_bytes)
                return cls(path, stream, records)
            log(f"warning: {path}: no complete header line; starting a new journal")
        elif resume:
            log(f"note: {path} does not exist; nothing to resume, starting from the first image")
        with writing(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            stream = open(path, "wb")  # noqa: SIM115 (the journal's handle, open until close())
            try:
                stream.write((json.dumps(header, separators=(",", ":")) + "\n").encode("utf-8"))
                stream.flush()
                os.fsync(stream.fileno())
            except BaseException:
                _close_quietly(stream)
                path.unlink(missing_ok=True)  # a journal without its header would only be refused later
                raise
        return cls(path, stream, records)

    @staticmethod
    def _read(path: Path) -> tuple[int, dict | None, dict[int, JournalRecord]]:
        """Parse a journal: (bytes of the good prefix, header or None, records by image id; last wins).

        A final line that is incomplete or does not parse is a torn write and is left out; a bad line
        followed by good ones means the file was damaged otherwise.
        """
        data = path.read_bytes()
        lines = data.split(b"\n")
        header: dict | None = None
        records: dict[int, JournalRecord] = {}
        offset = 0
        good = 0
        bad_line: int | None = None
        for number, raw in enumerate(lines, start=1):
            complete = number < len(lines)  # the piece after the last newline has none
            end = offset + len(raw) + (1 if complete else 0)
            if raw.strip():
                try:
                    if not complete:
                        raise ValueError("no newline")
                    obj = json.loads(raw)
                    if header is None:
                        if not (isinstance(obj, dict) and obj.get("format") == JOURNAL_FORMAT):
                            raise JournalError(f"{path}: not a paadet evaluation journal (line 1)")
                        if obj.get("version") != JOURNAL_VERSION:
                            raise JournalError(f"{path}: journal version {obj.get('version')} is not {JOURNAL_VERSION}")
                        header = obj
                    else:
                        record = JournalRecord.from_obj(obj)
                        records[record.image_id] = record
                except (ValueError, UnicodeDecodeError, RecursionError):
                    if bad_line is None:
                        bad_line = number
                else:
                    if bad_line is not None:
                        raise JournalError(
                            f"{path}: line {bad_line} is damaged but later lines are not; "
                            "delete the journal to start over"
                        )
                    good = end
            elif bad_line is None:
                good = end
            offset = end
        return good, header, records

    def append(self, record: JournalRecord) -> None:
        """Write and flush one record.

        Raises:
            OutputWriteError: the write failed (a full disk); names the journal and says to ``--resume``.
        """
        with writing(self.path, RESUME_HINT):
            self._stream.write(record.to_line())
            self._stream.flush()
        self.records[record.image_id] = record
        self._unsynced += 1

    def sync(self) -> None:
        """fsync what was appended since the last call."""
        if self._unsynced:
            with writing(self.path, RESUME_HINT):
                self._stream.flush()
                os.fsync(self._stream.fileno())
            self._unsynced = 0

    @property
    def unsynced(self) -> int:
        return self._unsynced

    def close(self) -> None:
        """Sync and close; the handle is closed even when the last write fails (which then raises)."""
        if not self._stream.closed:
            try:
                self.sync()
            finally:
                _close_quietly(self._stream)


def _close_quietly(stream: io.BufferedIOBase) -> None:
    """Close ``stream``; a flush that fails on the way (a full disk) has been reported, or will be, by the caller."""
    with contextlib.suppress(OSError):
        stream.close()


def _diff(stored: Any, current: dict[str, Any]) -> str:
    """``key: X in the journal, Y now`` for the settings that differ."""
    if not isinstance(stored, dict):
        return "the journal has no settings"
    keys = sorted(set(stored) | set(current))
    parts = [
        f"{k}: {stored.get(k)!r} in the journal, {current.get(k)!r} now"
        for k in keys
        if stored.get(k) != current.get(k)
    ]
    return "; ".join(parts)
