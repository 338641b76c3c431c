"""The inputs of a batch run: image files, folders and ``.txt`` lists of image paths, expanded to one list."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

from paadet.batch.errors import BatchError
from paadet.data.images import ImageSource, list_images
from paadet.errors import one_line

LIST_SUFFIXES = (".txt",)
"""Inputs with these suffixes are lists of image paths, one a line (see :func:`read_path_list`)."""

_COMMENT = re.compile(r"(?:^|\s)#")
"""Where a comment starts in a list line: a ``#`` at the start of the line or after whitespace."""


def list_entry(line: str) -> str | None:
    """The path one line of a list names, or None for a blank line or a comment.

    A ``#`` that starts the line or follows whitespace starts a comment, to the end of the line
    (``a.jpg  # the cat`` names ``a.jpg``); a ``#`` inside a name is part of it (``shot#2.jpg``). So a
    name that starts with ``#`` is written ``./#name.jpg``; a name containing whitespace followed by
    ``#`` cannot be listed (give its folder instead). Surrounding whitespace is not part of the path.
    """
    match = _COMMENT.search(line)
    entry = (line[: match.start()] if match else line).strip()
    return entry or None


def read_path_list(list_file: str | os.PathLike) -> list[ImageSource]:
    """Image files named in a text file, one a line (UTF-8; comments as :func:`list_entry` says).

    Relative paths are relative to the list file's folder. Each entry is taken as an image file
    without looking at the disk (a missing one is reported as unreadable when it is processed, which
    keeps listing millions of entries cheap); its ``file_name`` is the path as written.

    Raises:
        BatchError: the list cannot be read or is not UTF-8 text.
    """
    list_path = Path(list_file)
    try:
        text = list_path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise BatchError(f"{list_path}: not a UTF-8 text file of image paths, one a line") from None
    except OSError as exc:
        raise BatchError(one_line(f"{list_path}: cannot read the list: {exc.strerror or exc}")) from None
    sources = []
    for line in text.splitlines():
        entry = list_entry(line)
        if entry is not None:
            sources.append(ImageSource(list_path.parent / entry, entry))
    return sources


def is_path_list(item: str | os.PathLike) -> bool:
    """Whether an input is read as a list of image paths (a ``.txt`` file)."""
    path = Path(item)
    return path.suffix.lower() in LIST_SUFFIXES and path.is_file()


def expand_inputs(inputs: Sequence[str | os.PathLike]) -> list[ImageSource]:
    """The images named by ``inputs`` in order: image files, folders (as :func:`~paadet.data.images.list_images`
    searches them) and ``.txt`` lists of image paths (:func:`read_path_list`); each file once.

    Each run of inputs that are not lists goes to one ``list_images`` call, so that without lists the
    sources (names, order) are exactly those ``paadet predict`` lists. An entry that ``list_images``
    could not list (a sub-folder that cannot be read...) comes back with its ``error`` set; the run
    reports it as an unreadable input and goes on.

    Raises:
        FileNotFoundError: an input (file, folder or list) does not exist.
        BatchError: a list cannot be read.
    """
    sources: list[ImageSource] = []
    seen: set[str] = set()
    group: list[str | os.PathLike] = []

    def add(found: list[ImageSource]) -> None:
        for source in found:
            key = input_key(source)
            if key not in seen:
                seen.add(key)
                sources.append(source)

    for item in inputs:
        if is_path_list(item):
            if group:
                add(list_images(group))
                group = []
            add(read_path_list(item))
        else:
            group.append(item)
    if group:
        add(list_images(group))
    return sources


def input_key(source: ImageSource) -> str:
    """The identity of an input across runs: its absolute path (not resolved, so no disk access)."""
    return os.path.abspath(os.fspath(source.path))


def listing_error(source: ImageSource) -> str | None:
    """Why ``source`` could not be listed (set by ``list_images``), or None."""
    return getattr(source, "error", None)
