"""Write mmdetection 3.3's detections for a seeded random PAA checkpoint on generated images.

Run it in a separate environment with mmdetection installed (see ../shared/wheels/README.md and
docs/parity.md), with paadet importable there (``pip install --no-deps -e .``):

    /tmp/mmref/bin/python tools/make_golden.py --out tests/golden/mmdet_golden.json

The weights are regenerated from the seeds in ``CASES`` by ``paadet.model.seeded.seeded_state_dict`` (so nothing
large is committed) and made so that every image yields thousands of candidates, which exercises
top-k, NMS and score voting. Images come from ``paadet.data.synthetic.synthetic_image``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import mmdet
import torch
from mmdet.apis import inference_detector, init_detector

from paadet.data.synthetic import synthetic_image
from paadet.model.seeded import seeded_state_dict

IMAGES = [(300, 400, 1), (200, 1000, 2), (500, 375, 3)]  # (height, width, seed)
# name -> (weights seed, classification bias, presets, images): "dense" gives ~3,500 candidates per image
# over ~20 classes; "split" more than 10,000 (mmcv's per-class NMS path); "sparse" fewer than 100 detections.
CASES = {
    "dense": (0, -8.0, ("mmdet", "800"), IMAGES),
    "split": (1, -7.0, ("800",), IMAGES[:2]),
    "sparse": (2, -10.3, ("mmdet",), IMAGES[:2]),
}
PRESETS = {
    # preset -> (Resize scale, pad_size_divisor): pad 800 on an image that fits 800x800 gives exactly 800x800
    "mmdet": ((1333, 800), 32),
    "800": ((800, 800), 800),
}


def build(config_path: str, checkpoint: str, scale: tuple[int, int], divisor: int, voting: bool):
    from mmengine.config import Config

    cfg = Config.fromfile(config_path)
    cfg.model.backbone.init_cfg = None
    cfg.model.data_preprocessor.pad_size_divisor = divisor
    for step in cfg.test_dataloader.dataset.pipeline:
        if step["type"] == "Resize":
            step["scale"] = scale
    model = init_detector(cfg, checkpoint, device="cpu")
    model.bbox_head.with_score_voting = voting
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    config_path = os.path.join(os.path.dirname(mmdet.__file__), ".mim/configs/paa/paa_r50_fpn_1x_coco.py")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for case, (seed, cls_bias, presets, images) in CASES.items():
            checkpoint = os.path.join(tmp, f"{case}.pth")
            state_dict = seeded_state_dict(seed, cls_bias=cls_bias)
            torch.save({"meta": {"seed": seed, "cls_bias": cls_bias}, "state_dict": state_dict}, checkpoint)
            results += run_case(case, config_path, checkpoint, presets, images)
    payload = {
        "generator": "tools/make_golden.py",
        "mmdet": mmdet.__version__,
        "torch": torch.__version__,
        "cases": {name: {"seed": c[0], "cls_bias": c[1]} for name, c in CASES.items()},
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.out.with_suffix(".tmp")
    tmp_out.write_text(json.dumps(payload))
    tmp_out.replace(args.out)
    print(f"wrote {args.out}")


def run_case(case: str, config_path: str, checkpoint: str, presets, images) -> list[dict]:
    results = []
    arrays = [synthetic_image(h, w, seed=s) for h, w, s in images]
    for preset in presets:
        scale, divisor = PRESETS[preset]
        for voting in (True, False):
            model = build(config_path, checkpoint, scale, divisor, voting)
            for (h, w, s), image in zip(images, arrays, strict=False):
                with torch.no_grad():
                    sample = inference_detector(model, image)
                pred = sample.pred_instances
                results.append(
                    {
                        "case": case,
                        "preset": preset,
                        "score_voting": voting,
                        "image": {"height": h, "width": w, "seed": s},
                        "img_shape": list(sample.metainfo["img_shape"]),
                        "boxes": pred.bboxes.tolist(),
                        "scores": pred.scores.tolist(),
                        "labels": pred.labels.tolist(),
                    }
                )
                print(f"{case} {preset} voting={voting} {h}x{w}: {len(pred.scores)} detections")
    return results


if __name__ == "__main__":
    main()
