"""Check that mmdetection 3.3 loads a paadet-written checkpoint: its keys, its class names, one inference.

Run it in the reference environment (mmdetection 3.3, see ../shared/wheels/README.md and docs/parity.md),
with paadet importable there (``pip install --no-deps -e .``) for the generated test image:

    /tmp/mmref/bin/python tools/check_mmdet_load.py CHECKPOINT.pth --num-classes 3

It builds mmdetection's own ``configs/paa/paa_r50_fpn_1x_coco.py`` with ``num_classes`` changed, runs
``mmdet.apis.init_detector`` on the checkpoint (CPU) and ``inference_detector`` on an image from
``paadet.data.synthetic.synthetic_image``, and prints: whether every key of the model was in the checkpoint
and none was left over (missing / unexpected keys, shape mismatches, after mmengine's own key handling:
the ``state_dict`` entry, a ``module.`` prefix), whether each loaded tensor equals the checkpoint's,
the class names mmdetection read from ``meta.dataset_meta`` (or its COCO fallback when there is none),
and the detections. The load is clean when no key is missing, left over, of another shape or loaded
with another value, and the meta names ``num_classes`` classes; the exit status is 0 then, 1 otherwise.
``--json`` prints the same as one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import warnings

import mmdet
import torch
from mmdet.apis import inference_detector, init_detector
from mmengine.config import Config

from paadet.data.synthetic import synthetic_image

CONFIG = os.path.join(os.path.dirname(mmdet.__file__), ".mim/configs/paa/paa_r50_fpn_1x_coco.py")


def checkpoint_state_dict(path: str) -> tuple[dict, dict]:
    """The checkpoint's state dict as mmengine's ``_load_checkpoint_to_model`` sees it, and its meta.

    Loaded with ``weights_only=True`` (torch's default since 2.6, which mmengine's plain ``torch.load`` gets).
    """
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    state_dict = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else checkpoint
    state_dict = {(k[len("module.") :] if k.startswith("module.") else k): v for k, v in state_dict.items()}
    meta = checkpoint.get("meta", {}) if isinstance(checkpoint, dict) else {}
    return state_dict, meta


def check(path: str, num_classes: int, height: int, width: int, score_thr: float) -> dict:
    cfg = Config.fromfile(CONFIG)
    cfg.model.bbox_head.num_classes = num_classes
    # mmengine logs to stdout; keep stdout for the report
    with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(sys.stderr):
        warnings.simplefilter("always")
        model = init_detector(cfg, path, device="cpu")
    state_dict, meta = checkpoint_state_dict(path)
    model_sd = model.state_dict()
    missing = sorted(set(model_sd) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(model_sd))
    mismatched = sorted(
        k for k in set(model_sd) & set(state_dict) if tuple(model_sd[k].shape) != tuple(state_dict[k].shape)
    )
    differing = sorted(
        k
        for k in set(model_sd) & set(state_dict)
        if k not in mismatched and not torch.equal(model_sd[k].cpu(), state_dict[k].to(model_sd[k].dtype))
    )
    classes = list(model.dataset_meta.get("classes", ()))
    with torch.no_grad(), contextlib.redirect_stdout(sys.stderr):
        sample = inference_detector(model, synthetic_image(height, width, seed=0))
    pred = sample.pred_instances
    keep = pred.scores >= score_thr
    labels = pred.labels[keep].tolist()
    detections = [
        {
            "label": int(label),
            "name": classes[label] if label < len(classes) else None,
            "score": round(float(score), 4),
            "box": [round(float(v), 1) for v in box],
        }
        for label, score, box in zip(labels, pred.scores[keep], pred.bboxes[keep], strict=False)
    ]
    meta_classes = (meta.get("dataset_meta") or {}).get("classes")
    problems = [
        f"{len(v)} {what}"
        for what, v in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches", mismatched),
            ("differing tensors", differing),
        )
        if v
    ]
    if meta_classes is None and "CLASSES" not in meta:
        problems.append("no class names in meta (mmdetection falls back to COCO's)")
    if len(classes) != num_classes:
        problems.append(f"{len(classes)} class names for {num_classes} classes")
    return {
        "checkpoint": path,
        "num_classes": num_classes,
        "mmdet": mmdet.__version__,
        "clean": not problems,
        "problems": problems,
        "model_keys": len(model_sd),
        "checkpoint_keys": len(state_dict),
        "missing_keys": missing,
        "unexpected_keys": unexpected,
        "shape_mismatches": mismatched,
        "differing_tensors": differing,
        "classes_from": "meta.dataset_meta"
        if meta_classes is not None
        else ("meta.CLASSES" if "CLASSES" in meta else "COCO fallback (no class names in meta)"),
        "classes": classes,
        "meta_category_ids": (meta.get("dataset_meta") or {}).get("category_ids"),
        "meta_keys": sorted(meta),
        "image": [height, width],
        "num_detections": len(pred.scores),
        "detections_over_thr": detections[:10],
        "warnings": sorted(
            {
                str(w.message).splitlines()[0]
                for w in caught
                if any(word in str(w.message).lower() for word in ("checkpoint", "meta", "class", "key"))
            }
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a checkpoint written by paadet (mmdetection's layout)")
    parser.add_argument("--num-classes", type=int, default=80, help="classes of the head (default 80, COCO)")
    parser.add_argument("--image-size", type=int, nargs=2, default=(320, 480), metavar=("H", "W"))
    parser.add_argument("--score-thr", type=float, default=0.3, help="list detections at least this confident")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of lines")
    args = parser.parse_args()
    report = check(args.checkpoint, args.num_classes, *args.image_size, args.score_thr)
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        verdict = "loaded cleanly" if report["clean"] else "NOT a clean load: " + "; ".join(report["problems"])
        print(f"{report['checkpoint']}: {verdict} (mmdet {report['mmdet']}, num_classes {report['num_classes']})")
        print(
            f"  keys: model {report['model_keys']}, checkpoint {report['checkpoint_keys']}; "
            f"missing {len(report['missing_keys'])}, unexpected {len(report['unexpected_keys'])}, "
            f"shape mismatches {len(report['shape_mismatches'])}, differing tensors {len(report['differing_tensors'])}"
        )
        for key in ("missing_keys", "unexpected_keys", "shape_mismatches", "differing_tensors"):
            for name in report[key][:20]:
                print(f"    {key[:-1].replace('_', ' ')}: {name}")
        print(f"  classes ({report['classes_from']}): {report['classes']}")
        if report["meta_category_ids"] is not None:
            print(f"  meta category_ids: {report['meta_category_ids']}")
        print(f"  meta keys: {report['meta_keys']}")
        print(
            f"  inference on a {report['image'][0]}x{report['image'][1]} image: {report['num_detections']} detections, "
            f"{len(report['detections_over_thr'])} listed with score >= {args.score_thr}"
        )
        for det in report["detections_over_thr"]:
            print(f"    {det['name']} ({det['label']}) {det['score']} {det['box']}")
        for line in report["warnings"]:
            print(f"  warning: {line}")
    sys.exit(0 if report["clean"] else 1)


if __name__ == "__main__":
    main()
