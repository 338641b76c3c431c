"""Reading images the way mmdetection does, and listing image files on disk.

Decoding is mmcv's ``imfrombytes(..., flag="color", backend="cv2")``:
``cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)``. That gives BGR ``uint8``
``[H, W, 3]``: the EXIF orientation is applied, grey images are expanded to three equal channels,
alpha is dropped and 16-bit samples are reduced to 8 bits (``v >> 8``).
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from paadet.errors import PaadetError, one_line

IMAGE_EXTENSIONS: frozenset[str] = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"})
"""Lower-case suffixes (with the dot) that :func:`list_images` picks up in folders; matched case-insensitively."""


class ImageReadError(PaadetError):
    """An image file that cannot be read or decoded; the message is one line naming the file and the reason."""


def _error(name: str, reason: str) -> ImageReadError:
    """Build the one-line :class:`ImageReadError` for ``name``."""
    return ImageReadError(one_line(f"cannot read image {name}: {reason}"))


def decode_image(data: bytes, name: str) -> np.ndarray:
    """Decode an encoded image (JPEG, PNG, ...) to BGR ``uint8`` ``[H, W, 3]``, exactly as mmcv does.

    Args:
        data: the file's bytes.
        name: the file's name, for error messages.

    Raises:
        ImageReadError: ``data`` is empty or OpenCV cannot decode it.
    """
    if len(data) == 0:
        raise _error(name, "the file is empty")
    try:
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    except cv2.error as exc:
        raise _error(name, f"OpenCV failed to decode it ({exc.err or exc})") from None
    if image is None:
        raise _error(name, "not a supported image format, or the data is corrupt")
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise _error(name, f"decoded to an unexpected {image.dtype} array of shape {tuple(image.shape)}")
    return image


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read and decode an image file to BGR ``uint8`` ``[H, W, 3]`` (see :func:`decode_image`).

    Raises:
        ImageReadError: the file is missing, is a folder, cannot be read, or cannot be decoded.
    """
    name = os.fspath(path)
    file = pathlib.Path(path)
    if file.is_dir():
        raise _error(name, "it is a directory")
    try:
        data = file.read_bytes()
    except FileNotFoundError:
        raise _error(name, "no such file") from None
    except IsADirectoryError:
        raise _error(name, "it is a directory") from None
    except PermissionError:
        raise _error(name, "permission denied") from None
    except OSError as exc:
        raise _error(name, exc.strerror or str(exc)) from None
    return decode_image(data, name)


@dataclass(frozen=True)
class ImageSource:
    """An image file found by :func:`list_images`.

    Attributes:
        path: where to read it (the input joined with the relative path; not resolved).
        file_name: the name to report it under, distinct among the listed sources: the path relative
            to the folder given (posix separators), or the argument as given for a file named directly;
            where two inputs would share a name, the folder as given is put in front
            (``a/x.jpg`` and ``b/x.jpg`` for ``x.jpg`` in folders ``a`` and ``b``).
        error: why the entry cannot be read (a symlink loop, a folder that cannot be listed), found
            while listing; such a source is reported and skipped like an unreadable image.
    """

    path: pathlib.Path
    file_name: str
    error: str | None = None


def _folder_images(folder: pathlib.Path, extensions: frozenset[str] = IMAGE_EXTENSIONS) -> list[ImageSource]:
    """Files under ``folder`` with a suffix in ``extensions`` (recursively, symlinked sub-folders not followed),
    sorted by relative name.

    A sub-folder that cannot be listed and a symlink that loops become sources with ``error`` set,
    so that they are reported and skipped while the rest is processed.
    """
    found: list[ImageSource] = []

    def unlistable(exc: OSError) -> None:
        where = pathlib.Path(exc.filename) if exc.filename else folder
        name = (
            where.relative_to(folder).as_posix()
            if where != folder and where.is_relative_to(folder)
            else os.fspath(where)
        )
        found.append(ImageSource(where, name + "/", one_line(f"cannot list folder {name}: {exc.strerror or exc}")))

    for root, _dirs, files in os.walk(folder, onerror=unlistable):
        for file in files:
            if os.path.splitext(file)[1].lower() in extensions:
                path = pathlib.Path(root, file)
                found.append(ImageSource(path, path.relative_to(folder).as_posix()))
    found.sort(key=lambda source: source.file_name)
    return found


def _identity(path: pathlib.Path) -> str:
    """A key that is equal for two paths naming the same file (``realpath``: it does not raise on a symlink loop)."""
    return os.path.realpath(path)


def _distinct_names(sources: list[ImageSource], prefixes: list[str]) -> list[ImageSource]:
    """Rename sources whose ``file_name`` another source shares: prefix the folder given, then number them."""
    counts: dict[str, int] = {}
    for source in sources:
        counts[source.file_name] = counts.get(source.file_name, 0) + 1
    renamed = [
        ImageSource(
            s.path,
            f"{prefix.rstrip('/')}/{s.file_name}" if prefix and counts[s.file_name] > 1 else s.file_name,
            s.error,
        )
        for s, prefix in zip(sources, prefixes, strict=False)
    ]
    taken: set[str] = set()
    out = []
    for source in renamed:
        name, n = source.file_name, 1
        while name in taken:
            n += 1
            name = f"{source.file_name}#{n}"
        taken.add(name)
        out.append(source if name == source.file_name else ImageSource(source.path, name, source.error))
    return out


def list_images(
    inputs: Sequence[str | os.PathLike] | str | os.PathLike, extensions: frozenset[str] = IMAGE_EXTENSIONS
) -> list[ImageSource]:
    """List the images named by ``inputs``: any mix of image files and folders, in input order.

    Folders are searched recursively for files with an extension in ``extensions`` (default
    :data:`IMAGE_EXTENSIONS`; ``paadet.sources`` adds the video suffixes; case-insensitive), sorted
    by their path relative to the folder, which becomes their ``file_name``. A file given directly is
    taken whatever its extension (an undecodable one fails later, in :func:`read_image`), with the
    argument as given as its ``file_name``. A file reached twice (same real path) is listed once, at
    its first occurrence. Names are made distinct (see
    :class:`ImageSource`). A sub-folder that cannot be listed, or a symlink loop, is listed with its
    ``error`` set instead of raising. A single path may be passed instead of a sequence.

    Raises:
        FileNotFoundError: an input does not exist (the error names it).
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    sources: list[ImageSource] = []
    prefixes: list[str] = []
    seen: set[str] = set()
    for item in inputs:
        path = pathlib.Path(item)
        if not path.exists() and not path.is_symlink():
            raise FileNotFoundError(f"no such image file or folder: {os.fspath(item)}")
        if path.is_dir():
            found, prefix = _folder_images(path, extensions), os.fspath(item)
        else:
            found, prefix = [ImageSource(path, os.fspath(item))], ""
        for source in found:
            key = _identity(source.path)
            if source.error is not None or key not in seen:
                seen.add(key)
                sources.append(source)
                prefixes.append(prefix)
    return _distinct_names(sources, prefixes)
