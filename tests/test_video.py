"""Videos, webcams and streams in ``paadet predict`` and ``Detector.stream``: clips generated here (OpenCV's mp4v,
MJPG and lossless PNG-in-AVI, PyAV's H.264), JSON Lines out, annotated videos, stride, max-frames, timestamps, bad
files, streams that cannot be opened or drop, and Ctrl-C."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np
import pytest
import torch

from paadet.cli import main
from paadet.data.synthetic import synthetic_image
from paadet.detector import Detector
from paadet.model.seeded import train_state_dict
from paadet.predict import plan_inputs
from paadet.sources import VideoSource, list_sources, read_ahead
from paadet.sources.video import MissingVideoLibrary

HEIGHT, WIDTH = 64, 96
CLASSES = {"classes": ["a", "b", "c"], "category_ids": [1, 2, 3]}
PRESET = {"name": "small", "scale": [96, 96], "size_divisor": 32}  # frames run at their own size: fast


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Seeded 3-class weights with a hot classifier (many detections to compare) and a small preset."""
    path = tmp_path_factory.mktemp("ckpt") / "seeded.pth"
    torch.save(
        {"meta": {"dataset_meta": CLASSES, "preset": PRESET}, "state_dict": train_state_dict(0, cls_bias=0.0)}, path
    )
    return str(path)


def frames(count: int, seed: int = 0) -> list[np.ndarray]:
    """Distinct BGR frames of ``HEIGHT x WIDTH``."""
    return [synthetic_image(HEIGHT, WIDTH, seed=seed + i) for i in range(count)]


def write_clip(path: Path, fourcc: str, images: list[np.ndarray], fps: float = 10.0) -> Path:
    """A clip written by OpenCV (``png `` in .avi is lossless)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), fps, (WIDTH, HEIGHT))
    assert writer.isOpened(), fourcc
    for image in images:
        writer.write(image)
    writer.release()
    return path


def predict(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    code = main(["predict", *argv, "--no-progress"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def video_info(path: Path) -> tuple[int, int, int, Fraction]:
    """``(frames decoded, width, height, average rate)`` of a written video."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        count = sum(1 for _ in container.decode(stream))
        return count, stream.codec_context.width, stream.codec_context.height, Fraction(stream.average_rate)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- the acceptance: a lossless clip gives the same detections as its frames saved as PNGs ------------------------


def test_lossless_clip_equals_its_frames_as_pngs(tmp_path: Path, checkpoint: str, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    images = frames(5)
    write_clip(tmp_path / "clip.avi", "png ", images, fps=10)
    (tmp_path / "pngs").mkdir()
    for i, image in enumerate(images):
        cv2.imwrite(str(tmp_path / "pngs" / f"{i}.png"), image)
    model = ["--checkpoint", checkpoint, "--batch-size", "2"]
    code, out, err = predict(["clip.avi", "--output", "v.jsonl", "--save-vis", "vis/", *model], capsys)
    assert code == 0, err
    assert "5 frames from 1/1 videos" in out
    code, _, err = predict(["pngs", "--output", "p.json", *model], capsys)
    assert code == 0, err

    lines = read_lines(tmp_path / "v.jsonl")
    assert [line["frame"] for line in lines] == [0, 1, 2, 3, 4]
    assert [line["time_ms"] for line in lines] == [0.0, 100.0, 200.0, 300.0, 400.0]
    reference = json.loads((tmp_path / "p.json").read_text())
    compared = 0
    for line in lines:
        assert list(line) == ["source", "frame", "time_ms", "width", "height", "detections"]
        assert (line["source"], line["width"], line["height"]) == ("clip.avi", WIDTH, HEIGHT)
        ref = [e for e in reference if e["file_name"] == f"{line['frame']}.png"]
        ours = line["detections"]
        assert len(ours) == len(ref) > 0  # every detection matched, none extra
        for mine, theirs in zip(ours, ref, strict=True):  # both sorted by score
            assert set(mine) == {"bbox", "score", "label", "category_id", "name"}
            x, y, w, h = theirs["bbox"]
            np.testing.assert_allclose(mine["bbox"], [x, y, x + w, y + h], atol=1e-4)
            assert mine["score"] == theirs["score"] and mine["category_id"] == theirs["category_id"]
            assert CLASSES["classes"][mine["label"]] == mine["name"] and mine["category_id"] == mine["label"] + 1
            compared += 1
    assert compared >= 25

    assert sorted(p.name for p in (tmp_path / "vis").iterdir()) == ["clip.mp4"]  # no temporary file left
    assert video_info(tmp_path / "vis" / "clip.mp4") == (5, WIDTH, HEIGHT, Fraction(10))
    with av.open(str(tmp_path / "vis" / "clip.mp4")) as container:
        assert container.streams.video[0].codec_context.name == "h264"


# --- stride, max-frames, timestamps, folders and mixed inputs -----------------------------------------------------


def test_stride_and_max_frames_on_an_mp4(tmp_path: Path, checkpoint: str, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    clip = write_clip(tmp_path / "in" / "clip.mp4", "mp4v", frames(7), fps=25)
    out, vis = tmp_path / "s.jsonl", tmp_path / "vis"
    code, _, err = predict(
        ["in/clip.mp4", "--checkpoint", checkpoint, "--output", str(out), "--vid-stride", "2", "--save-vis", "vis"],
        capsys,
    )
    assert code == 0, err
    assert [(line["frame"], line["time_ms"]) for line in read_lines(out)] == [
        (0, 0.0),
        (2, 80.0),
        (4, 160.0),
        (6, 240.0),
    ]
    assert video_info(vis / "in" / "clip.mp4") == (4, WIDTH, HEIGHT, Fraction(25, 2))  # fps = the source's / the stride

    code, _, err = predict(
        [str(clip), "--checkpoint", checkpoint, "--output", str(out), "--vid-stride", "3", "--max-frames", "2"], capsys
    )
    assert code == 0, err
    assert [line["frame"] for line in read_lines(out)] == [0, 3]


def test_timestamps_are_the_frames_own_on_a_variable_rate_clip(tmp_path: Path, checkpoint: str) -> None:
    stamps = [0, 40, 100, 110, 300, 333]
    path = tmp_path / "vfr.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        stream.codec_context.time_base = Fraction(1, 1000)
        for image, ms in zip(frames(len(stamps)), stamps, strict=True):
            frame = av.VideoFrame.from_ndarray(image, format="bgr24")
            frame.pts, frame.time_base = ms, Fraction(1, 1000)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    detector = Detector.from_checkpoint(checkpoint, batch_size=2)
    results = list(detector.stream(path))
    assert [r.frame for r in results] == list(range(6))
    assert [r.time_ms for r in results] == [float(ms) for ms in stamps]
    assert all(r.image is None and r.result.ori_shape == (HEIGHT, WIDTH) for r in results)
    assert [r.time_ms for r in detector.stream(path, stride=2, max_frames=2)] == [0.0, 100.0]


def test_folder_of_videos_and_images_to_json_lines(tmp_path: Path, checkpoint: str, capsys) -> None:
    folder = tmp_path / "media"
    write_clip(folder / "a.avi", "MJPG", frames(3), fps=5)
    write_clip(folder / "sub" / "b.mp4", "mp4v", frames(2, seed=5), fps=5)
    cv2.imwrite(str(folder / "c.png"), synthetic_image(HEIGHT, WIDTH, seed=9))
    (folder / "notes.txt").write_text("not media")
    out = tmp_path / "all.jsonl"
    code, stdout, err = predict(
        [str(folder), "--checkpoint", checkpoint, "--output", str(out), "--save-vis", str(tmp_path / "vis")], capsys
    )
    assert code == 0, err
    lines = read_lines(out)
    assert [(line["source"], line["frame"]) for line in lines] == [
        ("c.png", 0),  # images first, then each video in turn
        ("a.avi", 0),
        ("a.avi", 1),
        ("a.avi", 2),
        ("sub/b.mp4", 0),
        ("sub/b.mp4", 1),
    ]
    assert lines[0]["time_ms"] is None and lines[1]["time_ms"] == 0.0 and lines[2]["time_ms"] == 200.0
    drawn = sorted(p.relative_to(tmp_path / "vis").as_posix() for p in (tmp_path / "vis").rglob("*") if p.is_file())
    assert drawn == ["a.mp4", "c.png", "sub/b.mp4"]
    assert "5 frames from 2/2 videos, 1/1 images" in stdout

    # a COCO results file cannot hold video frames: refused in one line before the model loads
    code, _, err = predict([str(folder), "--checkpoint", checkpoint, "--output", str(tmp_path / "r.json")], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and ".jsonl" in err


def test_save_vis_never_writes_over_an_input_video(tmp_path: Path, checkpoint: str, capsys, monkeypatch) -> None:
    clip = write_clip(tmp_path / "clip.mp4", "mp4v", frames(2))
    before = clip.read_bytes()
    monkeypatch.chdir(tmp_path)  # clip.mp4's drawn video would be ./clip.mp4 itself
    code, _, err = predict(["clip.mp4", "--checkpoint", checkpoint, "--output", "o.jsonl", "--save-vis", "."], capsys)
    assert code == 2 and "overwrite the input clip.mp4" in err and len(err.strip().splitlines()) == 1
    assert clip.read_bytes() == before and not (tmp_path / "o.jsonl").exists()


# --- bad input --------------------------------------------------------------------------------------------------


def test_corrupt_truncated_and_empty_files_are_one_line_errors(tmp_path: Path, checkpoint: str, capsys) -> None:
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    whole = write_clip(tmp_path / "whole.mp4", "mp4v", frames(6)).read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(whole[: len(whole) // 2])  # the index (moov) is at the end: nothing can be read
    empty = tmp_path / "empty.avi"
    write_clip(empty, "MJPG", [])
    for bad in (garbage, cut, empty):
        out = tmp_path / f"{bad.stem}.jsonl"
        code, _, err = predict([str(bad), "--checkpoint", checkpoint, "--output", str(out)], capsys)
        assert code == 2, (bad, err)
        assert len(err.strip().splitlines()) == 1 and bad.name in err, err  # from the start-up probe
        assert not out.exists()


def test_truncated_avi_keeps_the_frames_before_the_cut(tmp_path: Path, checkpoint: str, capsys) -> None:
    whole = write_clip(tmp_path / "whole.avi", "MJPG", frames(12)).read_bytes()
    cut = tmp_path / "cut.avi"
    cut.write_bytes(whole[: len(whole) // 2])
    out = tmp_path / "cut.jsonl"
    code, _, err = predict([str(cut), "--checkpoint", checkpoint, "--output", str(out)], capsys)
    assert code == 1, err
    done = len(read_lines(out))
    assert 0 < done < 12
    assert f"cut.avi: the file ends after {done} of the 12 frames" in err and f"{done} frames done" in err


def test_a_bad_source_among_several_is_skipped_and_the_rest_done(tmp_path: Path, checkpoint: str, capsys) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "bad.mkv").write_bytes(b"\x1a\x45\xdf\xa3 not really matroska")
    write_clip(tmp_path / "in" / "good.avi", "MJPG", frames(2))
    out = tmp_path / "o.jsonl"
    code, stdout, err = predict([str(tmp_path / "in"), "--checkpoint", checkpoint, "--output", str(out)], capsys)
    assert code == 1
    assert "skipped" in err and "bad.mkv" in err
    assert [line["source"] for line in read_lines(out)] == ["good.avi", "good.avi"]
    assert "2 frames from 1/2 videos" in stdout


def test_a_stream_that_cannot_be_opened(tmp_path: Path, checkpoint: str, capsys) -> None:
    url = f"rtsp://127.0.0.1:{free_port()}/live"  # nothing listens there
    out = tmp_path / "s.jsonl"
    code, _, err = predict([url, "--checkpoint", checkpoint, "--output", str(out)], capsys)
    assert code != 0
    assert url in err and "0 frames done" in err
    assert out.read_text() == ""


def test_a_stream_that_drops_mid_way_keeps_its_lines(tmp_path: Path, checkpoint: str, capsys) -> None:
    data = write_clip(tmp_path / "m.avi", "MJPG", frames(16), fps=25).read_bytes()
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(2)

    def serve_half() -> None:  # an HTTP server that promises the whole file and hangs up half-way
        conn, _ = server.accept()
        conn.recv(65536)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: video/x-msvideo\r\nContent-Length: %d\r\n\r\n" % len(data))
        conn.sendall(data[: len(data) // 2])
        time.sleep(0.2)
        conn.close()

    threading.Thread(target=serve_half, daemon=True).start()
    url = f"http://127.0.0.1:{server.getsockname()[1]}/m.avi"
    out = tmp_path / "d.jsonl"
    code, _, err = predict([url, "--checkpoint", checkpoint, "--output", str(out)], capsys)
    server.close()
    done = len(read_lines(out))
    assert code == 1 and 0 < done < 16
    assert url in err and "dropped" in err and f"{done} frames done" in err


def test_ctrl_c_keeps_complete_lines_and_exits_130(tmp_path: Path, checkpoint: str) -> None:
    clip = write_clip(tmp_path / "long.avi", "MJPG", frames(8) * 25, fps=25)  # 200 frames
    out = tmp_path / "long.jsonl"
    cmd = [sys.executable, "-m", "paadet", "predict", str(clip), "--checkpoint", checkpoint, "--output", str(out)]
    proc = subprocess.Popen([*cmd, "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if out.exists() and out.read_bytes().count(b"\n") >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    text = out.read_text()
    assert text.endswith("\n")
    lines = [json.loads(line) for line in text.splitlines()]
    assert 2 <= len(lines) < 200 and [line["frame"] for line in lines] == list(range(len(lines)))
    said = re.search(r"interrupted; (\d+) lines in", err)
    assert said and int(said.group(1)) in (len(lines), len(lines) - 1), err  # the signal may fall between the two


# --- the Python API: Detector.stream on every backend, lazily, with a bounded read-ahead ------------------------


def test_stream_on_onnxruntime_equals_predict_on_the_frames(tmp_path: Path, checkpoint: str, capsys) -> None:
    from paadet import DetectorSpec

    model = tmp_path / "paa.onnx"
    assert main(["export", "--checkpoint", checkpoint, "--output", str(model), "--no-simplify", "--no-verify"]) == 0
    capsys.readouterr()
    images = frames(3, seed=20)
    clip = write_clip(tmp_path / "c.avi", "png ", images)
    detector = Detector.from_spec(DetectorSpec(backend="onnxruntime", model=str(model), batch_size=1))
    streamed = detector.stream(clip, keep_images=True)
    first = next(streamed)  # lazy: one frame at a time
    results = [first, *streamed]
    expected = detector.predict(images)
    assert len(results) == 3
    for got, want, image in zip(results, expected, images, strict=True):
        assert np.array_equal(got.image, image)
        np.testing.assert_array_equal(got.result.boxes, want.boxes)
        np.testing.assert_array_equal(got.result.scores, want.scores)
        np.testing.assert_array_equal(got.result.labels, want.labels)


def test_read_ahead_is_bounded_ordered_and_stops_when_closed() -> None:
    produced: list[int] = []

    def numbers():
        for i in range(1000):
            produced.append(i)
            yield i
        raise RuntimeError("after the last")

    items = read_ahead(numbers(), depth=4)
    assert [next(items) for _ in range(3)] == [0, 1, 2]
    time.sleep(0.3)
    assert len(produced) <= 3 + 4 + 1  # consumed + queued + the one waiting to be put
    items.close()
    time.sleep(0.3)
    assert not any(t.name == "paadet-read-ahead" for t in threading.enumerate())
    everything = read_ahead(iter(range(10)), depth=2)
    assert list(everything) == list(range(10))
    failing = read_ahead(numbers(), depth=3)
    with pytest.raises(RuntimeError, match="after the last"):
        assert sum(1 for _ in failing) == 1000


# --- listing: what each argument names -----------------------------------------------------------------------------


def test_sources_by_suffix_by_probing_globs_webcams_and_urls(tmp_path: Path) -> None:
    folder = tmp_path / "d"
    write_clip(folder / "x.AVI", "MJPG", frames(1))
    cv2.imwrite(str(folder / "y.png"), frames(1)[0])
    (folder / "z.txt").write_text("text")
    probed = write_clip(tmp_path / "video.avi", "MJPG", frames(1)).rename(tmp_path / "video.bin")  # unknown suffix
    picture = tmp_path / "picture.bin"
    picture.write_bytes(cv2.imencode(".png", frames(1)[0])[1].tobytes())
    listed = list_sources([str(folder), str(probed), str(picture), str(tmp_path / "d" / "*.AVI"), "0", "rtsp://cam/1"])
    kinds = [(type(s).__name__, getattr(s, "kind", None), getattr(s, "name", None) or s.file_name) for s in listed]
    assert kinds == [
        ("VideoSource", "file", "x.AVI"),
        ("ImageSource", None, "y.png"),
        ("VideoSource", "file", str(probed)),
        ("ImageSource", None, str(picture)),  # the glob's match is the folder's x.AVI again: listed once
        ("VideoSource", "webcam", "/dev/video0"),
        ("VideoSource", "stream", "rtsp://cam/1"),
    ]
    assert [s.vis_name() for s in listed if isinstance(s, VideoSource)] == [
        "x.mp4",
        str(probed.with_suffix(".mp4")),
        "webcam0.mp4",
        "cam_1.mp4",
    ]
    with pytest.raises(FileNotFoundError, match="no file or folder matches"):
        list_sources([str(tmp_path / "*.mkv")])
    with pytest.raises(FileNotFoundError, match="nope"):
        list_sources([str(tmp_path / "nope")])


def test_videos_without_pyav_are_a_one_line_error_with_the_pip_command(tmp_path: Path, monkeypatch) -> None:
    clip = write_clip(tmp_path / "clip.avi", "MJPG", frames(1))
    monkeypatch.setitem(sys.modules, "av", None)  # as if PyAV were not installed
    with pytest.raises(MissingVideoLibrary, match=r'pip install "paadet\[video\]"'):
        plan_inputs([str(clip)], str(tmp_path / "o.jsonl"), None)
    with pytest.raises(MissingVideoLibrary, match="PyAV"):  # before the model loads, for a stream too
        plan_inputs(["rtsp://127.0.0.1/x"], str(tmp_path / "o.jsonl"), None)
    # images alone do not need PyAV
    image = tmp_path / "i.png"
    cv2.imwrite(str(image), frames(1)[0])
    assert plan_inputs([str(image)], str(tmp_path / "o.json"), None).images
