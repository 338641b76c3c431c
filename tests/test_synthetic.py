"""``paadet.data.synthetic``: seeded images whose boxes are the tight boxes of the visible object pixels."""

from __future__ import annotations

import hashlib
import json

import cv2
import numpy as np
import pytest

from paadet.data.coco import CocoDataset
from paadet.data.synthetic import SHAPES, SyntheticSpec, _shape_mask, generate_split, render_image
from paadet.train.dataset import CocoTrainDataset

SPEC = SyntheticSpec(size=128, min_size=12, max_size=90, max_objects=5)


def test_same_arguments_same_image_whatever_the_order():
    a, anns_a = render_image(SPEC, 3, "train", 7)
    render_image(SPEC, 3, "train", 2)  # another image in between changes nothing
    b, anns_b = render_image(SPEC, 3, "train", 7)
    assert np.array_equal(a, b) and anns_a == anns_b
    c, _ = render_image(SPEC, 3, "val", 7)
    d, _ = render_image(SPEC, 4, "train", 7)
    assert not np.array_equal(a, c) and not np.array_equal(a, d)


def test_boxes_are_inside_the_image_and_respect_the_spec():
    sizes, counts = [], []
    for index in range(40):
        image, anns = render_image(SPEC, 0, "train", index)
        assert image.shape == (128, 128, 3) and image.dtype == np.uint8
        counts.append(len(anns))
        for ann in anns:
            x, y, w, h = ann["bbox"]
            assert x >= 0 and y >= 0 and x + w <= 128 and y + h <= 128 and w >= 1 and h >= 1
            assert 1 <= ann["category_id"] <= len(SHAPES)
            assert 0 < ann["area"] <= w * h
            sizes.append(max(w, h))
    assert max(counts) <= SPEC.max_objects and sum(counts) > 40
    # small (< 32 px), medium and large objects all occur
    assert min(sizes) < 32 and max(sizes) > 64


def test_shape_masks_have_the_size_asked_for():
    for shape in SHAPES:
        mask = _shape_mask(shape, 200, 100.0, 100.0, 80.0, 80.0, 0.0)
        ys, xs = np.nonzero(mask)
        w, h = xs.max() - xs.min() + 1, ys.max() - ys.min() + 1
        assert 55 <= max(w, h) <= 82, (shape, w, h)
    ring = _shape_mask("ring", 200, 100.0, 100.0, 80.0, 80.0, 0.0)
    assert ring[100, 100] == 0 and ring[100, 62] == 1  # a hole in the middle


def test_generate_split_writes_a_coco_file_both_loaders_read(tmp_path):
    ann_file, image_dir = generate_split(tmp_path / "val", 6, split="val", seed=1, spec=SPEC)
    data = json.loads(ann_file.read_text())
    assert [c["name"] for c in data["categories"]] == list(SHAPES)
    assert [c["id"] for c in data["categories"]] == list(range(1, len(SHAPES) + 1))
    assert len(data["images"]) == 6 and all((image_dir / im["file_name"]).is_file() for im in data["images"])
    assert data["info"]["seed"] == 1 and data["info"]["spec"]["size"] == 128
    # the written image is the rendered one (up to JPEG), with the rendered boxes
    first = data["images"][0]
    image = cv2.imread(str(image_dir / first["file_name"]))
    expected, anns = render_image(SPEC, 1, "val", 0)
    encoded = cv2.imdecode(
        cv2.imencode(".jpg", expected, [cv2.IMWRITE_JPEG_QUALITY, SPEC.jpeg_quality])[1], cv2.IMREAD_COLOR
    )
    assert np.array_equal(image, encoded)
    assert [a["bbox"] for a in data["annotations"] if a["image_id"] == first["id"]] == [a["bbox"] for a in anns]
    assert len(CocoDataset.load(ann_file, image_dir).image_ids) == 6
    train = CocoTrainDataset(ann_file, image_dir, scale=(128, 128), flip_prob=0.0, seed=0)
    assert len(train.classes) == len(SHAPES)
    # byte-identical on a second run
    again, _ = generate_split(tmp_path / "again", 6, split="val", seed=1, spec=SPEC)
    digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
    assert digest(again) == digest(ann_file)
    assert digest(tmp_path / "again" / "images" / "val_000003.jpg") == digest(image_dir / "val_000003.jpg")


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"size": 16}, "size"),
        ({"min_objects": 3, "max_objects": 2}, "min_objects"),
        ({"min_size": 100, "max_size": 50}, "min_size"),
        ({"min_visible": 0}, "min_visible"),
        ({"classes": 0}, "classes"),
        ({"classes": 9}, "classes"),
        ({"clutter": -1}, "clutter"),
    ],
)
def test_bad_specs_are_refused(kwargs, words):
    with pytest.raises(ValueError, match=words):
        SyntheticSpec(**kwargs)


def test_fewer_classes_draw_only_the_first_shapes():
    few = SyntheticSpec(size=128, min_size=12, max_size=90, max_objects=5, classes=2)
    ids = {a["category_id"] for index in range(20) for a in render_image(few, 0, "train", index)[1]}
    assert ids == {1, 2}
