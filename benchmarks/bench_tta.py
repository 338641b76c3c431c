"""Test-time augmentation judged by AP, and its cost per image.

    python benchmarks/bench_tta.py --standin DIR [--settings "plain;0.8,1,1.2;..."] [--limit N] [--json FILE]
    python benchmarks/bench_tta.py --cost [--preset mmdet] [--num-images 4] [--json FILE]

``--standin DIR``: a trained stand-in (``DIR/standin.pth``, else the newest ``standin.pth`` or ``latest.pth`` under
``DIR``, with ``DIR/val`` or ``DIR/data/val``: ``annotations.json`` and ``images/``). Each setting runs paadet's
own evaluation (``paadet.evaluation.run.evaluate_detector``, the code behind ``paadet eval``) over the val split in
this one process, one after another, on the torch backend (float32): ``plain`` is ``paadet eval`` without ``--tta``; any
other setting is ``--tta-scales SCALES`` (add `` noflip`` for ``--no-tta-flip``). The AP, its difference from
``plain`` in AP points, and the seconds per image with their ratio to ``plain`` are printed as a Markdown table.

``--cost``: the time per image of ``paadet predict``'s path (decode, views, network, merge) without and with
``--tta`` (the default views), alternating ``--rounds`` times on the same generated 640x480 JPEGs, on seeded R-50
weights (``sparse``: a few hundred candidates per view, a trained model's load) at a full-size preset; the median
of each and the ratio.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import cv2
import torch

from paadet import DetectorSpec
from paadet.data.coco import CocoDataset
from paadet.data.synthetic import synthetic_image
from paadet.detector import Detector
from paadet.evaluation.run import evaluate_detector
from paadet.fileio import atomic_write_json
from paadet.model.seeded import seeded_state_dict
from paadet.preprocess import Preset
from paadet.runtime.registry import model_classes
from paadet.runtime.tta import TTAOptions, parse_scales

DEFAULT_SETTINGS = "plain;1;0.8,1,1.2;0.8,1,1.2 noflip;1,1.2,1.4;0.8,1,1.2,1.4"


def tta_of(setting: str) -> TTAOptions | None:
    """``plain`` -> None; ``SCALES`` / ``SCALES noflip`` -> the options."""
    if setting.strip() == "plain":
        return None
    scales, _, flag = setting.strip().partition(" ")
    return TTAOptions(parse_scales(scales), flip=flag.strip() != "noflip")


def find_checkpoint(standin: Path) -> Path:
    """``standin.pth``, else the newest ``standin.pth``, else ``latest.pth``, under the folder."""
    if (standin / "standin.pth").is_file():
        return standin / "standin.pth"
    for name in ("standin.pth", "latest.pth"):
        found = sorted(standin.rglob(name), key=lambda p: p.stat().st_mtime)
        if found:
            return found[-1]
    raise SystemExit(f"{standin}: no standin.pth and no latest.pth under it")


def find_val(standin: Path) -> Path:
    """``DIR/val`` or ``DIR/data/val`` (``paadet data synthetic``'s layout)."""
    for folder in (standin / "val", standin / "data" / "val"):
        if (folder / "annotations.json").is_file():
            return folder
    raise SystemExit(f"{standin}: no val/annotations.json or data/val/annotations.json")


def judge(standin: Path, settings: list[str], limit: int | None, workers: int) -> dict:
    checkpoint = find_checkpoint(standin)
    spec = DetectorSpec(checkpoint=str(checkpoint), workers=workers)
    val = find_val(standin)
    dataset = CocoDataset.load(val / "annotations.json", val / "images", limit=limit, classes=model_classes(spec))
    rows = []
    for setting in settings:
        detector = Detector.from_spec(spec.replace(tta=tta_of(setting)).validate())
        start = time.perf_counter()
        report = evaluate_detector(detector, dataset, progress=False)
        wall = time.perf_counter() - start
        m = report.metrics.to_json()
        rows.append(
            {
                "setting": setting,
                "views": report.backend.get("tta", "1 view (no TTA)"),
                "AP": m["AP"],
                "AP50": m["AP50"],
                "AP75": m["AP75"],
                "s_per_image": wall / len(dataset.images),
            }
        )
        print(f"{setting}: AP {m['AP']:.4f} in {wall:.1f} s", file=sys.stderr, flush=True)
    return {
        "checkpoint": str(checkpoint),
        "images": len(dataset.images),
        "preset": detector.backend.describe()["preset"],
        "rows": rows,
    }


def preset_of(text: str) -> str | Preset:
    """``mmdet`` / ``800``, or ``LONGxSHORT`` (a fit of that size, padded to /32)."""
    if "x" not in text:
        return text
    long_side, short_side = (int(v) for v in text.split("x"))
    return Preset(text, (long_side, short_side))


def cost(preset: str, num_images: int, rounds: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="paadet-tta-") as tmp:
        ckpt = Path(tmp) / "seeded.pth"
        torch.save({"meta": {}, "state_dict": seeded_state_dict(2, cls_bias=-10.3)}, ckpt)
        paths = []
        for i in range(num_images):
            paths.append(Path(tmp) / f"{i}.jpg")
            cv2.imwrite(str(paths[-1]), synthetic_image(480, 640, seed=i))
        spec = DetectorSpec(checkpoint=str(ckpt), preset=preset_of(preset))
        detectors = {"plain": Detector.from_spec(spec), "tta": Detector.from_spec(spec.replace(tta=TTAOptions()))}
        times: dict[str, list[float]] = {name: [] for name in detectors}
        for det in detectors.values():  # warm-up
            det.predict(paths[:1])
        for _ in range(rounds):
            for name, det in detectors.items():
                start = time.perf_counter()
                det.predict(paths)
                times[name].append((time.perf_counter() - start) / len(paths))
    plain, tta = statistics.median(times["plain"]), statistics.median(times["tta"])
    return {
        "preset": preset,
        "images": num_images,
        "rounds": rounds,
        "tta": TTAOptions().describe(),
        "s_per_image": {"plain": plain, "tta": tta},
        "ratio": tta / plain,
    }


def table(result: dict) -> str:
    rows = result["rows"]
    base = next((r for r in rows if r["setting"] == "plain"), rows[0])
    lines = [
        "| setting | views | AP | AP50 | AP75 | AP vs plain | s/image | time vs plain |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| `{r['setting']}` | {r['views']} | {r['AP']:.4f} | {r['AP50']:.4f} | {r['AP75']:.4f} | "
            f"{100 * (r['AP'] - base['AP']):+.2f} | {r['s_per_image']:.3f} | "
            f"{r['s_per_image'] / base['s_per_image']:.2f}x |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--standin", type=Path, default=None, metavar="DIR", help="a trained stand-in's folder")
    p.add_argument("--settings", default=DEFAULT_SETTINGS, help=f"';'-separated (default: {DEFAULT_SETTINGS!r})")
    p.add_argument("--limit", type=int, default=None, help="the first N val images only")
    p.add_argument("--workers", type=int, default=1, help="decoding threads (default: 1)")
    p.add_argument("--cost", action="store_true", help="time per image without and with --tta")
    p.add_argument("--preset", default="mmdet", help="--cost: mmdet, 800 or a fit LONGxSHORT (default: mmdet)")
    p.add_argument("--num-images", type=int, default=4, help="--cost: images per timed pass (default: 4)")
    p.add_argument("--rounds", type=int, default=3, help="--cost: timed passes of each (default: 3)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)
    if args.standin is None and not args.cost:
        p.error("give --standin DIR, --cost, or both")
    out: dict = {"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}
    if args.standin is not None:
        out["ap"] = judge(args.standin, [s for s in args.settings.split(";") if s.strip()], args.limit, args.workers)
        print(f"{out['ap']['checkpoint']}, {out['ap']['images']} val images, preset {out['ap']['preset']}")
        print(table(out["ap"]))
    if args.cost:
        out["cost"] = c = cost(args.preset, args.num_images, args.rounds)
        print(
            f"preset {c['preset']}, {c['images']} images x {c['rounds']} rounds: plain {c['s_per_image']['plain']:.2f} "
            f"s/image, --tta ({c['tta']}) {c['s_per_image']['tta']:.2f} s/image: {c['ratio']:.2f}x"
        )
    if args.json is not None:
        atomic_write_json(args.json, out, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
