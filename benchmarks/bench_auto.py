"""``paadet predict --backend auto`` against the default torch backend, as whole commands: should ``auto`` be the
CPU default?

For each case, three runs of the same ``paadet predict`` command line in a fresh process each, timed from start to
exit (imports, model loading, every image, the results written), on an empty cache folder (``PAADET_CACHE``):

1. ``torch``: the default backend (``--backend torch``);
2. ``auto, first run``: exports the checkpoint to the cache, checks the export, times each backend, remembers;
3. ``auto, second run``: the same command again (the cached graph and choice: no export, no torch).

Then the detections of the second auto run are matched against the torch run's by the parity rule of
docs/parity.md (IoU >= 0.99, score within 1e-4, label equal; at least 99.5 % matched and at most 0.5 % extra).

Cases (``--cases``):

* ``mmdet``: seeded R50 weights with COCO's 80 classes (``seeded_state_dict(0)``: sparse, realistic detections),
  ``--images`` synthetic 640x480 JPEGs at the ``mmdet`` preset (fit 1333x800), as the official checkpoint runs;
* ``standin``: a trained stand-in (``--standin DIR``, as ``tools/train_standin.py`` writes it) on its own val
  images, at the scale it was trained at.

Example::

    python benchmarks/bench_auto.py --images 20 --standin /work/quick2 --json /tmp/auto.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RUNS = ("torch", "auto, first run", "auto, second run")


def _predict(images: list[str], checkpoint: str, backend: str, output: Path, cache: Path) -> tuple[float, str]:
    """Wall seconds of one ``paadet predict`` process, and its stderr's ``--backend auto`` line."""
    cmd = [sys.executable, "-m", "paadet", "predict", *images, "--checkpoint", checkpoint, "--backend", backend]
    cmd += ["--output", str(output), "--no-progress"]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PAADET_CACHE": str(cache)})
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"bench_auto: {' '.join(cmd)} failed:\n{done.stderr}")
    line = next((x for x in done.stderr.splitlines() if x.startswith("--backend auto: ") and "(" in x), "")
    return seconds, line


def _parity(reference: Path, results: Path) -> dict:
    """The parity rule over every image: matched / reference and extra / reference."""
    import numpy as np

    from paadet.compare import match_detections

    def by_image(path: Path) -> dict:
        out: dict = {}
        for d in json.loads(path.read_text()):
            x, y, w, h = d["bbox"]
            out.setdefault(d["image_id"], []).append((x, y, x + w, y + h, d["score"], d["category_id"]))
        return out

    ref, got = by_image(reference), by_image(results)
    matched = extra = total = 0
    for image_id in set(ref) | set(got):
        a = np.array(ref.get(image_id, []), np.float64).reshape(-1, 6)
        b = np.array(got.get(image_id, []), np.float64).reshape(-1, 6)
        report = match_detections(a[:, :4], a[:, 4], a[:, 5], b[:, :4], b[:, 4], b[:, 5])
        matched, extra, total = matched + report.matched, extra + report.extra, total + report.reference
    return {
        "reference": total,
        "matched": matched,
        "extra": extra,
        "matched_pct": round(100.0 * matched / max(total, 1), 2),
        "extra_pct": round(100.0 * extra / max(total, 1), 2),
        "passes": matched >= 0.995 * total and extra <= 0.005 * total,
    }


def run_case(name: str, images: list[str], checkpoint: str, work: Path) -> dict:
    cache = work / f"cache-{name}"
    cache.mkdir()
    out: dict = {"images": len(images), "runs": {}}
    outputs = {}
    for run in RUNS:
        backend = "torch" if run == "torch" else "auto"
        outputs[run] = work / f"{name}-{run.replace(', ', '-').replace(' ', '-')}.json"
        seconds, line = _predict(images, checkpoint, backend, outputs[run], cache)
        out["runs"][run] = {"seconds": round(seconds, 1), "auto": line or None}
        print(f"{name}: {run}: {seconds:.1f} s {line}", flush=True)
    torch_s = out["runs"]["torch"]["seconds"]
    for run in RUNS[1:]:
        out["runs"][run]["vs_torch"] = round(torch_s / out["runs"][run]["seconds"], 2)
    out["parity"] = _parity(outputs["torch"], outputs["auto, second run"])
    print(f"{name}: parity {out['parity']}", flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", default="mmdet,standin", help="comma-separated: mmdet, standin (default: both)")
    p.add_argument("--images", type=int, default=20, help="images of the mmdet case (default 20)")
    p.add_argument("--standin", default=None, metavar="DIR", help="the stand-in's folder (tools/train_standin.py)")
    p.add_argument("--json", default=None, help="write the report here too")
    args = p.parse_args()
    import cv2
    import torch

    from paadet.cpu import cpu_model
    from paadet.data.synthetic import synthetic_image
    from paadet.model.seeded import seeded_state_dict

    report: dict = {"cpu": cpu_model(), "cores": len(os.sched_getaffinity(0)), "cases": {}}
    with tempfile.TemporaryDirectory(prefix="paadet-bench-auto-") as tmp:
        work = Path(tmp)
        for case in args.cases.split(","):
            if case == "mmdet":
                checkpoint = work / "seeded.pth"
                torch.save({"state_dict": seeded_state_dict(0)}, checkpoint)
                images = []
                for i in range(args.images):
                    path = work / f"img_{i:03d}.jpg"
                    cv2.imwrite(str(path), synthetic_image(480, 640, seed=i))
                    images.append(str(path))
                report["cases"][case] = run_case(case, images, str(checkpoint), work)
            elif case == "standin":
                if args.standin is None:
                    raise SystemExit("bench_auto: the standin case needs --standin DIR")
                root = Path(args.standin)
                images = sorted(str(x) for x in (root / "val" / "images").glob("*.jpg"))
                report["cases"][case] = run_case(case, images, str(root / "standin.pth"), work)
            else:
                raise SystemExit(f"bench_auto: unknown case {case!r}; use mmdet, standin")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
