"""A full or filling disk, simulated: writes into one folder fail with ``OSError(ENOSPC)`` once a byte budget is
spent (:func:`full_disk`: no byte fits), or at once for files whose names contain given parts (``epoch_2.pth``).

Python opens every file through ``io.open`` (``open``, ``os.fdopen`` on a ``mkstemp`` handle, as
:func:`paadet.fileio.atomic_write_bytes` does). :func:`filling_disk` replaces it (and ``builtins.open``) so that a
file opened for writing under ``folder`` comes back wrapped: opening works, as it does on a full disk, and a
``write`` that does not fit raises ``OSError(errno.ENOSPC, "No space left on device")`` without a file name, as the
kernel's error has none. Files opened by descriptor are placed by ``/proc/self/fd`` (Linux); a temporary
``.epoch_2.pth.XXXXXXXX.tmp`` counts as ``epoch_2.pth``. Nothing outside ``folder`` changes.

In a test: ``with full_disk(out): code = main([...])`` or ``with filling_disk(out, names=("metrics.jsonl",)): ...``.
As a script, to see what a user sees (no ``--budget`` and no ``--name``: the disk is full)::

    python tests/full_disk.py FOLDER [--budget BYTES] [--name PART]... -- paadet-arguments...
"""

from __future__ import annotations

import argparse
import builtins
import contextlib
import errno
import io
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path


class _Disk:
    """The bytes left: writes to the files it covers spend them; None: no budget (only ``names`` fail)."""

    def __init__(self, budget: int | None) -> None:
        self.left = budget

    def spend(self, size: int, fail: bool) -> None:
        if fail or (self.left is not None and size > self.left):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        if self.left is not None:
            self.left -= size


class _FillingFile:
    """A file opened for writing on the filling disk; everything but ``write`` is the real file's."""

    def __init__(self, real, disk: _Disk, fail: bool) -> None:
        self._real, self._disk, self._fail = real, disk, fail

    def write(self, data) -> int:
        size = len(data.encode("utf-8")) if isinstance(data, str) else memoryview(data).nbytes
        self._disk.spend(size, self._fail)
        return self._real.write(data)

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._real.close()

    def __iter__(self):
        return iter(self._real)

    def __getattr__(self, name: str):
        return getattr(self._real, name)


def _path_of(target) -> Path | None:
    """Where a file given to ``open`` lies: a path, or a descriptor's target (None: neither)."""
    if isinstance(target, int):
        try:
            return Path(os.readlink(f"/proc/self/fd/{target}"))
        except OSError:
            return None
    if isinstance(target, (str, bytes, os.PathLike)):
        return Path(os.path.realpath(os.fsdecode(target)))
    return None


@contextlib.contextmanager
def filling_disk(folder: str | os.PathLike, budget: int | None = None, names: Sequence[str] = ()) -> Iterator[None]:
    """Within the block, files written under ``folder`` share ``budget`` bytes (None: no limit), and every write
    to a file whose name contains one of ``names`` fails; then ``OSError(ENOSPC)``."""
    root = Path(os.path.realpath(folder))
    disk, real_open = _Disk(budget), io.open

    def patched_open(file, mode="r", *args, **kwargs):
        handle = real_open(file, mode, *args, **kwargs)
        if not any(c in mode for c in "wax+"):
            return handle
        path = _path_of(file)
        if path is None or not path.is_relative_to(root):
            return handle
        return _FillingFile(handle, disk, fail=any(part in path.name for part in names))

    saved = builtins.open, io.open
    builtins.open = io.open = patched_open
    try:
        yield
    finally:
        builtins.open, io.open = saved


def full_disk(folder: str | os.PathLike) -> contextlib.AbstractContextManager[None]:
    """Within the block, every write of a byte or more to a file under ``folder`` fails with ENOSPC."""
    return filling_disk(folder, budget=0)


def main(argv: list[str]) -> int:
    split = argv.index("--")
    own = argparse.ArgumentParser()
    own.add_argument("folder")
    own.add_argument("--budget", type=int, default=None, help="bytes that can still be written under FOLDER")
    own.add_argument("--name", action="append", default=[], help="writes to files whose name contains it fail")
    options = own.parse_args(argv[:split])
    from paadet.cli import main as paadet_main

    budget = 0 if options.budget is None and not options.name else options.budget
    with filling_disk(options.folder, budget, options.name):
        return paadet_main(argv[split + 1 :])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
