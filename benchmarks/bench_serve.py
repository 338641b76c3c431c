"""Load-test ``paadet serve`` against offline ``paadet predict`` on the same images, in one run.

1. offline: a :class:`Detector` (same backend, preset, batch size) over the images, images/s;
2. a ``paadet serve`` process on a free port of 127.0.0.1; a bounded asyncio ``httpx`` load at each
   concurrency (default 1, 4, 16) for ``--duration`` s: requests/s, p50/p90/p99 latency, batch sizes seen;
3. an overload: twice the concurrency the queue admits (``2 * (max_queue + max_batch)`` clients) for
   ``--overload-duration`` s: statuses (only 200 and 503 are acceptable), the server's resident memory
   before, at steady state and after.

``--slow-clients`` measures slow clients instead (no offline run, no levels, no overload): the load at
``--slow-concurrency`` for ``--duration`` s without, then with ``2 * max_queue`` slow senders open (half send
their body, half their headers, one byte a second, reconnecting whenever the server closes them): the share
of requests answered 200 and their latency, both in the same run.

Examples (seeded weights, small images, quick runs)::

    python benchmarks/bench_serve.py --duration 10 --overload-duration 30 --output serve_bench.json
    python benchmarks/bench_serve.py --slow-clients --duration 30 --output serve_slow.json
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def make_images(folder: Path, count: int, height: int, width: int) -> list[Path]:
    from paadet.data.synthetic import synthetic_image

    paths = []
    for i in range(count):
        path = folder / f"img_{i}.png"
        cv2.imwrite(str(path), synthetic_image(height, width, seed=i))
        paths.append(path)
    return paths


def offline(checkpoint: str, preset: str, batch: int, paths: list[Path], seconds: float) -> dict:
    """``paadet predict``'s path (decode + resize threads, batches by padded shape) for about ``seconds``."""
    from paadet.data.pipeline import iter_loaded
    from paadet.detector import Detector

    det = Detector.from_checkpoint(checkpoint, preset=preset, batch_size=batch, workers=2)
    for _ in det.run(iter_loaded(paths[:1], det.preset, 0)):  # warm-up
        pass
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        for _item, _result in det.run(iter_loaded(paths, det.preset, det.workers)):
            done += 1
    elapsed = time.perf_counter() - started
    return {"images": done, "seconds": round(elapsed, 2), "images_per_s": round(done / elapsed, 3)}


async def load(url: str, bodies: list[bytes], concurrency: int, seconds: float) -> dict:
    import httpx

    latencies: list[float] = []
    statuses: collections.Counter = collections.Counter()
    batches: collections.Counter = collections.Counter()
    deadline = time.perf_counter() + seconds

    async def client_loop(client, k: int) -> None:
        i = k
        while time.perf_counter() < deadline:
            body = bodies[i % len(bodies)]
            i += concurrency
            start = time.perf_counter()
            try:
                r = await client.post(url + "/v1/detect", content=body)
                statuses[r.status_code] += 1
                if r.status_code == 200:
                    latencies.append(time.perf_counter() - start)
                    batches[int(r.headers.get("x-batch-size", 0))] += 1
                elif r.status_code == 503:
                    await asyncio.sleep(float(r.headers.get("retry-after", 1)) * 0.1)  # a polite but eager client
            except httpx.HTTPError as exc:
                statuses[type(exc).__name__] += 1

    started = time.perf_counter()
    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=concurrency + 4)) as client:
        await asyncio.gather(*(client_loop(client, k) for k in range(concurrency)))
    elapsed = time.perf_counter() - started
    lat = np.array(latencies) * 1000.0 if latencies else np.array([np.nan])
    return {
        "concurrency": concurrency,
        "seconds": round(elapsed, 2),
        "ok": statuses.get(200, 0),
        "images_per_s": round(statuses.get(200, 0) / elapsed, 3),
        "p50_ms": round(float(np.percentile(lat, 50)), 1),
        "p90_ms": round(float(np.percentile(lat, 90)), 1),
        "p99_ms": round(float(np.percentile(lat, 99)), 1),
        "statuses": {str(k): v for k, v in sorted(statuses.items(), key=str)},
        "batch_sizes": {str(k): v for k, v in sorted(batches.items())},
    }


async def slow_sender(port: int, head: bytes, trickle: bytes, stop: asyncio.Event, answers: collections.Counter):
    """Send ``head``, then ``trickle`` one byte a second; reconnect whenever the server closes the connection."""
    while not stop.is_set():
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError as exc:
            answers[type(exc).__name__] += 1
            await asyncio.sleep(1)
            continue
        read = asyncio.ensure_future(reader.read(64))
        try:
            writer.write(head)
            for byte in trickle:
                if stop.is_set() or read.done():
                    break
                writer.write(bytes([byte]))
                await writer.drain()
                await asyncio.wait([read], timeout=1.0)
            if read.done():
                answer = read.result()
                answers[answer.split(b" ", 2)[1].decode() if answer.startswith(b"HTTP/") else "closed"] += 1
        except (ConnectionError, OSError) as exc:
            answers[type(exc).__name__] += 1
        finally:
            read.cancel()
            writer.close()


async def slow_client_trial(url: str, port: int, bodies: list[bytes], senders: int, concurrency: int, seconds: float):
    """The load at ``concurrency`` for ``seconds`` without, then with ``senders`` slow senders open."""
    without = await load(url, bodies, concurrency, seconds)
    stop, answers = asyncio.Event(), collections.Counter()
    body_head = b"POST /v1/detect HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n"
    header_head = b"POST /v1/detect HTTP/1.1\r\nHost: x\r\n"
    tasks = [
        asyncio.ensure_future(
            slow_sender(port, body_head if k % 2 == 0 else header_head, b"x" * 100_000, stop, answers)
        )
        for k in range(senders)
    ]
    await asyncio.sleep(2)  # the slow senders are connected and in the middle of their requests
    with_slow = await load(url, bodies, concurrency, seconds)
    stop.set()
    await asyncio.gather(*tasks)
    result = {"slow_senders": senders, "without": without, "with": with_slow}
    for level in (without, with_slow):
        answered = sum(level["statuses"].values())
        level["share_200"] = round(level["ok"] / answered, 4) if answered else 0.0
    result["slow_senders_answered"] = dict(answers)
    return result


def levels_and_overload(url: str, bodies: list[bytes], args: argparse.Namespace, report: dict, pid: int) -> None:
    """Each concurrency level, then the overload, into ``report``."""
    report["levels"] = []
    for c in (int(v) for v in args.concurrency.split(",")):
        level = asyncio.run(load(url, bodies, c, args.duration))
        level["vs_offline"] = round(level["images_per_s"] / report["offline"]["images_per_s"], 3)
        report["levels"].append(level)
        print("serve:", level, flush=True)
    report["rss_mib_steady"] = round(rss_mib(pid), 1)
    over_c = 2 * (args.max_queue + args.max_batch)
    over = asyncio.run(load(url, bodies, over_c, args.overload_duration))
    over["rss_mib_after"] = round(rss_mib(pid), 1)
    over["rss_vs_steady"] = round(over["rss_mib_after"] / report["rss_mib_steady"], 3)
    over["only_200_and_503"] = set(over["statuses"]) <= {"200", "503"}
    report["overload"] = over
    print("overload:", over, flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=None, help="weights (default: seeded test weights)")
    p.add_argument("--preset", default="mmdet")
    p.add_argument("--images", type=int, default=8, help="generated images")
    p.add_argument("--size", default="40x480", help="generated image size HxW (default 40x480)")
    p.add_argument("--max-batch", type=int, default=4)
    p.add_argument("--max-queue", type=int, default=16)
    p.add_argument("--max-wait-ms", type=float, default=10)
    p.add_argument("--concurrency", default="1,4,16")
    p.add_argument("--duration", type=float, default=20, help="seconds per concurrency level")
    p.add_argument("--overload-duration", type=float, default=30)
    p.add_argument("--slow-clients", action="store_true", help="measure 2 x --max-queue slow senders instead")
    p.add_argument("--slow-concurrency", type=int, default=4, help="normal clients in --slow-clients (default 4)")
    p.add_argument("--read-timeout-s", type=float, default=None, help="the server's (default: its own default)")
    p.add_argument("--output", default=None, help="write the figures as JSON here")
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        checkpoint = args.checkpoint
        if checkpoint is None:
            import torch

            from paadet.model.seeded import seeded_state_dict

            checkpoint = str(tmp_path / "seeded.pth")
            torch.save({"meta": {}, "state_dict": seeded_state_dict(2, cls_bias=-10.3)}, checkpoint)
        h, w = (int(v) for v in args.size.split("x"))
        paths = make_images(tmp_path, args.images, h, w)
        bodies = [p.read_bytes() for p in paths]
        report: dict = {"settings": {k: v for k, v in vars(args).items() if k != "output"}}
        if not args.slow_clients:
            report["offline"] = offline(checkpoint, args.preset, args.max_batch, paths, args.duration)
            print("offline predict:", report["offline"], flush=True)

        port = free_port()
        url = f"http://127.0.0.1:{port}"
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "paadet",
                "serve",
                "--checkpoint",
                checkpoint,
                "--preset",
                args.preset,
                "--port",
                str(port),
                "--max-batch",
                str(args.max_batch),
                "--max-queue",
                str(args.max_queue),
                "--max-wait-ms",
                str(args.max_wait_ms),
                "--log-level",
                "warning",
                *(["--read-timeout-s", str(args.read_timeout_s)] if args.read_timeout_s is not None else []),
            ]
        )
        try:
            import httpx

            deadline = time.monotonic() + 180
            while True:
                if proc.poll() is not None:
                    raise SystemExit(f"server exited with {proc.returncode}")
                try:
                    if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise SystemExit("server not ready in 180 s")
                time.sleep(0.25)
            report["rss_mib_ready"] = round(rss_mib(proc.pid), 1)
            if args.slow_clients:
                trial = slow_client_trial(url, port, bodies, 2 * args.max_queue, args.slow_concurrency, args.duration)
                report["slow_clients"] = asyncio.run(trial)
                print("slow clients:", report["slow_clients"], flush=True)
            else:
                levels_and_overload(url, bodies, args, report, proc.pid)
            report["server_alive_after"] = httpx.get(url + "/healthz", timeout=10).status_code == 200
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                report["exit_code"] = proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                report["exit_code"] = "killed"
    print(json.dumps(report, indent=1))
    if args.output:
        Path(args.output).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
