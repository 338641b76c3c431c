"""The weights of a batch run: their identity (path and SHA-256, hashed once by the driver) and a cheap stat that
tells a worker whether its copy of the file can be the same."""

from __future__ import annotations

import os
from pathlib import Path

from paadet.batch.errors import BatchError
from paadet.errors import one_line
from paadet.runtime.spec import DetectorSpec


def weights_stat(file: str | os.PathLike) -> tuple[int, int] | None:
    """``(size, mtime_ns)`` of a file, or None when it cannot be read."""
    try:
        info = os.stat(file)
    except OSError:
        return None
    return info.st_size, info.st_mtime_ns


def weights_identity(spec: DetectorSpec) -> dict[str, str] | None:
    """``{"file": absolute path, "sha256": hex}`` of the spec's weights file, hashed here (on the driver), once.

    None for the torch backend without ``--checkpoint``: the official file, whose name carries the
    prefix of its SHA-256, which is checked whenever it is loaded.

    Raises:
        BatchError: the file does not exist or cannot be read (before any work).
    """
    from paadet.fileio import sha256_file

    file = spec.weights_file
    if file is None:
        return None
    path = Path(file)
    if not path.is_file():
        raise BatchError(
            f"{file}: {spec.weights_flag} file not found"
            if not path.exists()
            else f"{file}: {spec.weights_flag} is not a file"
        )
    try:
        digest = sha256_file(path)
    except OSError as exc:
        raise BatchError(one_line(f"{file}: cannot read {spec.weights_flag}: {exc.strerror or exc}")) from None
    return {"file": os.path.abspath(file), "sha256": digest}
