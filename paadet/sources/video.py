"""Decoding a video source with PyAV (FFmpeg's libraries), frame by frame, and reading ahead in a thread.

Why PyAV rather than OpenCV's FFmpeg backend (measured in docs/video.md): its threaded decoding was
1.2x-1.3x faster here on mp4v, MJPEG and H.264 720p clips (equal on a variable-rate one); its errors say what
went wrong (OpenCV's ``read`` only returns False); it gives each frame's own timestamp (``pts``); it opens
webcams (``v4l2``) and stream URLs with open and read timeouts; and its wheel carries an H.264 encoder
(libx264) for the ``--save-vis`` video, which OpenCV's wheel lacks.

A frame is BGR ``uint8`` ``[H, W, 3]``, as :func:`paadet.data.images.read_image` gives for an image file; a
lossless frame (PNG in AVI, say) is the same array as the same picture saved as a PNG.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, TypeVar

import numpy as np

from paadet.errors import PaadetError, one_line
from paadet.sources.listing import VideoSource, video_source

PIP_VIDEO = 'pip install "paadet[video]"'
"""The command that installs the video extra (PyAV)."""

STREAM_TIMEOUT_S = 10.0
"""Seconds a stream or webcam may take to open, and to deliver the next data, before it counts as dropped."""

T = TypeVar("T")


class SourceError(PaadetError):
    """A video source that cannot be opened or decoded, or that stopped early; one line naming the source.

    Attributes:
        frames_done: frames delivered before the failure (0 when it could not be opened).
    """

    def __init__(self, message: str, frames_done: int = 0) -> None:
        super().__init__(one_line(message))
        self.frames_done = frames_done


class MissingVideoLibrary(PaadetError):
    """PyAV is not installed; the message gives the pip command."""


def require_av() -> Any:
    """The ``av`` module (PyAV).

    Raises:
        MissingVideoLibrary: PyAV is not installed (one line with the pip command).
    """
    try:
        import av
    except ImportError:
        raise MissingVideoLibrary(f"reading and writing videos needs PyAV: {PIP_VIDEO}") from None
    return av


@dataclass
class Frame:
    """One decoded frame.

    Attributes:
        index: 0-based position in the source's decoded frames (before ``stride``).
        time_ms: its presentation timestamp in milliseconds from the stream's start (``pts``), or, where the
            container gives none, ``index / fps``.
        image: BGR ``uint8`` ``[H, W, 3]``.
    """

    index: int
    time_ms: float
    image: np.ndarray


class VideoReader:
    """An opened video source: its size, frame rate and declared frame count, and its frames in order.

    Use :func:`open_video`; close it (or use it as a context manager) to release FFmpeg's resources.
    """

    def __init__(self, source: VideoSource, container: Any) -> None:
        self.source = source
        self._container = container
        self._stream = container.streams.video[0]
        self._stream.thread_type = "AUTO"  # frame and slice threads: the fastest decode measured here
        self._av = require_av()

    @property
    def name(self) -> str:
        return self.source.name

    @property
    def width(self) -> int:
        return int(self._stream.codec_context.width)

    @property
    def height(self) -> int:
        return int(self._stream.codec_context.height)

    @property
    def fps(self) -> Fraction | None:
        """The stream's average frame rate (or FFmpeg's guess), None if unknown."""
        rate = self._stream.average_rate or self._stream.guessed_rate
        return Fraction(rate) if rate else None

    @property
    def declared_frames(self) -> int | None:
        """The frame count the container's header gives (None when it gives none, as streams and some files)."""
        count = int(self._stream.frames or 0)
        return count if count > 0 and not self.source.is_live else None

    def _time_ms(self, frame: Any, index: int) -> float:
        if frame.pts is None or frame.time_base is None:
            fps = self.fps
            return round(1000.0 * index / float(fps), 3) if fps else 0.0
        start = self._stream.start_time or 0
        return round(float((frame.pts - start) * frame.time_base) * 1000.0, 3)

    def frames(self, stride: int = 1, max_frames: int | None = None) -> Iterator[Frame]:
        """Frames ``0, stride, 2 * stride ...`` (at most ``max_frames`` of them), decoded in order.

        Raises:
            SourceError: decoding failed, or a file ended before the frame count its header declares (a
                truncated file); the frames before it were yielded.
        """
        if stride < 1:
            raise ValueError(f"stride must be >= 1, got {stride}")
        av = self._av
        decoded = kept = 0
        try:
            for frame in self._container.decode(self._stream):
                index, decoded = decoded, decoded + 1
                if index % stride:
                    continue
                yield Frame(index, self._time_ms(frame, index), frame.to_ndarray(format="bgr24"))
                kept += 1
                if max_frames is not None and kept >= max_frames:
                    return
        except (av.FFmpegError, OSError) as exc:
            what = "the stream dropped" if self.source.is_live else "decoding failed"
            raise SourceError(f"{self.name}: {what} after {decoded} frames ({_reason(exc)})", kept) from None
        declared = self.declared_frames
        if declared is not None and decoded < declared:
            raise SourceError(
                f"{self.name}: the file ends after {decoded} of the {declared} frames its header declares "
                "(truncated or corrupt)",
                kept,
            )
        if self.source.is_endless:
            raise SourceError(f"{self.name}: the stream ended after {decoded} frames", kept)

    def close(self) -> None:
        self._container.close()

    def __enter__(self) -> VideoReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _reason(exc: BaseException) -> str:
    """FFmpeg's reason without the file name PyAV appends (the message names the source already)."""
    text = getattr(exc, "strerror", None) or str(exc)
    return one_line(text)


def open_video(source: str | int | VideoSource) -> VideoReader:
    """Open a video file, webcam or stream URL (see :func:`paadet.sources.video_source`) with PyAV.

    Streams and webcams get :data:`STREAM_TIMEOUT_S` to open and for each read.

    Raises:
        SourceError: it cannot be opened, or holds no video stream (one line naming it).
        MissingVideoLibrary: PyAV is not installed.
        FileNotFoundError: a file that does not exist.
    """
    source = video_source(source)
    av = require_av()
    options: dict[str, Any] = {}
    if source.kind == "webcam":
        options["format"] = "avfoundation" if not source.locator.startswith("/dev/") else "v4l2"
    if source.is_live:
        options["timeout"] = (STREAM_TIMEOUT_S, STREAM_TIMEOUT_S)
    try:
        container = av.open(source.locator, **options)
    except (av.FFmpegError, OSError, ValueError) as exc:
        raise SourceError(f"cannot open {source.kind} {source.name}: {_reason(exc)}") from None
    if not container.streams.video:
        container.close()
        raise SourceError(f"{source.name}: no video stream in it")
    return VideoReader(source, container)


def probe_video(source: VideoSource) -> None:
    """Check, before any work, that a video file opens and decodes its first frame; closes it again.

    Raises:
        SourceError: it cannot be opened or decoded, or it has no frame (one line naming it).
        MissingVideoLibrary: PyAV is not installed.
    """
    with open_video(source) as reader:
        try:
            next(reader.frames(max_frames=1))
        except StopIteration:
            raise SourceError(f"{source.name}: no video frames in it") from None
        except SourceError as exc:
            if exc.frames_done == 0:
                raise SourceError(f"{source.name}: no video frame can be decoded ({exc})") from None


_END = object()


def read_ahead(items: Iterator[T], depth: int) -> Iterator[T]:
    """``items`` produced in a daemon thread, at most ``depth`` ahead of the consumer (memory stays flat).

    An exception raised by ``items`` is raised to the consumer after the items before it. Closing this
    generator (or an error in the consumer) stops the thread and closes ``items`` in it.
    """
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    buffer: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(entry: tuple[bool, Any]) -> bool:
        while not stop.is_set():
            try:
                buffer.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put((True, item)):
                    break
        except BaseException as exc:  # handed to the consumer, which raises it
            put((False, exc))
        else:
            put((True, _END))
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()

    thread = threading.Thread(target=produce, name="paadet-read-ahead", daemon=True)
    thread.start()
    try:
        while True:
            ok, item = buffer.get()
            if not ok:
                raise item
            if item is _END:
                return
            yield item
    finally:
        stop.set()
        thread.join(timeout=5.0)
