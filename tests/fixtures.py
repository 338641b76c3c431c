"""Test fixtures: the small training data set with mmdetection's edge cases (golden files are made from it),
the seeds of the training golden file's weights, and running the CLI in a fresh process.

Tests import this module as ``fixtures`` (pytest puts ``tests/`` on the path); ``tools/make_train_golden.py``
runs with ``PYTHONPATH=tests``.
"""

from __future__ import annotations

import subprocess
import sys

from paadet.data.synthetic import synthetic_image

RAY_NO_METRICS = {"enable_metrics_collection": False}
"""``_system_config`` for a Ray instance started inside the test process: its metrics are not what the tests check,
and their export threads outlive ``ray.shutdown()``. (They were first suspected of the suite's SIGSEGV, which was
OpenVINO's alternate signal stack: ``paadet.runtime.openvino_backend.shared_core``.)"""

# The training fixture of :func:`write_train_fixture` (tools/make_train_golden.py, tests/test_train_golden.py).
# Categories in file order; their ids are non-contiguous and not sorted, so label i is the i-th category listed.
TRAIN_FIXTURE_CATEGORIES: tuple[tuple[int, str], ...] = ((7, "kite"), (3, "apple"), (11, "zebra"))

# (file_name, image id, height, width, annotations); an annotation is (category id, [x, y, w, h], iscrowd, area)
# with area None for w * h. Comments say what mmdetection's parse_data_info / filter_data do with it.
TRAIN_FIXTURE_IMAGES: tuple[tuple[str, int, int, int, tuple], ...] = (
    (
        "img_a.png",
        12,
        300,
        400,
        (  # 4:3 landscape, resized 2.667x to 800 x 1067
            (7, [40.5, 30.25, 120.0, 90.0], 0, None),
            (3, [60.0, 50.0, 110.0, 85.0], 0, 7000.0),  # overlaps the first (IoU ~0.6); area is a mask area
            (11, [300.0, 100.0, 150.0, 80.0], 0, None),  # crosses the right border: clipped after Resize
            (3, [200.0, 200.0, 60.0, 60.0], 1, None),  # crowd: ignored instance, no effect on PAA
            (11, [150.0, 150.0, 5.5, 4.0], 0, None),  # small: ~15 x 11 px after Resize
            (7, [10.0, 240.0, 380.0, 55.0], 0, None),  # wide and flat
        ),
    ),
    (
        "img_b.png",
        3,
        400,
        160,
        (  # tall portrait, resized 3.33x to 1333 x 533
            (3, [20.0, -15.0, 60.0, 80.0], 0, None),  # crosses the top border
            (7, [30.0, 100.0, 0.5, 12.0], 0, None),  # w < 1: dropped
            (11, [10.0, 150.0, 140.0, 200.0], 0, None),
            (7, [80.0, 350.0, 70.0, 80.0], 0, None),  # crosses the bottom border
            (3, [100.0, 60.0, 20.0, 0.0], 0, None),  # zero area (h = 0): dropped
        ),
    ),
    (
        "img_c.png",
        40,
        240,
        320,
        (  # only crowd boxes: survives filter_empty_gt with 0 GT
            (7, [20.0, 30.0, 100.0, 80.0], 1, None),
            (11, [150.0, 100.0, 120.0, 100.0], 1, None),
        ),
    ),
    ("img_d.png", 7, 200, 200, ()),  # no annotations: skipped by filter_empty_gt
    (
        "img_e.png",
        8,
        28,
        60,
        (  # under 32 px: skipped by min_size
            (3, [5.0, 5.0, 20.0, 15.0], 0, None),
        ),
    ),
    (
        "sub/img_f.png",
        21,
        120,
        400,
        (  # very wide, in a sub-folder; resized 3.33x to 400 x 1333 (1x at (400, 256))
            (11, [5.0, 5.0, 390.0, 110.0], 0, None),  # nearly the whole image
            (3, [420.0, 10.0, 30.0, 30.0], 0, None),  # entirely outside the image: dropped
            (7, [100.0, 40.0, 40.75, 30.5], 0, None),
            (3, [250.0, 20.0, 40.0, 40.0], 0, 0.0),  # a real box with area 0: dropped (area <= 0)
            (7, [-20.0, 60.0, 50.0, 70.0], 0, None),  # crosses the left and bottom borders
            # At scale (400, 256) (factor 1): this 70 x 5 box's best IoU (0.078, low quality) is with the five P3
            # anchors centred at x = 336, y = 0..32; the next box (IoU 0.166) takes four of them back, which
            # leaves it a single candidate (PAA skips GTs with fewer than 2).
            (7, [300.0, 0.0, 70.0, 5.0], 0, None),
            (3, [326.0, 2.0, 20.0, 34.0], 0, None),
        ),
    ),
    (
        "img_g.png",
        5,
        150,
        100,
        (  # its only box lies outside: survives the filter with 0 GT
            (11, [-50.0, -40.0, 30.0, 20.0], 0, None),
        ),
    ),
    (
        "img_h.png",
        30,
        100,
        100,
        (  # square, resized 8x to 800 x 800
            (3, [10.0, 10.0, 30.0, 30.0], 0, None),
            (3, [12.0, 11.0, 29.0, 31.0], 0, None),  # near duplicate of the previous box
            (11, [60.0, 55.0, 40.0, 45.0], 0, None),  # touches the right and bottom borders
            (7, [45.0, 5.0, 1.0, 1.0], 0, None),  # 1 x 1 (kept: w < 1 is the rule), 8 x 8 after Resize
            (11, [45.0, 5.0, 1.0, 1.0], 0, None),  # its exact duplicate takes all its anchors: 0 candidates
        ),
    ),
    (
        "img_i.png",
        2,
        380,
        260,
        (  # portrait with many boxes
            (7, [10.0, 10.0, 80.0, 120.0], 0, None),
            (3, [70.0, 90.0, 90.0, 60.0], 0, None),
            (11, [150.0, 20.0, 100.0, 330.0], 0, None),
            (3, [20.0, 250.0, 40.0, 40.0], 0, None),
            (7, [30.0, 260.0, 45.0, 35.0], 0, None),  # overlaps the previous box, other class
            (11, [200.0, 300.0, 100.0, 100.0], 0, None),  # crosses the right and bottom borders
        ),
    ),
)


def train_fixture_annotations(seed: int = 0) -> dict:
    """The COCO ``instances`` dict of :func:`write_train_fixture` (images in the order listed above).

    Annotations are listed round-robin over the images (each image's own in its listed order) with
    non-sequential ids, so nothing may rely on the file grouping them by image. ``seed`` only offsets
    the annotation ids.
    """
    images, per_image = [], []
    for file_name, image_id, height, width, anns in TRAIN_FIXTURE_IMAGES:
        images.append({"id": image_id, "file_name": file_name, "height": height, "width": width})
        per_image.append([(image_id, a) for a in anns])
    annotations = []
    for rank in range(max(len(p) for p in per_image)):
        for entries in per_image:
            if rank < len(entries):
                image_id, (category_id, bbox, iscrowd, area) = entries[rank]
                annotations.append(
                    {
                        "id": 1000 + 7 * seed + 13 * len(annotations),
                        "image_id": image_id,
                        "category_id": category_id,
                        "bbox": list(bbox),
                        "iscrowd": iscrowd,
                        "area": float(bbox[2] * bbox[3]) if area is None else area,
                    }
                )
    categories = [{"id": cid, "name": name, "supercategory": "thing"} for cid, name in TRAIN_FIXTURE_CATEGORIES]
    return {
        "info": {"description": "paadet training fixture"},
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }


def write_train_fixture(folder, seed: int = 0) -> tuple[str, str]:
    """Write the training fixture: PNG images (lossless, so decoding is exact) and a COCO file.

    Images are :func:`synthetic_image` of the listed sizes, seeded from ``seed`` and their position;
    the same arguments give byte-identical files on any machine. Returns ``(ann_file, image_dir)``
    (``folder/annotations.json``, ``folder/images``) as strings.
    """
    import json
    import os

    import cv2

    image_dir = os.path.join(os.fspath(folder), "images")
    for k, (file_name, _, height, width, _) in enumerate(TRAIN_FIXTURE_IMAGES):
        path = os.path.join(image_dir, file_name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if not cv2.imwrite(path, synthetic_image(height, width, seed=1000 * seed + 17 + k)):
            raise OSError(f"{path}: cannot write the fixture image")
    ann_file = os.path.join(os.fspath(folder), "annotations.json")
    with open(ann_file, "w", encoding="utf-8") as f:
        json.dump(train_fixture_annotations(seed), f, indent=1)
    return ann_file, image_dir


# name -> (seed, cls_bias) of :func:`train_state_dict` for the training golden file: "prior" has
# mmdetection's initial classification prior (bias -log(99)), "hot" many confident negatives.
TRAIN_GOLDEN_WEIGHTS: dict[str, tuple[int, float]] = {"prior": (0, -4.595), "hot": (1, -2.0)}


def run_cli_without_torch(args: list[str], timeout: float = 300.0) -> subprocess.CompletedProcess:
    """``paadet ARGS`` in a fresh Python process; raises ``AssertionError`` unless it succeeded without ever
    importing torch (the exported-graph backends' promise: about a second less start-up)."""
    script = (
        "import sys; from paadet.cli import main; code = main(sys.argv[1:]); "
        "print('torch imported' if 'torch' in sys.modules else 'no torch'); sys.exit(code)"
    )
    proc = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"paadet {' '.join(args)} exited {proc.returncode}: {proc.stderr[-2000:]}"
    last = proc.stdout.strip().splitlines()[-1:] or [""]
    assert last[0] == "no torch", f"paadet {' '.join(args)}: {last[0]}"
    return proc
