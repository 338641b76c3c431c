"""Inference on a CPU that another process is using: images/s of each backend alone and beside one competitor.

A user's CPU is rarely idle (a CI runner, a laptop with a browser open, a Kubernetes node). This benchmark runs
``Detector.predict`` on one image at a time (seeded weights, ``--scale`` preset, synthetic images) for
``--seconds``, in a fresh process per figure, first with the machine to itself and then beside one competing
process (``--competitor``: ``spin``, a single-threaded Python busy loop; or ``torch``, a single-threaded
matrix-multiply loop), ``--rounds`` times alternating, and reports the median milliseconds per image of each and
their ratio (loaded / alone).

Modes (``--modes``):

* ``torch``: the torch backend as ``paadet``'s commands run it: :func:`paadet.cpu.choose_openmp_wait_policy` looks
  at the load when the process starts, before torch loads (passive when other processes keep half a core busy);
* ``torch-spin``: GNU OpenMP's default waiting policy whatever the load (a thread that reaches the end of a
  parallel region spins before it sleeps), as paadet ran before it chose;
* ``torch-passive``: ``OMP_WAIT_POLICY=PASSIVE`` whatever the load (waiting threads sleep at once);
* ``torch-1-thread``: the torch backend with ``OMP_NUM_THREADS=1``;
* ``onnxruntime``: the exported graph (exported once at the start) on ONNX Runtime.

Example::

    python benchmarks/bench_busy_cpu.py --seconds 15 --rounds 2 --json /tmp/busy.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODES = ("torch", "torch-spin", "torch-passive", "torch-1-thread", "onnxruntime")
COMPETITORS = {
    "spin": "while True: pass",
    "torch": ("import torch\ntorch.set_num_threads(1)\na = torch.randn(256, 256)\nwhile True:\n    a = (a @ a).tanh()"),
}


def worker(mode: str, folder: Path, seconds: float) -> dict:
    """Time ``Detector.predict`` on one image at a time for ``seconds`` in this process; ms per image."""
    if mode == "torch":
        from paadet.cpu import choose_openmp_wait_policy

        choose_openmp_wait_policy()  # as the command line does, before torch loads
    from paadet.data.synthetic import synthetic_image
    from paadet.detector import Detector
    from paadet.runtime.spec import DetectorSpec

    if mode == "onnxruntime":
        spec = DetectorSpec(backend="onnxruntime", model=str(folder / "paa.onnx"), batch_size=1)
    else:
        spec = DetectorSpec(checkpoint=str(folder / "seeded.pth"), batch_size=1)
    detector = Detector.from_spec(spec)
    size = detector.preset.scale[0]
    images = [synthetic_image(size, size, seed=i) for i in range(8)]
    detector.predict(images[:1])  # warm-up
    times: list[float] = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(times) < 5:
        start = time.perf_counter()
        detector.predict([images[len(times) % len(images)]])
        times.append(time.perf_counter() - start)
    import torch

    return {
        "images": len(times),
        "median_ms": round(1000 * statistics.median(times), 1),
        "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
    }


def run_worker(mode: str, folder: Path, seconds: float, competitor: str | None) -> dict:
    """One figure in a fresh process, with ``competitor`` (a key of :data:`COMPETITORS`) running beside it."""
    env = dict(os.environ)
    if mode in ("torch", "torch-spin"):
        env.pop("OMP_WAIT_POLICY", None)
    if mode == "torch-passive":
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    if mode == "torch-1-thread":
        env["OMP_NUM_THREADS"] = "1"
    rival = None
    if competitor is not None:
        rival = subprocess.Popen([sys.executable, "-c", COMPETITORS[competitor]])
        time.sleep(0.5)  # running before the measured process starts, as a job already on the machine
    try:
        cmd = [sys.executable, __file__, "--worker", mode, "--folder", str(folder), "--seconds", str(seconds)]
        out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    finally:
        if rival is not None:
            rival.kill()
            rival.wait()
    return json.loads(out.strip().splitlines()[-1])


def prepare(folder: Path, scale: int, need_graph: bool) -> None:
    """Seeded weights at a ``scale`` x ``scale`` preset, and their export when ONNX Runtime is measured."""
    import torch

    from paadet.model.seeded import seeded_state_dict

    preset = {"name": "busy", "scale": [scale, scale], "size_divisor": 32}
    torch.save({"meta": {"preset": preset}, "state_dict": seeded_state_dict(0, cls_bias=-4.0)}, folder / "seeded.pth")
    if need_graph:
        cmd = [sys.executable, "-m", "paadet", "export", "--checkpoint", str(folder / "seeded.pth")]
        cmd += ["--output", str(folder / "paa.onnx"), "--batch-size", "1"]
        subprocess.run(cmd, check=True, capture_output=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}")
    parser.add_argument("--competitor", choices=sorted(COMPETITORS), default="spin")
    parser.add_argument("--seconds", type=float, default=15.0, help="timed seconds per figure (default: 15)")
    parser.add_argument("--rounds", type=int, default=2, help="alone/loaded alternations per mode (default: 2)")
    parser.add_argument("--scale", type=int, default=160, help="square preset in pixels (default: 160)")
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.folder, args.seconds)))
        return
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        parser.error(f"unknown mode(s) {', '.join(unknown)}; choose from {', '.join(MODES)}")
    from paadet.cpu import cpu_model

    report: dict = {"cpu": cpu_model(), "cores": os.cpu_count(), "competitor": args.competitor, "modes": {}}
    print(f"{report['cpu']}, {report['cores']} cores; competitor: one {args.competitor} process", flush=True)
    with tempfile.TemporaryDirectory(prefix="paadet-busy-") as tmp:
        folder = Path(tmp)
        prepare(folder, args.scale, "onnxruntime" in modes)
        for mode in modes:
            alone, loaded = [], []
            for _ in range(args.rounds):
                alone.append(run_worker(mode, folder, args.seconds, None)["median_ms"])
                loaded.append(run_worker(mode, folder, args.seconds, args.competitor)["median_ms"])
            a, b = statistics.median(alone), statistics.median(loaded)
            report["modes"][mode] = {"alone_ms": alone, "loaded_ms": loaded, "ratio": round(b / a, 2)}
            print(
                f"{mode:20s} alone {a:8.1f} ms/image ({1000 / a:6.2f} img/s)   loaded {b:8.1f} ms/image "
                f"({1000 / b:6.2f} img/s)   loaded/alone {b / a:5.2f}x",
                flush=True,
            )
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
