"""Inputs of ``paadet predict`` beyond image files: video files, webcams and stream URLs, as one kind of source.

- :mod:`paadet.sources.listing`: what each command-line argument names (image files, video files, folders and
  globs holding either, a webcam by index or ``/dev/videoN``, a stream URL) as :class:`ImageSource` and
  :class:`VideoSource` entries, in one list;
- :mod:`paadet.sources.video`: decoding a video source with PyAV (FFmpeg), frame by frame with its timestamp,
  and reading ahead of the network in a thread with a bounded queue;
- :mod:`paadet.sources.writer`: the annotated video that ``--save-vis`` writes for a video source.

PyAV is an optional dependency (``pip install "paadet[video]"``): it is imported only when a video is opened.
"""

from __future__ import annotations

from paadet.sources.listing import STREAM_SCHEMES, VIDEO_EXTENSIONS, VideoSource, list_sources, video_source
from paadet.sources.video import Frame, SourceError, VideoReader, open_video, probe_video, read_ahead

__all__ = [
    "STREAM_SCHEMES",
    "VIDEO_EXTENSIONS",
    "Frame",
    "SourceError",
    "VideoReader",
    "VideoSource",
    "list_sources",
    "open_video",
    "probe_video",
    "read_ahead",
    "video_source",
]
