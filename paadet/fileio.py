"""Writing outputs safely: atomic writes with the user's umask, and output paths checked before any work.

* :func:`atomic_write_bytes` writes a temporary file beside the target, then renames it into place, so
  readers see the old file or the whole new one, never a part. The file gets the permissions an ordinary
  ``open(path, "w")`` would give (``0666`` less the umask), not ``mkstemp``'s ``0600``.
* :func:`check_output_file` and :func:`check_output_dir` are the start-up checks of every command that
  writes: a folder where a file is expected, a parent that cannot be created or written, an output that is
  one of the inputs. Each raises :class:`OutputPathError` with a one-line message naming the path.
* :func:`writing` turns a failed write (a full disk, a quota, an I/O error) into :class:`OutputWriteError`,
  one line naming the file; :func:`atomic_write_bytes` writes inside it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from paadet.errors import PaadetError


class OutputPathError(PaadetError):
    """An output path that cannot be written, or that would overwrite an input."""


class OutputWriteError(OutputPathError):
    """An output that could not be written (a full disk, a quota, an I/O error); the message names the file."""


def write_error(path: str | os.PathLike, exc: OSError, hint: str | None = None) -> OutputWriteError:
    """The one-line error for ``exc``, raised while writing ``path``: ``PATH: cannot write (No space left ...)``,
    then ``; HINT`` when given."""
    return OutputWriteError(f"{path}: cannot write ({exc.strerror or exc})" + (f"; {hint}" if hint else ""))


@contextlib.contextmanager
def writing(path: str | os.PathLike, hint: str | None = None) -> Iterator[None]:
    """Raise :class:`OutputWriteError` naming ``path`` (and adding ``hint``) for any ``OSError`` inside the block."""
    try:
        yield
    except OutputWriteError:
        raise
    except OSError as exc:
        raise write_error(path, exc, hint) from None


def default_file_mode() -> int:
    """The mode ``open(path, "w")`` gives a new file: ``0666`` less the process umask (read by setting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one, never a part.

    Raises:
        OutputWriteError: the write failed (a full disk, for example); the target is untouched and no
            temporary file is left.
    """
    path = Path(path)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fchmod(f.fileno(), default_file_mode())
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = None) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=indent))


def _same_file(a: Path, b: Path) -> bool:
    """Whether two paths name the same existing file (hard links and symlinks included)."""
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _writable_parent(path: Path, flag: str) -> None:
    """Raise unless the nearest existing ancestor of ``path`` is a folder this process can write into."""
    parent = path.parent if str(path.parent) else Path(".")
    probe = parent
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise OutputPathError(f"{path}: cannot write {flag}, {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise OutputPathError(f"{path}: cannot write {flag}, the folder {probe} is not writable")


def check_output_file(
    path: str | os.PathLike, flag: str = "the output", inputs: Iterable[str | os.PathLike] = ()
) -> Path:
    """Check, before any work, that ``path`` can be written as a file and is none of ``inputs``.

    Args:
        path: the output file.
        flag: how the message names it (``--output``).
        inputs: files the command reads; writing onto one of them is refused.

    Raises:
        OutputPathError: ``path`` is a folder, its parent cannot be created or written, or it is an input.
    """
    path = Path(path)
    if path.is_dir():
        raise OutputPathError(f"{path}: {flag} must be a file, but this is a folder")
    if path.exists() and not os.access(path, os.W_OK):
        raise OutputPathError(f"{path}: {flag} exists and is not writable")
    for source in inputs:
        if _same_file(path, Path(source)):
            raise OutputPathError(f"{path}: {flag} is one of the inputs; refusing to overwrite it")
    _writable_parent(path, flag)
    return path


def check_output_dir(
    path: str | os.PathLike, flag: str = "the output folder", inputs: Iterable[str | os.PathLike] = ()
) -> Path:
    """Check, before any work, that ``path`` is (or can be created as) a writable folder and is no input file.

    Raises:
        OutputPathError: ``path`` is a file, or it or its nearest existing parent is not writable.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputPathError(f"{path}: {flag} must be a folder, but this is a file")
    for source in inputs:
        if _same_file(path, Path(source)):
            raise OutputPathError(f"{path}: {flag} is one of the inputs")
    if path.is_dir():
        if not os.access(path, os.W_OK | os.X_OK):
            raise OutputPathError(f"{path}: {flag} is not writable")
    else:
        _writable_parent(path, flag)
    return path


def sha256_file(path: str | os.PathLike[str], chunk_bytes: int = 1 << 20) -> str:
    """The sha256 hex digest of a file, read in chunks of ``chunk_bytes``."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()
