"""What the arguments of ``paadet predict`` name: image files, video files, webcams and stream URLs, in one list.

Rules (docs/predict.md, "Sources"):

- ``rtsp://``, ``rtsps://``, ``rtmp://``, ``rtmps://``, ``http://`` and ``https://`` arguments are stream URLs,
  opened by FFmpeg; streams are only ever used when named, never found in a folder;
- a non-negative integer that is not an existing path (``0``) is a webcam index, and ``/dev/videoN`` a webcam;
- a path that does not exist but holds ``*``, ``?`` or ``[`` is a glob (``**`` recursive), expanded in sorted
  order, each match taken as if named;
- folders are searched recursively for image and video files by suffix (:data:`VIDEO_EXTENSIONS`);
- a file named directly is a video by its suffix, an image by its suffix, else by probing its content (an
  image signature, then whether FFmpeg finds a video stream in it).

Files come first, with the distinct report names of :func:`paadet.data.images.list_images`, then webcams and
streams in the order given.
"""

from __future__ import annotations

import glob
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Literal

from paadet.data.images import IMAGE_EXTENSIONS, ImageSource, list_images

VIDEO_EXTENSIONS: frozenset[str] = frozenset(
    {".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg", ".ts", ".wmv", ".flv", ".3gp", ".ogv"}
)
"""Lower-case suffixes (with the dot) picked up as videos in folders; matched case-insensitively."""

STREAM_SCHEMES: tuple[str, ...] = ("rtsp", "rtsps", "rtmp", "rtmps", "http", "https")
"""URL schemes taken as a stream when named on the command line."""

_WEBCAM_DEVICE = re.compile(r"^/dev/video(\d+)$")
_GLOB_CHARS = re.compile(r"[*?\[]")
_IMAGE_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"BM", b"II*\x00", b"MM\x00*")


@dataclass(frozen=True)
class VideoSource:
    """A video file, a webcam or a stream URL.

    Attributes:
        kind: ``file``, ``webcam`` or ``stream``.
        locator: what FFmpeg opens: the file's path, ``/dev/videoN`` (or the index on macOS), or the URL.
        name: the name it is reported under (the ``source`` of each JSON line): a file's distinct name (as
            for images), the webcam's device, the URL as given.
        path: the file (None for webcams and streams).
    """

    kind: Literal["file", "webcam", "stream"]
    locator: str
    name: str
    path: Path | None = None

    @property
    def is_live(self) -> bool:
        """A webcam or a stream: it has no end of its own and cannot be probed ahead without consuming it."""
        return self.kind != "file"

    @property
    def is_endless(self) -> bool:
        """A webcam, or an RTSP or RTMP stream: its end is a drop, not the end of a video (an ``http(s)`` URL may
        be a file, which ends)."""
        return self.kind == "webcam" or (self.kind == "stream" and self.locator.lower().startswith(("rtsp", "rtmp")))

    def vis_name(self) -> str:
        """The relative name of its ``--save-vis`` video: a file's name with ``.mp4`` as its suffix
        (``clips/a.avi`` -> ``clips/a.mp4``), ``webcam0.mp4``, or the URL's host and path joined with ``_``."""
        if self.kind == "file":
            return PurePosixPath(self.name.replace(os.sep, "/")).with_suffix(".mp4").as_posix()
        if self.kind == "webcam":
            match = _WEBCAM_DEVICE.match(self.locator)
            return f"webcam{match.group(1) if match else self.locator}.mp4"
        flat = re.sub(r"[^A-Za-z0-9.-]+", "_", self.locator.split("://", 1)[-1].split("?", 1)[0]).strip("_.")
        return f"{flat or 'stream'}.mp4"


def is_stream_url(text: str) -> bool:
    """Whether ``text`` is a URL with one of :data:`STREAM_SCHEMES`."""
    scheme, sep, rest = text.partition("://")
    return bool(sep and rest) and scheme.lower() in STREAM_SCHEMES


def _webcam(text: str) -> VideoSource | None:
    """The webcam ``text`` names (``0`` or ``/dev/video0``), or None."""
    match = _WEBCAM_DEVICE.match(text)
    if match is None and not (text.isdigit() and not os.path.exists(text)):
        return None
    index = match.group(1) if match else str(int(text))
    locator = index if sys.platform == "darwin" else f"/dev/video{index}"
    return VideoSource("webcam", locator, text if match else locator)


def video_source(source: str | os.PathLike | int | VideoSource) -> VideoSource:
    """One argument as a video source: a :class:`VideoSource` as is, an ``int`` or ``/dev/videoN`` webcam, a
    stream URL, or a file (whatever its suffix). Used by :meth:`paadet.detector.Detector.stream`.

    Raises:
        FileNotFoundError: a file that does not exist.
    """
    if isinstance(source, VideoSource):
        return source
    if isinstance(source, int):
        source = str(source)
    text = os.fspath(source)
    if is_stream_url(text):
        return VideoSource("stream", text, text)
    webcam = _webcam(text)
    if webcam is not None:
        return webcam
    if not os.path.exists(text):
        raise FileNotFoundError(f"no such video file: {text}")
    return VideoSource("file", text, text, Path(text))


def _looks_like_image(path: Path) -> bool:
    """Whether the file starts with the signature of an image format OpenCV reads (JPEG, PNG, BMP, TIFF, WebP)."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError:
        return True  # unreadable: reported as an unreadable image, as before
    return head.startswith(_IMAGE_SIGNATURES) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")


def _probe_is_video(path: Path) -> bool:
    """Whether FFmpeg finds a video stream in ``path`` (False without PyAV, or when it cannot open it)."""
    try:
        import av
    except ImportError:
        return False
    try:
        with av.open(str(path)) as container:
            return len(container.streams.video) > 0
    except (av.FFmpegError, OSError, ValueError):
        return False


def _is_video(source: ImageSource, named: bool) -> bool:
    """Whether a listed file is a video: by its suffix, and for a file named directly with neither an image
    nor a video suffix, by probing its content."""
    suffix = source.path.suffix.lower()
    if suffix in VIDEO_EXTENSIONS:
        return True
    if suffix in IMAGE_EXTENSIONS or not named or source.error is not None:
        return False
    return not _looks_like_image(source.path) and _probe_is_video(source.path)


def _expand(argument: str) -> list[str]:
    """A file or folder argument, or the sorted matches of a glob.

    Raises:
        FileNotFoundError: the path does not exist and is not a glob that matches something.
    """
    if os.path.exists(argument) or os.path.islink(argument):
        return [argument]
    if _GLOB_CHARS.search(argument):
        matches = sorted(glob.glob(argument, recursive=True))
        if not matches:
            raise FileNotFoundError(f"no file or folder matches {argument}")
        return matches
    raise FileNotFoundError(f"no such file or folder: {argument}")


def list_sources(inputs: Sequence[str | os.PathLike]) -> list[ImageSource | VideoSource]:
    """Every source named by ``inputs`` (see the module docstring): :class:`ImageSource` for images (and for
    entries that could not be listed, with their ``error``), :class:`VideoSource` for videos, webcams and streams.

    Raises:
        FileNotFoundError: an argument that is no file, folder, matching glob, webcam or stream URL.
    """
    files: list[str] = []
    live: list[VideoSource] = []
    for item in inputs:
        text = os.fspath(item)
        named = video_source(text) if is_stream_url(text) or _webcam(text) is not None else None
        if named is not None:
            live.append(named)
        else:
            files.extend(_expand(text))
    named_directly = {os.path.realpath(f) for f in files if not os.path.isdir(f)}
    listed = list_images(files, extensions=IMAGE_EXTENSIONS | VIDEO_EXTENSIONS) if files else []
    out: list[ImageSource | VideoSource] = []
    for source in listed:
        if _is_video(source, os.path.realpath(source.path) in named_directly):
            out.append(VideoSource("file", os.fspath(source.path), source.file_name, source.path))
        else:
            out.append(source)
    return out + live
