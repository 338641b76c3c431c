"""``paadet batch`` on a local Ray instance (2 CPUs, a small model input): parity with ``predict``,
resuming after an interrupted run, a worker killed mid-run, unreadable images."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import pytest
import ray
import torch
from fixtures import RAY_NO_METRICS

from paadet import DetectorSpec
from paadet.batch import BatchError, OutputFolder, ShardDone, expand_inputs, read_results, run_batch
from paadet.commands import batch as batch_command
from paadet.compare import MatchReport, match_detections
from paadet.data.synthetic import synthetic_image
from paadet.detector import Detector
from paadet.model.seeded import seeded_state_dict
from paadet.predict import predict_files
from paadet.preprocess import Preset
from paadet.runtime.registry import with_explicit_preset

TINY = Preset("tiny", (128, 128), size_divisor=None, fixed_size=(128, 128))
SIZES = [
    (100, 140),
    (128, 96),
    (90, 200),
    (150, 150),
    (64, 120),
    (200, 130),
    (110, 110),
    (140, 70),
    (96, 160),
    (120, 125),
]


class StopRun(Exception):
    """Raised by a progress callback to stop a run part-way, as a killed driver would."""


@pytest.fixture(scope="module")
def ray_local():
    """One local Ray instance for the module: 2 CPUs, no dashboard; shut down at the end."""
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", _system_config=RAY_NO_METRICS)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A checkpoint of seeded weights, a folder of 10 small images plus one broken file, and predict's results."""
    root = tmp_path_factory.mktemp("batch")
    checkpoint = root / "seeded.pth"
    torch.save({"state_dict": seeded_state_dict(0)}, checkpoint)
    folder = root / "images"
    (folder / "sub").mkdir(parents=True)
    for i, (h, w) in enumerate(SIZES):
        name = f"img{i:02d}.png" if i < 7 else f"sub/img{i:02d}.jpg"
        cv2.imwrite(str(folder / name), synthetic_image(h, w, seed=i))
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    spec = DetectorSpec(checkpoint=str(checkpoint), preset=TINY, workers=1)
    reference_json = root / "predict.json"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in each 1-CPU worker, so that the float arithmetic is the same
    try:
        detector = Detector.from_spec(DetectorSpec(checkpoint=str(checkpoint), preset=TINY, workers=1))
        done, skipped, _ = predict_files([str(folder)], str(reference_json), detector, progress=False)
        readable = [s for s in expand_inputs([folder]) if s.file_name != "broken.png"]
        reference = {
            os.path.abspath(s.path): r
            for s, r in zip(readable, detector.predict([s.path for s in readable]), strict=False)
        }
    finally:
        torch.set_num_threads(threads)
    assert (done, skipped) == (10, 1)
    return {"root": root, "folder": folder, "spec": spec, "reference": reference, "reference_json": reference_json}


def assert_matches_reference(output_dir: Path, data: dict) -> None:
    """Every readable input has results, once, equal to single-process predict (the parity rule)."""
    keys = [
        json.loads(line)["path"]
        for p in sorted((output_dir / "shards").glob("shard-*.jsonl"))
        for line in p.read_text().splitlines()
    ]
    assert len(keys) == len(set(keys)), "an input was written twice"
    results = read_results(output_dir)
    reference = data["reference"]
    assert sorted(results) == sorted(reference)
    total = MatchReport()
    for key, ref in reference.items():
        ours = results[key]
        assert ours.ori_shape == ref.ori_shape
        report = match_detections(ref.boxes, ref.scores, ref.labels, ours.boxes, ours.scores, ours.labels)
        assert report.missed == 0 and report.extra == 0, f"{key}: {report}"
        total += report
    assert total.reference > 0, "the seeded model should detect something"


def assert_coco_matches_predict(coco_file: Path, data: dict) -> None:
    """The merged COCO JSON has predict's entries: same images, ids, names, detections (parity rule)."""
    ours = json.loads(coco_file.read_text())
    ref = json.loads(data["reference_json"].read_text())
    assert [(e["image_id"], e["file_name"], e["category_id"]) for e in ours] == [
        (e["image_id"], e["file_name"], e["category_id"]) for e in ref
    ]
    for a, b in zip(ours, ref, strict=False):
        assert abs(a["score"] - b["score"]) <= 1e-4
        assert all(abs(x - y) <= 1e-2 for x, y in zip(a["bbox"], b["bbox"], strict=False))


def error_names(output_dir: Path) -> list[str]:
    return [json.loads(line)["file_name"] for line in (output_dir / "errors.jsonl").read_text().splitlines()]


def test_distributed_equals_predict(ray_local, data: dict) -> None:
    out = data["root"] / "out_parity"
    coco = data["root"] / "parity.json"
    summary = run_batch(
        [data["folder"]], out, data["spec"], num_workers=2, shard_size=3, coco_output=coco, progress=False
    )
    assert (summary.total, summary.processed, summary.detected, summary.errors, summary.failed) == (11, 11, 10, 1, 0)
    assert len(summary.workers) == 2 and sum(w.images for w in summary.workers) == 11
    assert_matches_reference(out, data)
    assert_coco_matches_predict(coco, data)
    assert coco.read_bytes() == data["reference_json"].read_bytes(), "same arithmetic, same bytes as predict"
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert [e["file_name"] for e in errors] == ["broken.png"]
    assert "not a supported image format" in errors[0]["error"]
    manifests = OutputFolder(out).manifests()
    assert len(manifests) == 4 and sum(len(m.inputs) for m in manifests) == 11
    saved = json.loads((out / "summary.json").read_text())
    assert saved["processed"] == 11 and len(saved["workers"]) == 2

    again = run_batch([data["folder"]], out, data["spec"], num_workers=2, shard_size=3, progress=False)
    assert (again.already_done, again.processed, again.errors_listed) == (11, 0, 1)


def test_interrupted_run_resumes_without_duplicates(ray_local, data: dict) -> None:
    out = data["root"] / "out_resume"

    def stop_after_two(done: ShardDone) -> None:
        if done.committed == 2:
            raise StopRun

    with pytest.raises(StopRun):
        run_batch(
            [data["folder"]],
            out,
            data["spec"],
            num_workers=2,
            shard_size=2,
            progress=False,
            on_shard_done=stop_after_two,
        )
    committed = OutputFolder(out).manifests()
    assert len(committed) == 2
    # what a driver killed between the two writes of a commit leaves: results without a manifest, a temp file
    (out / "shards" / "shard-000007.jsonl").write_text('{"path": "/nowhere.png"}\n')
    (out / "shards" / ".shard-000008.jsonl.abc.tmp").write_text("partial")

    summary = run_batch([data["folder"]], out, data["spec"], num_workers=2, shard_size=2, progress=False)
    assert summary.already_done == 4 and summary.processed == 7
    assert not (out / "shards" / ".shard-000008.jsonl.abc.tmp").exists()
    assert (
        not (out / "shards" / "shard-000007.jsonl").exists() or (out / "shards" / "shard-000007.manifest.json").exists()
    )
    after = OutputFolder(out).manifests()
    assert after[:2] == committed, "committed shards are kept as they are"
    assert min(m.shard for m in after[2:]) > max(m.shard for m in committed)
    assert_matches_reference(out, data)
    assert error_names(out) == ["broken.png"]


def test_driver_killed_with_sigkill_then_resumed(ray_local, data: dict) -> None:
    out = data["root"] / "out_sigkill"
    script = (
        "import sys, ray\n"
        "from paadet import DetectorSpec\n"
        "from paadet.batch import run_batch\n"
        "from paadet.preprocess import Preset\n"
        "ray.init(address=sys.argv[1], logging_level='ERROR')\n"
        "tiny = Preset('tiny', (128, 128), size_divisor=None, fixed_size=(128, 128))\n"
        "spec = DetectorSpec(checkpoint=sys.argv[2], preset=tiny, workers=1)\n"
        "run_batch([sys.argv[3]], sys.argv[4], spec, num_workers=1, shard_size=1, progress=False)\n"
    )
    address = ray.get_runtime_context().gcs_address
    proc = subprocess.Popen(
        [sys.executable, "-c", script, address, data["spec"].checkpoint, str(data["folder"]), str(out)]
    )
    try:
        deadline = time.monotonic() + 60
        while len(list((out / "shards").glob("*.manifest.json"))) < 2:
            assert proc.poll() is None, "the driver ended before it was killed"
            assert time.monotonic() < deadline, "the driver committed nothing within 60 s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    before = len(OutputFolder(out).manifests())
    assert 2 <= before < 11
    summary = run_batch([data["folder"]], out, data["spec"], num_workers=2, shard_size=3, progress=False)
    assert summary.already_done == before and summary.already_done + summary.processed == 11
    assert_matches_reference(out, data)
    assert error_names(out) == ["broken.png"]


def test_killed_worker_costs_a_retry_only(ray_local, data: dict) -> None:
    out = data["root"] / "out_kill"
    coco = data["root"] / "kill.json"
    killed: list[int] = []

    def kill_worker_process(done: ShardDone) -> None:
        if not killed:  # the worker has its next shard in hand: SIGKILL it mid-shard
            killed.append(done.pid)
            os.kill(done.pid, signal.SIGKILL)

    summary = run_batch(
        [data["folder"]],
        out,
        data["spec"],
        num_workers=2,
        shard_size=2,
        progress=False,
        coco_output=coco,
        on_shard_done=kill_worker_process,
    )
    assert killed and summary.retries >= 1 and summary.failed == 0
    assert summary.processed == 11
    assert_matches_reference(out, data)
    assert_coco_matches_predict(coco, data)
    assert error_names(out) == ["broken.png"]


def test_path_list_input_and_missing_files_are_reported(ray_local, data: dict) -> None:
    root = data["root"]
    listing = root / "list.txt"
    listing.write_text("# two images and a missing one\nimages/img00.png\n\nimages/sub/img08.jpg\nimages/gone.png\n")
    sources = expand_inputs([listing, data["folder"] / "img00.png"])
    assert [s.file_name for s in sources] == ["images/img00.png", "images/sub/img08.jpg", "images/gone.png"]
    out = root / "out_list"
    summary = run_batch([listing], out, data["spec"], num_workers=1, shard_size=2, progress=False)
    assert (summary.processed, summary.detected, summary.errors) == (3, 2, 1)
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert [e["file_name"] for e in errors] == ["images/gone.png"] and "no such file" in errors[0]["error"]
    results = read_results(out)
    for name in ("img00.png", "sub/img08.jpg"):
        ref = data["reference"][str(data["folder"] / name)]
        ours = results[str(data["folder"] / name)]
        assert match_detections(ref.boxes, ref.scores, ref.labels, ours.boxes, ours.scores, ours.labels).missed == 0


def test_output_of_another_model_is_refused(data: dict) -> None:
    out = data["root"] / "out_other"
    OutputFolder(out).check_run(data["spec"].fingerprint())
    other = DetectorSpec(checkpoint=data["spec"].checkpoint, preset=TINY, score_voting=False)
    with pytest.raises(BatchError, match="other model settings"):
        run_batch([data["folder"]], out, other, progress=False)


def test_model_that_cannot_load_is_a_clear_error(ray_local, data: dict) -> None:
    broken = data["root"] / "broken.pth"
    broken.write_bytes(b"not a checkpoint")
    spec = DetectorSpec(checkpoint=str(broken), preset=TINY)
    with pytest.raises(BatchError, match=r"workers could not start: .*CheckpointError: .*broken.pth"):
        run_batch([data["folder"]], data["root"] / "out_broken", spec, num_workers=1, progress=False)


def test_command_line_options() -> None:
    parser = argparse.ArgumentParser()
    batch_command.add_parser(parser.add_subparsers())
    args = parser.parse_args(
        [
            "batch",
            "a",
            "list.txt",
            "-o",
            "out",
            "--ray",
            "auto",
            "--num-workers",
            "8",
            "--gpus-per-worker",
            "1",
            "--device",
            "cuda",
            "--shard-size",
            "32",
            "--coco",
            "r.json",
            "--no-score-voting",
            "--batch-size",
            "4",
        ]
    )
    assert args.func is batch_command.run
    assert (args.inputs, args.output_dir, args.ray) == (["a", "list.txt"], "out", "auto")
    assert (args.num_workers, args.gpus_per_worker, args.shard_size, args.coco) == (8, 1.0, 32, "r.json")
    spec = with_explicit_preset(batch_command.MODEL.spec(args))
    assert (spec.device, spec.batch_size, spec.score_voting, spec.preset) == ("cuda", 4, False, "mmdet")
