"""``paadet serve --ray``: the same app on a local Ray Serve instance with 2 CPU replicas.

A real server process on a free port of 127.0.0.1 (Ray Serve's HTTP proxy), a real HTTP client: parity
with ``paadet predict``, one replica SIGKILLed under a bounded concurrent load (every answer a 200 with
the right detections, or a 503), requests answered after Ray restarts the replica, and SIGTERM exits 0
with the Ray processes gone. Wide strips keep the network input small on a 2-core machine.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path

import cv2
import grpc  # noqa: F401 (Ray Serve's proxy needs it; `.[test]` installs ray[serve]: a missing one fails here)
import httpx
import pytest
import ray.serve  # noqa: F401
import torch
from test_serve import ServerProcess, as_predict_entries, assert_same_detections, predict_entries

from paadet.cli import main
from paadet.data.synthetic import synthetic_image
from paadet.model.seeded import seeded_state_dict

REPLICA_TITLE = "ray::ServeReplica:paadet:"
RECOVERY_TIMEOUT_S = 90


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("serve_ray")
    checkpoint = root / "seeded.pth"
    torch.save({"meta": {}, "state_dict": seeded_state_dict(2, cls_bias=-10.3)}, checkpoint)
    images = {}
    for name, (h, w), seed in (("strip.jpg", (40, 480), 2), ("wide.png", (32, 400), 3)):
        path = root / name
        cv2.imwrite(str(path), synthetic_image(h, w, seed=seed))
        images[name] = path
    return {"root": root, "checkpoint": checkpoint, "images": images}


@pytest.fixture(scope="module")
def predicted(files: dict) -> dict[str, list[tuple]]:
    """``paadet predict`` on the same files: sorted (category_id, xywh, score) by file name.

    On one torch thread, as each replica runs (Ray sets OMP_NUM_THREADS to a replica's --cpus-per-replica):
    CPU kernels sum in a thread-count-dependent order, so the floats are bit-identical only at the same count.
    """
    out = files["root"] / "predict.json"
    paths = [str(p) for p in files["images"].values()]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert (
            main(
                [
                    "predict",
                    *paths,
                    "--checkpoint",
                    str(files["checkpoint"]),
                    "--preset",
                    "mmdet",
                    "--output",
                    str(out),
                    "--no-progress",
                ]
            )
            == 0
        )
    finally:
        torch.set_num_threads(threads)
    by_file: dict[str, list[dict]] = {p: [] for p in paths}
    for entry in json.loads(out.read_text()):
        by_file[entry["file_name"]].append(entry)
    by_name = {Path(p).name: predict_entries(entries) for p, entries in by_file.items()}
    assert all(by_name.values()), "the seeded weights should give detections on every image"
    return by_name


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def replica_pids(server: ServerProcess) -> set[int]:
    """The Ray Serve replica processes of this server (the Ray instance is the server's own)."""
    return {pid for pid in descendants(server.proc.pid) if cmdline(pid).startswith(REPLICA_TITLE)}


def wait_for(predicate, timeout: float, what: str, server: ServerProcess) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert server.proc.poll() is None, f"server exited: {server.output()}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}: {server.output()}"
        time.sleep(0.25)


@pytest.fixture(scope="module")
def server(files: dict):
    srv = ServerProcess(
        [
            "--ray",
            "--replicas",
            "2",
            "--cpus-per-replica",
            "1",
            "--checkpoint",
            str(files["checkpoint"]),
            "--preset",
            "mmdet",
            "--device",
            "cpu",
            "--max-batch",
            "4",
            "--max-wait-ms",
            "20",
            "--max-queue",
            "16",
            "--timeout-s",
            "60",
        ],
        log=files["root"] / "server.log",
    )
    try:
        # /readyz answers as soon as one replica is up: wait for the CLI's line, printed once both are running
        wait_for(
            lambda: "2 replica(s) on Ray Serve" in srv.output() and len(replica_pids(srv)) == 2,
            120,
            "both replicas",
            srv,
        )
    except BaseException:
        srv.stop()
        raise
    yield srv
    if srv.proc.poll() is None:
        srv.stop()


def detect(url: str, path: Path, timeout: float = 60) -> httpx.Response:
    return httpx.post(url + "/v1/detect", content=path.read_bytes(), timeout=timeout)


def test_parity_with_predict(server: ServerProcess, files: dict, predicted: dict) -> None:
    for name, path in files["images"].items():
        r = detect(server.url, path)
        assert r.status_code == 200, r.text
        answer = r.json()
        h, w = cv2.imread(str(path)).shape[:2]
        assert (answer["width"], answer["height"]) == (w, h)
        assert_same_detections(as_predict_entries(answer), predicted[name], name)
    assert httpx.get(server.url + "/healthz", timeout=10).status_code == 200
    assert "paadet_batch_size" in httpx.get(server.url + "/metrics", timeout=10).text


def test_replica_killed_under_load(server: ServerProcess, files: dict, predicted: dict) -> None:
    names = list(files["images"])
    bodies = {name: files["images"][name].read_bytes() for name in names}
    before = replica_pids(server)
    assert len(before) == 2
    answers: list[tuple[str, int, str]] = []
    killed: list[int] = []

    async def client(http: httpx.AsyncClient, k: int, stop: asyncio.Event) -> None:
        i = k
        while not stop.is_set():
            name = names[i % len(names)]
            i += 1
            try:
                r = await http.post(server.url + "/v1/detect", content=bodies[name])
                answers.append((name, r.status_code, r.text))
            except httpx.HTTPError as exc:
                answers.append((name, -1, repr(exc)))

    async def load() -> None:
        stop = asyncio.Event()
        async with httpx.AsyncClient(timeout=60) as http:
            tasks = [asyncio.create_task(client(http, k, stop)) for k in range(4)]
            t0 = time.monotonic()
            while len(answers) < 6 and time.monotonic() - t0 < 60:  # the load is on both replicas
                await asyncio.sleep(0.1)
            victim = sorted(before)[0]
            os.kill(victim, signal.SIGKILL)
            killed.append(victim)
            at_kill = len(answers)
            # go on until Ray has a replacement replica up and a few more answers came back
            deadline = time.monotonic() + RECOVERY_TIMEOUT_S
            while time.monotonic() < deadline:
                now = replica_pids(server)
                if len(now) == 2 and now != before and len(answers) >= at_kill + 12:
                    break
                await asyncio.sleep(0.25)
            stop.set()
            await asyncio.gather(*tasks)

    asyncio.run(load())
    statuses = [status for _, status, _ in answers]
    print(
        f"replica {killed[0]} killed: {len(statuses)} answers, "
        f"{statuses.count(200)} x 200, {statuses.count(503)} x 503",
        sorted({text[:100] for _, status, text in answers if status != 200}),
    )
    assert set(statuses) <= {200, 503}, [(s, text[:200]) for _, s, text in answers if s not in (200, 503)]
    assert statuses.count(200) >= 12
    for name, status, text in answers:
        if status == 200:
            assert_same_detections(as_predict_entries(json.loads(text)), predicted[name], name)
        else:
            assert "error" in json.loads(text)
    now = replica_pids(server)
    assert killed[0] not in now

    # after recovery: two replicas again, and every request answered correctly
    wait_for(
        lambda: len(replica_pids(server)) == 2 and killed[0] not in replica_pids(server),
        RECOVERY_TIMEOUT_S,
        "a replacement replica",
        server,
    )
    for k in range(6):
        name = names[k % len(names)]
        r = detect(server.url, files["images"][name])
        assert r.status_code == 200, r.text
        assert_same_detections(as_predict_entries(r.json()), predicted[name], name)


def test_sigterm_stops_cleanly(server: ServerProcess) -> None:
    ray_processes = descendants(server.proc.pid)
    assert ray_processes
    assert server.stop(timeout=60) == 0, server.output()
    deadline = time.monotonic() + 30
    while any(cmdline(pid) for pid in ray_processes if os.path.exists(f"/proc/{pid}")) and time.monotonic() < deadline:
        time.sleep(0.25)
    left = [(pid, cmdline(pid)[:80]) for pid in ray_processes if os.path.exists(f"/proc/{pid}") and cmdline(pid)]
    assert not left, left
    with pytest.raises(httpx.HTTPError):
        httpx.get(server.url + "/healthz", timeout=3)


def test_lost_replica_middleware_answers_503_only_when_nothing_was_sent() -> None:
    """The proxy middleware alone, around a raw ASGI app as Ray's proxy is: a request that ended before its
    response (raised, or returned without one) is a JSON 503 with Retry-After; a started response passes."""
    from starlette.responses import JSONResponse

    from paadet.serve.ray_serve import LostReplicaAs503

    async def proxy_like(scope, receive, send):
        if scope["path"] == "/dies":
            raise RuntimeError("ActorDiedError stand-in")
        if scope["path"] == "/nothing":
            return
        status = 500 if scope["path"] == "/500" else 200
        await JSONResponse({"status": status}, status_code=status)(scope, receive, send)

    async def check() -> None:
        transport = httpx.ASGITransport(app=LostReplicaAs503(proxy_like), raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            for path in ("/dies", "/nothing"):
                r = await http.get(path)
                assert r.status_code == 503 and r.headers["retry-after"] == "1" and "error" in r.json(), path
            r = await http.get("/500")
            assert r.status_code == 500 and r.json() == {"status": 500}
            r = await http.get("/ok")
            assert r.status_code == 200 and r.json() == {"status": 200}

    asyncio.run(check())
