"""Write the scales and sizes that mmcv's ``RandomResize`` gives for seeded draws (the multi-scale golden file).

Run it in the reference environment (mmdetection 3.3, see ../shared/wheels/README.md and docs/parity.md):

    /tmp/mmref/bin/python tools/make_resize_golden.py --out tests/golden/mmcv_random_resize.json

For each scale range (``RANGES``: the ms-3x recipe's ``[(1333, 640), (1333, 800)]``, the same reversed, and
ranges whose two positions overlap, so that the drawn long and short sides can swap), each numpy seed
``0..SEEDS-1`` and each image size (``SIZES``: landscape, portrait, square, thin), numpy's global generator is
seeded with ``np.random.seed(seed)`` and mmdetection's own train transform ``RandomResize(scale=...,
keep_ratio=True)`` (built from mmdetection's registry, so with mmdetection's ``Resize``, as the ms-3x config
builds it) runs on a blank image with one box. Recorded, one row per draw (``columns``): the seed, the image size,
the drawn ``scale``, ``img_shape``, ``scale_factor`` and the resized box. ``tests/test_train_recipes.py`` replays
each draw with ``numpy.random.RandomState(seed)``.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import mmcv
import mmdet
import numpy as np
from mmdet.registry import TRANSFORMS
from mmdet.structures.bbox import HorizontalBoxes
from mmdet.utils import register_all_modules

RANGES = (
    ((1333, 640), (1333, 800)),
    ((1333, 800), (1333, 640)),
    ((600, 1000), (800, 400)),
    ((300, 200), (500, 700)),
)
SIZES = ((480, 640), (640, 427), (500, 500), (100, 1000), (33, 37))
SEEDS = 20
BOX = (3.5, 4.25, 20.0, 30.75)


COLUMNS = (
    "seed",
    "height",
    "width",
    "scale_0",
    "scale_1",
    "new_height",
    "new_width",
    "w_scale",
    "h_scale",
    "x1",
    "y1",
    "x2",
    "y2",
)


def draw(scales, seed: int, height: int, width: int) -> list:
    """One seeded ``RandomResize`` on a ``height x width`` image: the drawn scale and the resized geometry."""
    transform = TRANSFORMS.build(dict(type="RandomResize", scale=[tuple(s) for s in scales], keep_ratio=True))
    np.random.seed(seed)
    results = {
        "img": np.zeros((height, width, 3), np.uint8),
        "img_shape": (height, width),
        "ori_shape": (height, width),
        "gt_bboxes": HorizontalBoxes(np.array([BOX], np.float32)),
    }
    out = transform(results)
    return [
        seed,
        height,
        width,
        *(int(v) for v in out["scale"]),
        *(int(v) for v in out["img_shape"][:2]),
        *(float(v) for v in out["scale_factor"]),
        *(float(v) for v in out["gt_bboxes"].tensor[0].tolist()),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="the golden JSON file to write")
    args = parser.parse_args()
    register_all_modules()
    cases = [
        {
            "scales": [list(s) for s in scales],
            "draws": [draw(scales, seed, h, w) for h, w in SIZES for seed in range(SEEDS)],
        }
        for scales in RANGES
    ]
    payload = {
        "generator": "tools/make_resize_golden.py",
        "command": "/tmp/mmref/bin/python tools/make_resize_golden.py --out tests/golden/mmcv_random_resize.json",
        "transform": "mmdet TRANSFORMS RandomResize(scale=..., keep_ratio=True), np.random.seed(seed) before each",
        "box": list(BOX),
        "columns": list(COLUMNS),
        "versions": {
            "mmdet": mmdet.__version__,
            "mmcv": mmcv.__version__,
            "numpy": np.__version__,
            "python": platform.python_version(),
        },
        "cases": cases,
    }
    tmp = args.out.with_suffix(".tmp")
    rows = [json.dumps(row) for case in cases for row in case["draws"]]
    marks = iter(range(len(rows)))
    for case in cases:  # one line per draw: a placeholder string, replaced after dumping
        case["draws"] = [f"@row{next(marks)}@" for _ in case["draws"]]
    text = json.dumps(payload, indent=1)
    for i, row in enumerate(rows):
        text = text.replace(f'"@row{i}@"', row, 1)
    tmp.write_text(text + "\n")
    tmp.replace(args.out)
    print(f"wrote {args.out}: {sum(len(c['draws']) for c in cases)} draws")


if __name__ == "__main__":
    main()
