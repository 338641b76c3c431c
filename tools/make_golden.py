"""Write mmdetection 3.3's detections for a seeded random PAA checkpoint on generated images.

Run it in a separate environment with mmdetection installed (see ../shared/wheels/README.md and
docs/parity.md), with paadet importable there (``pip install --no-deps -e .``):

    /tmp/mmref/bin/python tools/make_golden.py --out tests/golden/mmdet_golden.json
    /tmp/mmref/bin/python tools/make_golden.py --depth 101 --out tests/golden/mmdet_golden_r101.json

``--depth 101`` runs mmdetection's ``paa_r101_fpn_1x_coco`` on seeded R-101 weights (``CASES_R101``: fewer,
smaller cases, as an R-101 forward costs twice an R-50's); its file records ``"depth": 101``.
The weights are regenerated from the seeds in ``CASES`` by ``paadet.model.seeded.seeded_state_dict`` (so nothing
large is committed) and made so that every image yields thousands of candidates, which exercises
top-k, NMS and score voting. Images come from ``paadet.data.synthetic.synthetic_image``.
"""

from __future__ import annotations

import argparse
import hashlib
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
# the same seeds draw other weights (a deeper backbone), so "sparse" needs a higher bias (-9.0: 66 and 19
# detections) for fewer than 100 detections; "dense" keeps thousands of candidates and 100 detections per image.
CASES_R101 = {
    "dense": (0, -8.0, ("mmdet", "800"), IMAGES[:2]),
    "sparse": (2, -9.0, ("mmdet",), IMAGES[:2]),
}
CASES_BY_DEPTH = {50: CASES, 101: CASES_R101}
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
    parser.add_argument("--depth", type=int, choices=sorted(CASES_BY_DEPTH), default=50, help="the backbone's depth")
    args = parser.parse_args()

    cases = CASES_BY_DEPTH[args.depth]
    config = f"paa_r{args.depth}_fpn_1x_coco.py"
    config_path = os.path.join(os.path.dirname(mmdet.__file__), ".mim/configs/paa", config)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for case, (seed, cls_bias, presets, images) in cases.items():
            checkpoint = os.path.join(tmp, f"{case}.pth")
            state_dict = seeded_state_dict(seed, cls_bias=cls_bias, depth=args.depth)
            torch.save({"meta": {"seed": seed, "cls_bias": cls_bias}, "state_dict": state_dict}, checkpoint)
            results += run_case(case, config_path, checkpoint, presets, images)
    payload = {
        "generator": "tools/make_golden.py",
        "mmdet": mmdet.__version__,
        "torch": torch.__version__,
        "cases": {name: {"seed": c[0], "cls_bias": c[1]} for name, c in cases.items()},
        "results": results,
    }
    if args.depth != 50:  # the R-50 file predates other depths: regenerating it gives the same bytes
        payload = {"depth": args.depth, "config": config, **payload}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.out.with_suffix(".tmp")
    tmp_out.write_text(json.dumps(payload))
    tmp_out.replace(args.out)
    print(f"wrote {args.out}")


def reuse_features(model) -> None:
    """Compute the backbone and neck once per input: the run without score voting gets the same features as the
    run with it (a CPU forward is deterministic), so only the head and mmdetection's post-processing run again."""
    extract_feat = model.extract_feat
    cache: dict[tuple, tuple] = {}

    def cached(batch_inputs: torch.Tensor):
        key = (tuple(batch_inputs.shape), hashlib.sha256(batch_inputs.contiguous().numpy().tobytes()).hexdigest())
        if key not in cache:
            cache[key] = extract_feat(batch_inputs)
        return cache[key]

    model.extract_feat = cached


def run_case(case: str, config_path: str, checkpoint: str, presets, images) -> list[dict]:
    results = []
    arrays = [synthetic_image(h, w, seed=s) for h, w, s in images]
    for preset in presets:
        scale, divisor = PRESETS[preset]
        model = build(config_path, checkpoint, scale, divisor, True)
        reuse_features(model)
        for voting in (True, False):
            model.bbox_head.with_score_voting = voting
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
