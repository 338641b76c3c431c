"""``paadet batch`` fed bad input on purpose (issue 10): outputs checked before any work, no hang on a cluster
without the resources a worker needs, bad folder entries and bad images reported and skipped, replaced
weights refused, flags validated, the default shard size. Ray tests share one local instance (2 CPUs)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import cv2
import pytest
import ray
import torch
from fixtures import RAY_NO_METRICS

import paadet.checkpoint
from paadet import DetectorSpec, cli
from paadet.batch import BatchError, OutputFolder, expand_inputs, read_path_list, read_results, run_batch
from paadet.data.synthetic import synthetic_image
from paadet.model.seeded import seeded_state_dict
from paadet.preprocess import Preset

TINY = Preset("tiny", (128, 128), size_divisor=None, fixed_size=(128, 128))
SIZES = [(100, 140), (128, 96), (90, 200), (150, 150), (64, 120), (200, 130)]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A checkpoint of seeded weights and a folder of 6 small images."""
    root = tmp_path_factory.mktemp("robust")
    checkpoint = root / "seeded.pth"
    torch.save({"state_dict": seeded_state_dict(0)}, checkpoint)
    folder = root / "photos"
    folder.mkdir()
    for i, (h, w) in enumerate(SIZES):
        cv2.imwrite(str(folder / f"img{i}.png"), synthetic_image(h, w, seed=i))
    return {
        "root": root,
        "folder": folder,
        "checkpoint": checkpoint,
        "spec": DetectorSpec(checkpoint=str(checkpoint), preset=TINY, workers=1),
    }


@pytest.fixture(scope="module")
def ray_local():
    """One local Ray instance for the module: 2 CPUs, no GPU, no dashboard."""
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, logging_level="ERROR", _system_config=RAY_NO_METRICS)
    yield ray
    ray.shutdown()


@pytest.fixture
def no_ray_start(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if Ray would be started or joined."""

    def refuse(*args, **kwargs):
        raise AssertionError("Ray was started: the check did not come before the work")

    monkeypatch.setattr(ray, "init", refuse)


def run_cli(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, list[str]]:
    """``paadet ARGV`` in this process: exit status and stderr lines."""
    try:
        rc = cli.main(argv)
    except SystemExit as exc:  # argparse
        rc = exc.code
    return rc, capsys.readouterr().err.strip().splitlines()


# --- item 2: output paths checked before any work ---------------------------------------------------------


def test_bad_output_paths_fail_at_once_before_ray(
    data: dict, tmp_path: Path, no_ray_start, capsys, monkeypatch
) -> None:
    folder, image = data["folder"], data["folder"] / "img0.png"
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    listing = tmp_path / "list.txt"
    listing.write_text(f"{image}\n")
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == locked else real_access(p, mode, **kw))

    def no_model(*args, **kwargs):
        raise AssertionError("the checkpoint was read: the output check did not come before the work")

    monkeypatch.setattr(paadet.checkpoint, "load_checkpoint", no_model)  # and no_ray_start: no Ray either
    cases = [
        ([str(folder), "-o", str(a_file)], "must be a folder, but this is a file"),
        ([str(folder), "-o", str(a_file / "out")], "is a file, not a folder"),
        ([str(folder), "-o", str(locked / "out")], "is not writable"),
        ([str(folder), "-o", str(folder)], "is one of the inputs"),
        ([str(folder), "-o", str(tmp_path / "out"), "--coco", str(image)], "one of the inputs"),
        ([str(listing), "-o", str(tmp_path / "out"), "--coco", str(listing)], "one of the inputs"),
        ([str(folder), "-o", str(tmp_path / "out"), "--coco", str(tmp_path)], "must be a file, but this is a folder"),
        ([str(folder), "-o", str(tmp_path / "out"), "--coco", str(a_file / "r.json")], "is a file, not a folder"),
    ]
    for argv, expected in cases:
        rc, err = run_cli(["batch", *argv, "--checkpoint", str(data["checkpoint"]), "--no-progress"], capsys)
        assert rc == 2, (argv, err)
        assert len(err) == 1 and err[0].startswith("paadet batch: error: ") and expected in err[0], (argv, err)
    assert a_file.read_text() == "x" and image.is_file() and not (folder / "shards").exists()
    # the API checks the same, before Ray
    with pytest.raises(Exception, match="must be a folder"):
        run_batch([folder], a_file, data["spec"], progress=False)
    with pytest.raises(Exception, match=re.escape("--coco would overwrite the output folder's own summary.json")):
        run_batch(
            [folder], tmp_path / "out", data["spec"], coco_output=tmp_path / "out" / "summary.json", progress=False
        )


# --- item 9: flags and lists ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flag, value",
    [
        ("--cpus-per-worker", "0"),
        ("--cpus-per-worker", "-1"),
        ("--cpus-per-worker", "nan"),
        ("--num-workers", "0"),
        ("--num-workers", "-2"),
        ("--shard-size", "0"),
        ("--max-attempts", "0"),
        ("--gpus-per-worker", "-1"),
        ("--gpus-per-worker", "1.5"),
        ("--start-timeout", "0"),
    ],
)
def test_bad_numeric_flags_are_refused_by_argparse(flag: str, value: str, tmp_path: Path, no_ray_start, capsys) -> None:
    rc, err = run_cli(["batch", str(tmp_path), "-o", str(tmp_path / "out"), flag, value], capsys)
    assert rc == 2
    assert f"argument {flag}" in err[-1] and value in err[-1], err
    assert not (tmp_path / "out").exists()


def test_run_batch_checks_its_settings(data: dict, tmp_path: Path, no_ray_start) -> None:
    for kwargs, flag in [
        ({"cpus_per_worker": 0}, "--cpus-per-worker"),
        ({"num_workers": 0}, "--num-workers"),
        ({"num_workers": -1}, "--num-workers"),
        ({"shard_size": 0}, "--shard-size"),
        ({"max_attempts": 0}, "--max-attempts"),
        ({"gpus_per_worker": -1.0}, "--gpus-per-worker"),
        ({"start_timeout": 0}, "--start-timeout"),
    ]:
        with pytest.raises(ValueError, match=flag):
            run_batch([data["folder"]], tmp_path / "out", data["spec"], progress=False, **kwargs)


def test_list_comments_and_hash_in_names(tmp_path: Path) -> None:
    listing = tmp_path / "list.txt"
    listing.write_text(
        "# a comment line\n"
        "a.jpg  # the cat\n"
        "  b.jpg\t# tab before the hash\n"
        "shot#2.jpg\n"
        "./#hash-first.jpg\n"
        "   # indented comment\n"
        "dir with space/c.jpg\n"
        "\n"
    )
    names = [s.file_name for s in read_path_list(listing)]
    assert names == ["a.jpg", "b.jpg", "shot#2.jpg", "./#hash-first.jpg", "dir with space/c.jpg"]
    assert next(s.path for s in read_path_list(listing)) == tmp_path / "a.jpg"
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(BatchError, match=r"binary.txt: not a UTF-8 text file"):
        expand_inputs([binary])


def test_command_line_defaults() -> None:
    from paadet.batch import DEFAULT_START_TIMEOUT
    from paadet.commands import batch as batch_command

    args = cli.build_parser().parse_args(["batch", "in", "-o", "out"])
    assert (args.shard_size, args.start_timeout, args.num_workers) == (None, DEFAULT_START_TIMEOUT, None)
    assert batch_command.DEFAULT_START_TIMEOUT == DEFAULT_START_TIMEOUT


# --- item 8: resume keys on the weights' contents -------------------------------------------------------


def test_replaced_checkpoint_is_refused(data: dict, tmp_path: Path, no_ray_start) -> None:
    checkpoint = tmp_path / "model.pth"
    torch.save({"state_dict": seeded_state_dict(0)}, checkpoint)
    spec = DetectorSpec(checkpoint=str(checkpoint), preset=TINY, workers=1)
    empty = tmp_path / "none.txt"  # no inputs: the run records its model and weights, and starts no Ray
    empty.write_text("")
    out = tmp_path / "out"
    run_batch([empty], out, spec, progress=False)
    checkpoint.write_bytes(checkpoint.read_bytes())  # rewritten, same contents: the same run
    run_batch([empty], out, spec, progress=False)
    recorded = json.loads((out / "run.json").read_text())
    torch.save({"state_dict": seeded_state_dict(1)}, checkpoint)  # other weights at the same path
    with pytest.raises(
        BatchError, match=re.escape(f"{out} holds another model's results: {checkpoint} has changed")
    ) as info:
        run_batch([empty], out, spec, progress=False)
    assert "\n" not in str(info.value)
    recorded = recorded["weights"]
    assert recorded["file"] == str(checkpoint) and len(recorded["sha256"]) == 64
    # a folder from before weights were recorded takes them on, then holds to them
    old = tmp_path / "old"
    old.mkdir()
    (old / "run.json").write_text(json.dumps({"format": "paadet-batch/1", "model": spec.fingerprint()}))
    run_batch([empty], old, spec, progress=False)
    assert json.loads((old / "run.json").read_text())["weights"]["sha256"] != recorded["sha256"]


def test_replaced_onnx_model_is_refused(tmp_path: Path) -> None:
    from paadet.batch import weights_identity

    model = tmp_path / "paa.onnx"
    model.write_bytes(b"graph one")
    spec = DetectorSpec(backend="onnxruntime", model=str(model))
    folder = OutputFolder(tmp_path / "out")
    folder.root.mkdir()
    folder.check_run(spec.fingerprint(), weights_identity(spec))
    model.write_bytes(b"graph two")
    with pytest.raises(BatchError, match=r"holds another model's results: .*paa\.onnx has changed"):
        folder.check_run(spec.fingerprint(), weights_identity(spec))
    with pytest.raises(BatchError, match=re.escape("missing.onnx: --model file not found")):
        weights_identity(DetectorSpec(backend="onnxruntime", model=str(tmp_path / "missing.onnx")))
    assert weights_identity(DetectorSpec()) is None  # the official checkpoint: its name carries its hash


def test_worker_refuses_weights_replaced_during_a_run(data: dict, tmp_path: Path) -> None:
    from paadet.batch import ShardWorker
    from paadet.checkpoint import sha256_file

    copy = tmp_path / "copy.pth"  # another copy of the same bytes (a node's own disk): newer time, same hash
    copy.write_bytes(data["checkpoint"].read_bytes())
    info = data["checkpoint"].stat()
    spec = DetectorSpec(checkpoint=str(copy), preset=TINY, workers=1)
    ShardWorker(0, spec, 1, (info.st_size, info.st_mtime_ns, sha256_file(copy))).ready()
    torch.save({"state_dict": seeded_state_dict(1)}, copy)  # replaced after the driver hashed it
    with pytest.raises(
        BatchError, match=re.escape("copy.pth: --checkpoint on this node is not the file this run started with")
    ):
        ShardWorker(0, spec, 1, (info.st_size, info.st_mtime_ns, sha256_file(data["checkpoint"]))).ready()


# --- a bad item never aborts the batch ------------------------------------------------------------------


def test_worker_isolates_an_image_the_network_cannot_take(data: dict) -> None:
    from paadet.batch import ShardWorker

    worker = ShardWorker(0, data["spec"], threads=1)
    worker.ready()
    infer = worker.detector.backend.infer

    def fails_on_a_200_wide_image(images, metas, timer=None):
        if any(m.ori_shape[1] == 200 for m in metas):
            raise RuntimeError("the network cannot take\nthis image")
        return infer(images, metas, timer)

    worker.detector.backend.infer = fails_on_a_200_wide_image
    names = ["img0.png", "img2.png", "img3.png"]  # img2 is 90x200
    items = [(str(data["folder"] / n), n) for n in names]
    outcome = worker.process(7, items)
    assert [r["file_name"] for r in outcome["records"]] == ["img0.png", "img3.png"]
    assert [(e["file_name"], e["error"]) for e in outcome["errors"]] == [
        ("img2.png", "detection failed on img2.png: RuntimeError: the network cannot take this image")
    ]
    with pytest.raises(RuntimeError, match="cannot take"):  # nothing works: a broken worker, not a bad image
        worker.process(8, items[1:2])
    # an entry the listing could not read comes with its reason, and is reported as such
    outcome = worker.process(9, [items[0], (str(data["folder"] / "sub"), "sub/", "cannot list folder sub: x")])
    assert [e["error"] for e in outcome["errors"]] == ["cannot list folder sub: x"] and len(outcome["records"]) == 1


def test_a_bad_shard_is_split_until_the_bad_image_is_alone() -> None:
    from paadet.batch import ShardQueue

    items = [(f"/p/{i}.jpg", f"{i}.jpg") for i in range(8)]
    queue = ShardQueue({10: items[:5], 11: items[5:]}, max_attempts=3)
    done, given_up, dropped, turn = [], [], [], 0
    while queue:
        shard = queue.pop()
        worker = turn % 2
        turn += 1
        if ("/p/3.jpg", "3.jpg") in queue.items[shard]:  # kills its worker, whichever it is
            decision = queue.failed(shard, worker)
            if decision.action == "give_up":
                given_up += queue.items[shard]
            dropped += [worker] if decision.drop_worker else []
        else:
            queue.succeeded(shard, worker)
            done += queue.items[shard]
    assert given_up == [("/p/3.jpg", "3.jpg")] and sorted(done) == sorted(set(items) - set(given_up))
    assert dropped == [], "one bad image must not drop a worker"
    assert min(queue.items) == 10 and len(set(queue.items)) == len(queue.items)
    # a worker that fails on different shards in a row is dropped
    queue = ShardQueue({0: items[:1], 1: items[1:2], 2: items[2:3]}, max_attempts=3)
    assert [queue.failed(shard, "w").drop_worker for shard in (0, 1, 0, 2)] == [False, False, False, True]
    queue.succeeded(0, "w")
    assert not queue.failed(1, "w").drop_worker, "a success ends the streak"


# --- item 3: no hang without the resources a worker needs --------------------------------------------------


class FakeRay:
    def __init__(self, nodes: list[dict[str, float]]) -> None:
        self._nodes = nodes

    def nodes(self):
        return [{"Alive": True, "Resources": r} for r in self._nodes]

    def cluster_resources(self):
        total: dict[str, float] = {}
        for r in self._nodes:
            for k, v in r.items():
                total[k] = total.get(k, 0.0) + v
        return total


def test_cluster_capacity_names_what_is_missing() -> None:
    from paadet.batch import cluster_capacity

    two_cpus = FakeRay([{"CPU": 2.0}])
    assert cluster_capacity(two_cpus, 1.0, 0.0) == 2
    with pytest.raises(
        BatchError,
        match=r"lacks GPUs: each worker needs 1 GPU .* it has 2 CPUs and no GPU on 1 node; "
        r"use --device cpu",
    ):
        cluster_capacity(two_cpus, 1.0, 1.0)
    with pytest.raises(
        BatchError, match=r"lacks CPUs: each worker needs 4 CPUs on one node .* 4 CPUs and no GPU on 2 nodes"
    ):
        cluster_capacity(FakeRay([{"CPU": 2.0}, {"CPU": 2.0}]), 4.0, 0.0)
    gpus = FakeRay([{"CPU": 8.0, "GPU": 2.0}, {"CPU": 2.0, "GPU": 4.0}])
    assert cluster_capacity(gpus, 1.0, 1.0) == 4  # 2 + min(2 CPUs, 4 GPUs)
    assert cluster_capacity(gpus, 1.0, 0.5) == 6
    with pytest.raises(BatchError, match="lower --gpus-per-worker"):
        cluster_capacity(FakeRay([{"CPU": 8.0, "GPU": 1.0}]), 1.0, 2.0)


def test_cuda_on_a_cluster_without_gpus_exits_at_once(ray_local, data: dict, tmp_path: Path) -> None:
    """``paadet batch photos/ --device cuda --output-dir out`` on this CPU-only cluster: one line, exit 2."""
    address = ray.get_runtime_context().gcs_address
    start = time.monotonic()
    try:
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "paadet.cli",
                "batch",
                str(data["folder"]),
                "--device",
                "cuda",
                "--output-dir",
                str(tmp_path / "out"),
                "--ray",
                address,
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("paadet batch --device cuda waited more than 60 s on a cluster without GPUs")
    seconds = time.monotonic() - start
    errors = [line for line in proc.stderr.splitlines() if line.startswith("paadet batch")]
    assert proc.returncode == 2, proc.stderr
    assert errors == [proc.stderr.strip().splitlines()[-1]] and "lacks GPUs" in errors[0] and "no GPU" in errors[0], (
        proc.stderr
    )
    assert seconds < 60
    print(f"--device cuda without GPUs: exit {proc.returncode} after {seconds:.1f} s: {errors[0]}")


def test_busy_cluster_gives_up_after_start_timeout(ray_local, data: dict, tmp_path: Path) -> None:
    @ray.remote(num_cpus=2)
    class Hog:
        def ping(self) -> int:
            return 1

    hog = Hog.remote()
    ray.get(hog.ping.remote())
    try:
        start = time.monotonic()
        with pytest.raises(
            BatchError,
            match=r"no worker started within --start-timeout 2 s: each needs 1 CPU on one node "
            r"and the Ray cluster has 0 CPUs and no GPU free of 2 CPUs",
        ):
            run_batch([data["folder"]], tmp_path / "out", data["spec"], num_workers=1, start_timeout=2, progress=False)
        assert time.monotonic() - start < 30
    finally:
        ray.kill(hog)


def test_workers_not_started_by_the_deadline_are_dropped(ray_local, data: dict, tmp_path: Path, capsys) -> None:
    @ray.remote(num_cpus=1)
    class Hog:
        def ping(self) -> int:
            return 1

    hog = Hog.remote()
    ray.get(hog.ping.remote())
    try:
        summary = run_batch(
            [data["folder"]], tmp_path / "out", data["spec"], num_workers=2, start_timeout=10, progress=False
        )
    finally:
        ray.kill(hog)
    assert "1 of 2 workers did not start within --start-timeout 10 s" in capsys.readouterr().err
    assert (summary.processed, summary.failed, len(summary.workers)) == (6, 0, 1)


# --- item 12: the default shard size leaves no worker idle ---------------------------------------------


def test_default_shard_size() -> None:
    from paadet.batch import default_shard_size

    assert default_shard_size(6, 2) == 1 and default_shard_size(10, 2) == 2 and default_shard_size(100, 2) == 13
    assert default_shard_size(10_000, 8) == 64 and default_shard_size(1, 8) == 1 and default_shard_size(0, 1) == 1


def test_small_input_keeps_every_worker_busy(ray_local, data: dict, tmp_path: Path) -> None:
    summary = run_batch([data["folder"]], tmp_path / "out", data["spec"], num_workers=2, progress=False)
    assert [w.images > 0 for w in summary.workers] == [True, True], summary.lines()
    assert summary.processed == 6 and summary.shard_size == 1


# --- item 4: a bad entry in a folder is reported and skipped ----------------------------------------------


def test_unlistable_subfolder_and_symlink_loop_are_reported(ray_local, data: dict, tmp_path: Path, monkeypatch) -> None:
    folder = tmp_path / "photos"
    (folder / "locked").mkdir(parents=True)
    for name in ("img0.png", "img1.png"):
        (folder / name).write_bytes((data["folder"] / name).read_bytes())
    (folder / "locked" / "hidden.png").write_bytes((data["folder"] / "img2.png").read_bytes())
    os.symlink("loop.jpg", folder / "loop.jpg")  # a symlink to itself
    locked = str(folder / "locked")
    real_scandir = os.scandir

    def scandir(path="."):  # root reads any folder: make this one unreadable the way chmod 000 would
        if os.fspath(path) == locked:
            raise PermissionError(13, "Permission denied", locked)
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    out = tmp_path / "out"
    summary = run_batch([folder], out, data["spec"], num_workers=1, progress=False)
    errors = {e["file_name"]: e["error"] for e in map(json.loads, (out / "errors.jsonl").read_text().splitlines())}
    assert sorted(errors) == ["locked/", "loop.jpg"], errors
    assert "Permission denied" in errors["locked/"] and "symbolic links" in errors["loop.jpg"]
    assert (summary.processed, summary.detected, summary.errors, summary.failed) == (4, 2, 2, 0)
    assert sorted(Path(p).name for p in read_results(out)) == ["img0.png", "img1.png"]


def test_the_local_ray_instance_starts_without_rays_token_notice() -> None:
    """Ray logs a notice about its default token authentication on every local start; paadet's own local
    instance needs nothing from the user there, so the notice is not printed."""
    script = "import ray\nfrom paadet.batch.cluster import connect\nassert connect(ray, None)\nray.shutdown()\n"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "token authentication" not in (done.stdout + done.stderr).lower(), done.stderr[-2000:]
