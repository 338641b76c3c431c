"""Predicting on files: images, videos, webcams and streams in; a COCO results JSON or JSON Lines out (and
optionally drawn copies).

The library side of ``paadet predict``: start-up checks of the inputs and output paths, the run over the inputs
with a progress bar, and the visualisations. Images alone give the COCO results list, written atomically (also on
Ctrl-C). An ``--output`` ending in ``.jsonl`` (required with videos) gives one JSON line per image and per
processed frame, written as each completes (:func:`predict_jsonl`).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from paadet.data.images import ImageSource, list_images
from paadet.detections import FrameResult, coco_entries
from paadet.detector import Detector
from paadet.fileio import OutputPathError, check_output_dir, check_output_file, writing
from paadet.sources import SourceError, VideoSource


def check_outputs(sources: list[ImageSource], output: str, save_vis: str | None) -> list[Path] | None:
    """Start-up checks of ``--output`` and ``--save-vis``; returns the visualisation targets (None without).

    Raises:
        OutputPathError: an output that cannot be written or would overwrite an input.
    """
    inputs = [s.path for s in sources]
    check_output_file(output, "--output", inputs=inputs)
    if save_vis is None:
        return None
    check_output_dir(save_vis, "--save-vis", inputs=inputs)
    from paadet.visualize import vis_targets

    targets = vis_targets([s.file_name for s in sources], inputs, save_vis)
    if any(Path(output).resolve() == t.resolve() for t in targets):
        raise OutputPathError(f"{output}: --output is also where --save-vis would draw an image")
    return targets


def predict_sources(
    sources: list[ImageSource],
    output: str,
    detector: Detector,
    vis_targets: list[Path] | None = None,
    vis_score_thr: float = 0.3,
    progress: bool = True,
):
    """Run ``detector`` over ``sources`` and write the results JSON atomically.

    Returns ``(images done, images skipped, boxes drawn, boxes below vis_score_thr not drawn, timer)``.
    Unreadable files are reported on stderr and skipped; the others' results are still written. On Ctrl-C the
    results so far are written (atomically) and a line says they are partial, then ``KeyboardInterrupt``
    propagates.
    """
    from tqdm import tqdm

    from paadet.data.pipeline import iter_loaded
    from paadet.fileio import atomic_write_json
    from paadet.runtime.base import StageTimer

    timer = StageTimer(getattr(detector.backend, "device", None))
    results: dict = {}
    skipped = drawn = below = 0
    classes = detector.classes
    loaded = iter_loaded(sources, detector.preset, detector.workers)
    bar = tqdm(total=len(sources), unit="img", disable=not progress, desc="predict")
    try:
        for item, result in detector.run(loaded, timer):
            bar.update(1)
            if result is None:
                skipped += 1
                tqdm.write(f"skipped {item.name}: {item.error}", file=sys.stderr)
                continue
            results[item.index] = result
            if vis_targets is not None:
                drawn += write_visualisation(
                    sources[item.index], result, vis_targets[item.index], vis_score_thr, classes.names
                )
                below += int((result.scores < vis_score_thr).sum())
    except KeyboardInterrupt:
        bar.close()
        atomic_write_json(output, coco_entries(results, sources, classes.category_ids))
        print(
            f"paadet predict: interrupted; wrote the partial results of {len(results)} of {len(sources)} images "
            f"to {output}",
            file=sys.stderr,
        )
        raise
    bar.close()
    atomic_write_json(output, coco_entries(results, sources, classes.category_ids))
    return len(results), skipped, drawn, below, timer


def predict_files(
    paths: list[str],
    output: str,
    detector: Detector,
    save_vis: str | None = None,
    vis_score_thr: float = 0.3,
    progress: bool = True,
):
    """:func:`predict_sources` over every image under ``paths``; returns ``(done, skipped, timer)``."""
    sources = list_images(paths)
    targets = check_outputs(sources, output, save_vis)
    done, skipped, _drawn, _below, timer = predict_sources(sources, output, detector, targets, vis_score_thr, progress)
    return done, skipped, timer


def write_visualisation(source: ImageSource, result, target: Path, score_thr: float, class_names: Sequence[str]) -> int:
    """Draw ``result`` on the image and write it to ``target`` atomically; returns the number of boxes drawn."""
    import cv2

    from paadet.data.images import read_image
    from paadet.fileio import atomic_write_bytes
    from paadet.visualize import MIN_CANVAS, draw_detections

    image, drawn = draw_detections(
        read_image(source.path), result.boxes, result.scores, result.labels, score_thr, class_names, MIN_CANVAS
    )
    ok, encoded = cv2.imencode(target.suffix if target.suffix else ".jpg", image)
    if not ok:
        raise RuntimeError(f"could not encode the visualisation of {source.file_name}")
    atomic_write_bytes(target, encoded.tobytes())
    return drawn


# Videos, webcams and streams (and images, when --output is a .jsonl file): one JSON line per processed frame.


@dataclass
class PredictPlan:
    """What ``paadet predict`` will do, checked before the model loads (:func:`plan_inputs`).

    Attributes:
        images: the image sources (as :func:`paadet.data.images.list_images` lists them).
        videos: the video files that opened and decoded a first frame, then the webcams and streams.
        skipped: one line per video file that did not (reported, and the exit status is 1).
        jsonl: write JSON Lines (``--output`` ends in ``.jsonl``), else the COCO results list (images only).
        image_targets, video_targets: where ``--save-vis`` draws each (None without it).
    """

    images: list[ImageSource]
    videos: list[VideoSource]
    skipped: list[str]
    jsonl: bool
    image_targets: list[Path] | None = None
    video_targets: list[Path] | None = None


def plan_inputs(paths: Sequence[str], output: str, save_vis: str | None) -> PredictPlan:
    """List the sources named by ``paths``, probe the video files, and check ``--output`` and ``--save-vis``.

    Raises:
        FileNotFoundError: a path that names nothing, or no image or video under the paths.
        OutputPathError: videos with an ``--output`` that is not ``.jsonl``, or an output that cannot be written
            or would overwrite an input.
        SourceError: every source is a video file that cannot be read (one line naming the first).
        MissingVideoLibrary: videos without PyAV installed.
    """
    from paadet.sources import list_sources, probe_video

    listed = list_sources(paths)
    images = [s for s in listed if isinstance(s, ImageSource)]
    videos = [s for s in listed if isinstance(s, VideoSource)]
    if not listed:
        raise FileNotFoundError(
            f"no images in {', '.join(paths)}, nor videos (folders are searched recursively for both, by suffix)"
        )
    jsonl = Path(output).suffix.lower() == ".jsonl"
    if videos and not jsonl:
        raise OutputPathError(
            f"{output}: videos, webcams and streams are written as JSON Lines (one line per frame); "
            "give --output a .jsonl name"
        )
    if videos:
        from paadet.sources.video import require_av

        require_av()  # a missing PyAV is one line before the model loads, for webcams and streams too
    usable, skipped = [], []
    for video in videos:
        try:
            if not video.is_live:
                probe_video(video)
            usable.append(video)
        except SourceError as exc:
            skipped.append(str(exc))
    if skipped and not usable and not images:
        raise SourceError(
            skipped[0] + (f" (and {len(skipped) - 1} more unreadable videos)" if len(skipped) > 1 else "")
        )
    plan = PredictPlan(images, usable, skipped, jsonl)
    inputs = [s.path for s in images] + [v.path for v in usable if v.path is not None]
    check_output_file(output, "--output", inputs=inputs)
    if save_vis is not None:
        from paadet.visualize import vis_targets

        check_output_dir(save_vis, "--save-vis", inputs=inputs)
        names = [s.file_name for s in images] + [v.vis_name() for v in usable]
        targets = vis_targets(names, inputs + [v.path for v in videos if v.path is not None], save_vis)
        if any(Path(output).resolve() == t.resolve() for t in targets):
            raise OutputPathError(f"{output}: --output is also where --save-vis would draw")
        plan.image_targets, plan.video_targets = targets[: len(images)], targets[len(images) :]
    return plan


class JsonLines:
    """A JSON Lines file written line by line: each line in one unbuffered ``write``, so a reader (or a run
    stopped by Ctrl-C) sees whole lines; a crash loses at most the frames still in flight."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.count = 0
        with writing(self.path):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "wb", buffering=0)  # noqa: SIM115 (closed by close())

    def write(self, obj: dict) -> None:
        """Append ``obj`` as one line."""
        view = memoryview((json.dumps(obj) + "\n").encode("utf-8"))
        with writing(self.path):
            while view:
                view = view[self._file.write(view) :]
        self.count += 1

    def close(self) -> None:
        self._file.close()


@dataclass
class StreamTally:
    """Counts of a JSON Lines run (:func:`predict_jsonl`)."""

    images_done: int = 0
    images_skipped: int = 0
    frames: int = 0
    videos_done: int = 0
    videos_failed: int = 0
    drawn: int = 0
    below: int = 0
    timer: Any = None

    @property
    def processed(self) -> int:
        return self.images_done + self.frames


def predict_jsonl(
    plan: PredictPlan,
    output: str,
    detector: Detector,
    vid_stride: int = 1,
    max_frames: int | None = None,
    vis_score_thr: float = 0.3,
    progress: bool = True,
) -> StreamTally:
    """Write one JSON line per image and per processed frame to ``output`` (images first, then each video in
    turn), flushed as each completes; with ``plan``'s ``--save-vis`` targets, the drawn images and one annotated
    video per video source.

    A video that cannot be opened, or stops mid-way (a drop, a truncated file), is reported on stderr with the
    frames done, its lines kept, and the run goes on with the next source. On Ctrl-C the lines written stay (each
    complete), the annotated video so far is finished, a line says so, and ``KeyboardInterrupt`` propagates.
    """
    from paadet.runtime.base import StageTimer

    tally = StreamTally(timer=StageTimer(getattr(detector.backend, "device", None)))
    lines = JsonLines(output)
    try:
        if plan.images:
            _images_to_lines(plan, lines, detector, tally, vis_score_thr, progress)
        targets = plan.video_targets or [None] * len(plan.videos)
        for video, target in zip(plan.videos, targets, strict=True):
            _video_to_lines(video, target, lines, detector, tally, vid_stride, max_frames, vis_score_thr, progress)
    except KeyboardInterrupt:
        print(
            f"paadet predict: interrupted; {lines.count} lines in {output}, each complete "
            f"({tally.frames} video frames, {tally.images_done} images)",
            file=sys.stderr,
        )
        raise
    finally:
        lines.close()
    return tally


def _images_to_lines(
    plan: PredictPlan, lines: JsonLines, detector: Detector, tally: StreamTally, score_thr: float, progress: bool
) -> None:
    """The images' lines (``frame`` 0, ``time_ms`` null), as their batches complete, and their drawn copies."""
    from tqdm import tqdm

    from paadet.data.pipeline import iter_loaded

    bar = tqdm(total=len(plan.images), unit="img", disable=not progress, desc="images")
    try:
        for item, result in detector.run(iter_loaded(plan.images, detector.preset, detector.workers), tally.timer):
            bar.update(1)
            if result is None:
                tally.images_skipped += 1
                tqdm.write(f"skipped {item.name}: {item.error}", file=sys.stderr)
                continue
            lines.write(FrameResult(plan.images[item.index].file_name, 0, None, result).to_json(detector.classes))
            tally.images_done += 1
            if plan.image_targets is not None:
                tally.drawn += write_visualisation(
                    plan.images[item.index], result, plan.image_targets[item.index], score_thr, detector.classes.names
                )
                tally.below += int((result.scores < score_thr).sum())
    finally:
        bar.close()


def _video_to_lines(
    video: VideoSource,
    target: Path | None,
    lines: JsonLines,
    detector: Detector,
    tally: StreamTally,
    stride: int,
    max_frames: int | None,
    score_thr: float,
    progress: bool,
) -> None:
    """One video's lines, and its annotated video at ``target`` (finished also when it stops or on Ctrl-C)."""
    from tqdm import tqdm

    from paadet.console import stderr
    from paadet.sources import open_video
    from paadet.sources.writer import AnnotatedVideo
    from paadet.visualize import draw_detections

    try:
        reader = open_video(video)
    except SourceError as exc:
        tally.videos_failed += 1
        stderr(f"skipped {exc}; 0 frames done")
        return
    total = None if reader.declared_frames is None else -(-reader.declared_frames // stride)
    total = min(total, max_frames) if total is not None and max_frames is not None else (total or max_frames)
    fps = reader.fps / stride if reader.fps else None
    writer: AnnotatedVideo | None = None
    bar = tqdm(total=total, unit="frame", disable=not progress, desc=video.name[-40:])
    frames = detector.stream(reader, stride, max_frames, keep_images=target is not None, timer=tally.timer)
    try:
        for frame in frames:
            lines.write(frame.to_json(detector.classes))
            tally.frames += 1
            bar.update(1)
            if target is not None and frame.image is not None:
                result = frame.result
                drawn, boxes = draw_detections(
                    frame.image, result.boxes, result.scores, result.labels, score_thr, detector.classes.names
                )
                if writer is None:
                    writer = AnnotatedVideo(target, frame.image.shape[1], frame.image.shape[0], fps)
                writer.write(drawn)
                tally.drawn += boxes
                tally.below += int((result.scores < score_thr).sum())
        tally.videos_done += 1
    except SourceError as exc:
        tally.videos_failed += 1
        stderr(f"stopped {exc}" if exc.frames_done else f"skipped {exc}")
    finally:
        frames.close()
        bar.close()
        if writer is not None:
            writer.close()
