"""Finding and downloading the published PAA checkpoints (:mod:`paadet.zoo`), the R50-FPN 1x one by default.

A file is cached in :func:`cache_dir` under its original name, whose hash suffix
(``-936edec3``) is checked on download and again by :func:`paadet.checkpoint.load_state_dict`.
:func:`resolve_checkpoint` turns ``--checkpoint`` into a file: an existing file is used as it is, else a model
name (``paa_r101_fpn_ms-3x_coco``) means that model's cached file, downloaded once.
Downloads use the standard library only, stream to a temporary file in the destination folder
and are renamed into place atomically, so an interrupted download never leaves a partial file
under the final name. Every error is a one-line :class:`~paadet.checkpoint.CheckpointError`.

Why not ``torch.hub.download_url_to_file`` (which has the progress bar, the hash-prefix check and the
temporary file): it opens the URL without a timeout, so a stalled server hangs the command forever, it
does not notice a body shorter than its ``Content-Length`` (the hash catches that only for hashed
names), and its errors are raw tracebacks; ``tests/test_hub.py`` tests all three behaviours here.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path, PurePosixPath
from typing import BinaryIO
from urllib.parse import urlsplit

from tqdm import tqdm

from paadet.checkpoint import CheckpointError, expected_sha256_prefix
from paadet.errors import one_line
from paadet.fileio import default_file_mode
from paadet.zoo import DEFAULT_MODEL, cache_dir, find_model, get_model, model_names

__all__ = [
    "OFFICIAL_FILENAME",
    "OFFICIAL_URL",
    "cache_dir",
    "default_checkpoint",
    "download",
    "model_checkpoint",
    "resolve_checkpoint",
]

OFFICIAL_URL = get_model(DEFAULT_MODEL).url
"""The default checkpoint's URL (R50-FPN 1x, from :data:`paadet.zoo.MODELS`)."""
OFFICIAL_FILENAME = get_model(DEFAULT_MODEL).file_name

_CHUNK_BYTES = 1 << 20


def _filename_from_url(url: str) -> str:
    """The last path component of ``url`` (query and fragment ignored)."""
    name = PurePosixPath(urlsplit(url).path).name
    if not name:
        raise CheckpointError(f"{url}: the URL names no file")
    return name


def _by_hand(url: str, dest: Path) -> str:
    """The advice that ends every download error: where to put the file manually."""
    return f"download {url} by hand and save it as {dest}"


def _content_length(response: http.client.HTTPResponse) -> int | None:
    """The ``Content-Length`` header as an int, or ``None`` when absent or malformed."""
    value = response.headers.get("Content-Length")
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _stream(url: str, out: BinaryIO, dest: Path, progress: bool, timeout: float) -> str:
    """Copy the body at ``url`` into ``out`` with a progress bar; return its sha256 hex digest.

    Raises:
        CheckpointError: HTTP error, no network, timeout, or a body shorter than its Content-Length.
    """
    digest = hashlib.sha256()
    received = 0
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            total = _content_length(response)
            with tqdm(
                total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=dest.name, disable=not progress
            ) as bar:
                while chunk := response.read(_CHUNK_BYTES):
                    out.write(chunk)
                    digest.update(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
    except urllib.error.HTTPError as exc:
        raise CheckpointError(f"cannot download {url}: HTTP {exc.code} {exc.reason}; {_by_hand(url, dest)}") from exc
    except (urllib.error.URLError, TimeoutError, http.client.HTTPException, OSError) as exc:
        raise CheckpointError(f"cannot download {url}: {_reason(exc, timeout)}; {_by_hand(url, dest)}") from exc
    if total is not None and received != total:
        raise CheckpointError(
            f"cannot download {url}: incomplete, got {received} of {total} bytes; {_by_hand(url, dest)}"
        )
    return digest.hexdigest()


def _reason(exc: BaseException, timeout: float) -> str:
    """A one-line reason for a network failure (unwrapping URLError)."""
    cause = exc.reason if isinstance(exc, urllib.error.URLError) else exc
    if isinstance(cause, TimeoutError):
        return f"timed out after {timeout:g} s"
    text = one_line(cause)
    return text or type(cause).__name__


def download(url: str, dest: str | os.PathLike[str], progress: bool = True, timeout: float = 30) -> Path:
    """Download ``url`` to ``dest`` atomically and return ``dest``.

    The body is streamed into a temporary file next to ``dest`` and renamed into place with
    :func:`os.replace` only once complete. If ``dest``'s name carries mmdetection's hash suffix
    (``...-936edec3.pth``), the body's sha256 must start with it; otherwise nothing is kept.

    Args:
        url: what to download (``http``, ``https`` or anything else urllib opens).
        dest: the final path; its folder is created if needed.
        progress: show a tqdm progress bar on stderr.
        timeout: seconds to wait for the connection and for each read.

    Raises:
        CheckpointError: one line with the URL and the path where the file can be put by hand.
    """
    dest = Path(dest)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    except OSError as exc:
        raise CheckpointError(f"cannot create {dest}: {exc}; {_by_hand(url, dest)}") from exc
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            digest = _stream(url, out, dest, progress, timeout)
            os.fchmod(out.fileno(), default_file_mode())
        _check_download_hash(url, dest, digest)
        _move_into_place(url, tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def _move_into_place(url: str, tmp: Path, dest: Path) -> None:
    """Rename the complete download onto ``dest`` atomically (same folder, so same file system)."""
    try:
        os.replace(tmp, dest)
    except OSError as exc:
        raise CheckpointError(f"cannot write {dest}: {exc.strerror or exc}; {_by_hand(url, dest)}") from exc


def _check_download_hash(url: str, dest: Path, digest: str) -> None:
    """Raise if ``dest``'s name carries a hash suffix that ``digest`` does not start with."""
    expected = expected_sha256_prefix(dest)
    if expected is not None and not digest.startswith(expected):
        raise CheckpointError(
            f"downloaded {url} but its sha256 starts with {digest[: len(expected)]}, not {expected} as the name "
            f"{dest.name} requires; the download is corrupt or truncated and was deleted, try again or "
            f"{_by_hand(url, dest)}"
        )


def default_checkpoint(url: str = OFFICIAL_URL, download_if_missing: bool = True, progress: bool = True) -> Path:
    """The checkpoint at ``url`` (default: the official one) in :func:`cache_dir`, downloaded first if not there.

    Raises:
        CheckpointError: the file is missing and ``download_if_missing`` is false, or the download failed.
    """
    dest = cache_dir() / _filename_from_url(url)
    if dest.is_file():
        return dest
    if not download_if_missing:
        raise CheckpointError(f"{dest}: checkpoint not found and downloading is disabled; {_by_hand(url, dest)}")
    return download(url, dest, progress=progress)


def model_checkpoint(name: str, download_if_missing: bool = True, progress: bool = True) -> Path:
    """The cached file of the zoo model ``name`` (:func:`paadet.zoo.get_model`), downloaded once if missing.

    Raises:
        UnknownModelError: ``name`` is not a model name (the message lists them).
        CheckpointError: as :func:`default_checkpoint`.
    """
    return default_checkpoint(get_model(name).url, download_if_missing=download_if_missing, progress=progress)


def resolve_checkpoint(
    path: str | os.PathLike[str] | None,
    *,
    url: str = OFFICIAL_URL,
    download_if_missing: bool = True,
    progress: bool = True,
) -> Path:
    """The checkpoint to use: an existing file, a model's cached file, or the official one when ``path`` is ``None``.

    An existing file wins: ``path`` names a model (:func:`paadet.zoo.find_model`: ``paa_r101_fpn_ms-3x_coco``, its
    2.x name or its file name) only when no such file exists. The model's file is then taken from
    :func:`cache_dir`, downloaded there first (with the hash check) if missing.

    Args:
        path: a checkpoint file, a model name, or ``None`` for :func:`default_checkpoint`.
        url: the checkpoint :func:`default_checkpoint` downloads when ``path`` is ``None``.
        download_if_missing, progress: passed to :func:`default_checkpoint` for a model name or ``None``.

    Raises:
        CheckpointError: ``path`` is neither an existing file nor a model name (one line listing the names), or
            the model's file is not cached and cannot be downloaded.
    """
    if path is None:
        return default_checkpoint(url, download_if_missing=download_if_missing, progress=progress)
    resolved = Path(path).expanduser()
    if resolved.is_file():
        return resolved
    entry = find_model(path)
    if entry is not None:
        return default_checkpoint(entry.url, download_if_missing=download_if_missing, progress=progress)
    raise CheckpointError(
        f"{resolved}: checkpoint file not found, and not a model name either (known: {', '.join(model_names())})"
    )
