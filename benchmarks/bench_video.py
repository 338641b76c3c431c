"""Video throughput of ``paadet predict``: frames/s on a generated 720p clip against the same frames as image files.

Two parts, in one run:

1. ``decoders``: PyAV (FFmpeg's libraries, frame threads on and off) against OpenCV's FFmpeg backend on the same
   720p clips (H.264 from PyAV's libx264, mp4v and MJPG from OpenCV): decoded frames/s, and whether every frame's
   timestamp equals the one written (a variable-rate clip is included);
2. ``predict``: :meth:`Detector.stream` over an H.264 clip (decoding in a thread ahead of the network) against
   :meth:`Detector.run` over the same frames saved as JPEG files (``paadet predict``'s image path: decode and resize
   threads), alternating ``--repeats`` times; frames/s of each and their ratio. Seeded weights at a small preset
   (``--scale``), so that the network is fast and decoding has the most chance to show.

Example::

    python benchmarks/bench_video.py --part predict --frames 8 --repeats 3 --scale 320x192 --json /tmp/bench_video.json
    python benchmarks/bench_video.py --part decoders
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np


def make_frames(count: int, height: int, width: int) -> list[np.ndarray]:
    """``count`` BGR frames: 8 synthetic scenes, each shifted a little per frame (motion for the encoder)."""
    from paadet.data.synthetic import synthetic_image

    scenes = [synthetic_image(height, width, seed=i) for i in range(8)]
    return [np.roll(scenes[i % 8], shift=3 * i, axis=1) for i in range(count)]


def write_h264(path: Path, frames: list[np.ndarray], fps: int = 25, stamps_ms: list[int] | None = None) -> None:
    """An H.264 MP4 by PyAV; with ``stamps_ms``, each frame's pts in milliseconds (a variable-rate clip)."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        stream.options = {"preset": "veryfast"}
        if stamps_ms is not None:
            stream.codec_context.time_base = Fraction(1, 1000)
        for i, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(image, format="bgr24")
            if stamps_ms is not None:
                frame.pts, frame.time_base = stamps_ms[i], Fraction(1, 1000)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


def write_cv2(path: Path, fourcc: str, frames: list[np.ndarray], fps: int = 25) -> None:
    height, width = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), fps, (width, height))
    for image in frames:
        writer.write(image)
    writer.release()


def decode_pyav(path: Path, threads: bool) -> tuple[float, list[float]]:
    """Decoded frames/s (BGR arrays) and each frame's timestamp (ms) by PyAV."""
    stamps = []
    started = time.perf_counter()
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        if threads:
            stream.thread_type = "AUTO"
        for frame in container.decode(stream):
            frame.to_ndarray(format="bgr24")
            stamps.append(round(float(frame.pts * frame.time_base) * 1000, 3))
    return len(stamps) / (time.perf_counter() - started), stamps


def decode_opencv(path: Path) -> tuple[float, list[float]]:
    """Decoded frames/s and each frame's ``CAP_PROP_POS_MSEC`` by OpenCV's FFmpeg backend."""
    capture = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG)
    stamps = []
    started = time.perf_counter()
    while True:
        ok, _ = capture.read()
        if not ok:
            break
        stamps.append(round(capture.get(cv2.CAP_PROP_POS_MSEC), 3))
    rate = len(stamps) / (time.perf_counter() - started)
    capture.release()
    return rate, stamps


def decoders(folder: Path, count: int, height: int, width: int) -> list[dict]:
    frames = make_frames(count, height, width)
    clips = {}
    clips["h264.mp4"] = folder / "h264.mp4"
    write_h264(clips["h264.mp4"], frames)
    clips["mp4v.mp4"] = folder / "mp4v.mp4"
    write_cv2(clips["mp4v.mp4"], "mp4v", frames)
    clips["mjpg.avi"] = folder / "mjpg.avi"
    write_cv2(clips["mjpg.avi"], "MJPG", frames)
    stamps = [round(i * 40 + (i % 3) * 7) for i in range(count)]  # irregular, increasing
    clips["h264-vfr.mp4"] = folder / "vfr.mp4"
    write_h264(clips["h264-vfr.mp4"], frames, stamps_ms=stamps)
    rows = []
    for name, path in clips.items():
        expected = [float(s) for s in stamps] if "vfr" in name else [i * 40.0 for i in range(count)]
        for decoder, run in (
            ("pyav threads", lambda p: decode_pyav(p, True)),
            ("pyav 1 thread", lambda p: decode_pyav(p, False)),
            ("opencv ffmpeg", decode_opencv),
        ):
            rate, got = run(path)
            rows.append(
                {"clip": name, "decoder": decoder, "frames_per_s": round(rate, 1), "exact_timestamps": got == expected}
            )
            print(f"{name:13s} {decoder:14s} {rate:7.1f} frames/s  timestamps exact: {got == expected}")
    return rows


def predict(
    folder: Path, count: int, height: int, width: int, scale: tuple[int, int], repeats: int, batch: int
) -> dict:
    import torch

    from paadet.data.pipeline import iter_loaded
    from paadet.detector import Detector
    from paadet.model.seeded import seeded_state_dict

    checkpoint = folder / "seeded.pth"
    preset = {"name": "bench", "scale": list(scale), "size_divisor": 32}
    torch.save({"meta": {"preset": preset}, "state_dict": seeded_state_dict(0, cls_bias=-4.0)}, checkpoint)
    clip = folder / "clip.mp4"
    write_h264(clip, make_frames(count, height, width))
    images = []
    with av.open(str(clip)) as container:  # the same frames the video path decodes, as JPEG files
        for i, frame in enumerate(container.decode(video=0)):
            path = folder / f"frame_{i:04d}.jpg"
            cv2.imwrite(str(path), frame.to_ndarray(format="bgr24"), [cv2.IMWRITE_JPEG_QUALITY, 95])
            images.append(path)
    detector = Detector.from_checkpoint(checkpoint, batch_size=batch)
    list(detector.run(iter_loaded(images[:1], detector.preset, 0)))  # warm-up
    rates: dict[str, list[float]] = {"images": [], "video": []}
    for _ in range(repeats):
        started = time.perf_counter()
        done = sum(1 for _ in detector.run(iter_loaded(images, detector.preset, detector.workers)))
        rates["images"].append(done / (time.perf_counter() - started))
        started = time.perf_counter()
        done = sum(1 for _ in detector.stream(clip))
        rates["video"].append(done / (time.perf_counter() - started))
        print(f"images {rates['images'][-1]:.3f} frames/s, video {rates['video'][-1]:.3f} frames/s", flush=True)
    images_rate, video_rate = statistics.median(rates["images"]), statistics.median(rates["video"])
    summary = {
        "frames": count,
        "size": f"{width}x{height}",
        "preset_scale": list(scale),
        "batch_size": batch,
        "images_frames_per_s": [round(r, 3) for r in rates["images"]],
        "video_frames_per_s": [round(r, 3) for r in rates["video"]],
        "ratio_of_medians": round(video_rate / images_rate, 3),
    }
    print(f"video / images (medians of {repeats}): {summary['ratio_of_medians']:.3f}x")
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=32, help="frames of the predicted clip (default 32)")
    parser.add_argument("--decode-frames", type=int, default=120, help="frames of the decoders' clips (default 120)")
    parser.add_argument("--size", default="1280x720", help="WxH of the clips (default 1280x720)")
    parser.add_argument("--scale", default="640x384", help="the preset's long x short side (default 640x384)")
    parser.add_argument("--repeats", type=int, default=3, help="alternations of images and video (default 3)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--part", choices=("all", "decoders", "predict"), default="all")
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.split("x"))
    scale = tuple(int(v) for v in args.scale.split("x"))
    report: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        if args.part in ("all", "decoders"):
            report["decoders"] = decoders(Path(tmp), args.decode_frames, height, width)
        if args.part in ("all", "predict"):
            report["predict"] = predict(Path(tmp), args.frames, height, width, scale, args.repeats, args.batch_size)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
