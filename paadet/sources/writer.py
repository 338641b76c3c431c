"""The annotated video ``paadet predict --save-vis`` writes for a video source, with PyAV.

An MP4 file (``moov`` atom first, so that browsers start playing before the end) with H.264 video from the
libx264 encoder that PyAV's wheels carry: 4:2:0 chroma, which every common player opens, for even frame sizes;
4:4:4 for an odd width or height, which 4:2:0 cannot hold at the same size (VLC, mpv and FFmpeg play it, some
browsers do not). Without libx264 (a PyAV built against an FFmpeg without it) it falls back to MPEG-4 Part 2
(``mp4v``). Frames keep the source's size; the frame rate is the source's divided by the stride.

The file is written under a temporary name in the target's folder and renamed into place when closed, so a
reader never sees a half-written video under the final name.
"""

from __future__ import annotations

import os
import tempfile
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from paadet.fileio import OutputWriteError, default_file_mode, writing
from paadet.sources.video import require_av

DEFAULT_FPS = Fraction(25)
"""The frame rate written when the source gives none."""


def video_codec(width: int, height: int) -> tuple[str, str, dict[str, str]]:
    """``(encoder, pixel format, encoder options)`` for a ``width x height`` video (see the module docstring)."""
    av = require_av()
    try:
        av.codec.Codec("libx264", "w")
    except (av.FFmpegError, ValueError):
        return "mpeg4", "yuv420p", {"qscale": "3"}
    odd = width % 2 or height % 2
    return "libx264", "yuv444p" if odd else "yuv420p", {"preset": "veryfast", "crf": "20"}


class AnnotatedVideo:
    """An MP4 being written to ``target`` through a temporary file beside it.

    Args:
        target: the final file (its folder is created).
        width, height: the frame size.
        fps: frames per second (None: :data:`DEFAULT_FPS`).
    """

    def __init__(self, target: str | os.PathLike, width: int, height: int, fps: Fraction | None) -> None:
        self.av = require_av()
        self.target = Path(target)
        self.size = (width, height)
        self.fps = Fraction(fps) if fps else DEFAULT_FPS
        self.frames = 0
        codec, pix_fmt, options = video_codec(width, height)
        self.codec = codec
        with writing(self.target):
            self.target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{self.target.name}.", suffix=".tmp.mp4", dir=self.target.parent)
            os.close(fd)
        self.tmp = Path(tmp)
        try:
            self._container = self.av.open(tmp, "w", format="mp4", options={"movflags": "+faststart"})
            self._stream = self._container.add_stream(codec, rate=self.fps)
            self._stream.width, self._stream.height, self._stream.pix_fmt = width, height, pix_fmt
            self._stream.options = options
        except BaseException:
            self.tmp.unlink(missing_ok=True)
            raise

    def _mux(self, packets: Any) -> None:
        try:
            self._container.mux(packets)
        except OSError as exc:
            raise OutputWriteError(f"{self.target}: cannot write ({exc.strerror or exc})") from None

    def write(self, image: np.ndarray) -> None:
        """Append one BGR ``uint8`` ``[H, W, 3]`` frame of the video's size."""
        if (image.shape[1], image.shape[0]) != self.size:
            raise ValueError(f"frame of {image.shape[1]}x{image.shape[0]} in a {self.size[0]}x{self.size[1]} video")
        frame = self.av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="bgr24")
        frame.pts = self.frames
        frame.time_base = 1 / self.fps
        self._mux(self._stream.encode(frame))
        self.frames += 1

    def close(self) -> Path:
        """Flush the encoder, finish the file and rename it to ``target``; returns ``target``."""
        try:
            self._mux(self._stream.encode(None))
            self._container.close()
            os.chmod(self.tmp, default_file_mode())
            os.replace(self.tmp, self.target)
        except BaseException:
            self.tmp.unlink(missing_ok=True)
            raise
        return self.target
