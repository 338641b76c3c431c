"""paadet.train.annotations, dataset and loader: mmdetection 3.3's COCO training data path,
on tiny generated datasets."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch
from torch.utils.data.distributed import DistributedSampler

from paadet.data.coco import DatasetError
from paadet.data.synthetic import synthetic_image
from paadet.preprocess import normalize_numpy, normalize_pad
from paadet.train.annotations import DROP_NO_ANNOTATIONS, DROP_TOO_SMALL
from paadet.train.dataset import CocoTrainDataset, TrainSample, flip_decision
from paadet.train.loader import build_train_loader, collate_train, epoch_indices, group_batches

CATS = [{"id": 7, "name": "seven"}, {"id": 3, "name": "three"}, {"id": 42, "name": "forty-two"}]


def write_dataset(tmp_path, images, annotations, categories=CATS, *, write=True):
    """images: (id, file_name, width, height); writes PNGs of that size and the annotation file."""
    image_dir = tmp_path / "images"
    image_dir.mkdir(exist_ok=True)
    if write:
        for i, (_, name, w, h) in enumerate(images):
            cv2.imwrite(str(image_dir / name), synthetic_image(h, w, seed=i))
    anns = []
    for k, ann in enumerate(annotations):
        anns.append({"id": k + 1, "area": ann["bbox"][2] * ann["bbox"][3], "iscrowd": 0, **ann})
    data = {
        "images": [{"id": i, "file_name": n, "width": w, "height": h} for i, n, w, h in images],
        "annotations": anns,
        "categories": categories,
    }
    ann_file = tmp_path / "train.json"
    ann_file.write_text(json.dumps(data))
    return ann_file, image_dir


def box_dataset(tmp_path, n=6, **kwargs):
    """n images (mixed portrait and landscape), each with two boxes, for order / loader tests."""
    sizes = [(64, 48), (48, 64), (80, 40), (40, 56), (72, 48), (64, 64), (50, 70), (96, 40)]
    images = [(100 + i, f"im{i}.png", *sizes[i % len(sizes)]) for i in range(n)]
    anns = []
    for i, (img_id, _, w, h) in enumerate(images):
        anns.append({"image_id": img_id, "category_id": 7, "bbox": [2.0 + i, 3.0, w / 2, h / 3]})
        anns.append({"image_id": img_id, "category_id": 42, "bbox": [w / 4, h / 2, w / 2 + 5, h / 2 - 1]})
    ann_file, image_dir = write_dataset(tmp_path, images, anns)
    kwargs.setdefault("scale", (128, 96))
    kwargs.setdefault("min_size", 0)
    return CocoTrainDataset(ann_file, image_dir, **kwargs)


def test_parsing_filter_rules(tmp_path):
    # image 5 (listed first, 64 wide x 48 high) carries one annotation per rule
    images = [
        (5, "a.png", 64, 48),
        (2, "crowd_only.png", 40, 40),
        (9, "empty.png", 40, 40),
        (4, "small.png", 40, 31),
        (8, "exact32.png", 32, 40),
        (6, "unlisted_cat.png", 40, 40),
        (3, "degenerate_only.png", 40, 40),
    ]
    a = [
        {"bbox": [10, 5, 20, 10]},  # kept -> [10, 5, 30, 15], label of 7 = 0
        {"bbox": [70, 5, 10, 10]},  # starts right of the image: no overlap
        {"bbox": [64, 0, 5, 5]},  # touches the right edge only: inter_w = 0
        {"bbox": [-5, -5, 10, 10], "category_id": 42},  # partly outside: kept unclipped, label 2
        {"bbox": [1, 1, 5, 5], "area": 0},  # area <= 0
        {"bbox": [1, 1, 0.5, 5]},  # w < 1
        {"bbox": [1, 1, 5, 0.99]},  # h < 1
        {"bbox": [0, 0, 1, 1], "category_id": 3},  # w = h = 1: kept, label 1
        {"bbox": [2, 2, 8, 8], "ignore": True},  # mmdet's 'ignore' key
        {"bbox": [3, 3, 9, 9], "iscrowd": 1},  # crowd: not a target
        {"bbox": [4, 4, 9, 9], "category_id": 99},  # category not listed
        {"bbox": [20.5, 10.25, 3.5, 7.125], "area": 0.5},  # fractional, area from the file
    ]
    anns = [{"image_id": 5, "category_id": 7, **x} for x in a]
    anns += [
        {"image_id": 2, "category_id": 7, "bbox": [1, 1, 10, 10], "iscrowd": 1},
        {"image_id": 4, "category_id": 7, "bbox": [1, 1, 10, 10]},
        {"image_id": 8, "category_id": 3, "bbox": [1, 1, 10, 10]},
        {"image_id": 6, "category_id": 99, "bbox": [1, 1, 10, 10]},
        {"image_id": 3, "category_id": 3, "bbox": [1, 1, 0.5, 10]},
        {"image_id": 77, "category_id": 3, "bbox": [1, 1, 10, 10]},
    ]  # on an unlisted image
    ann_file, image_dir = write_dataset(tmp_path, images, anns, write=False)
    ds = CocoTrainDataset(ann_file, image_dir)

    assert ds.file_names == ["a.png", "crowd_only.png", "exact32.png", "degenerate_only.png"]
    assert ds.dropped == [
        ("empty.png", DROP_NO_ANNOTATIONS),
        ("small.png", DROP_TOO_SMALL),
        ("unlisted_cat.png", DROP_NO_ANNOTATIONS),
    ]
    a_img = ds.images[0]
    assert a_img.image_id == 5 and (a_img.width, a_img.height) == (64, 48)
    np.testing.assert_array_equal(
        a_img.boxes, np.array([[10, 5, 30, 15], [-5, -5, 5, 5], [0, 0, 1, 1], [20.5, 10.25, 24.0, 17.375]], np.float32)
    )
    assert a_img.boxes.dtype == np.float32
    np.testing.assert_array_equal(a_img.labels, [0, 2, 1, 0])
    assert a_img.labels.dtype == np.int64 and a_img.num_crowd == 1
    assert ds.images[1].boxes.shape == (0, 4) and ds.images[1].num_crowd == 1  # crowd-only survives, 0 GT
    assert ds.images[3].boxes.shape == (0, 4) and ds.images[3].num_crowd == 0  # degenerate-only survives
    np.testing.assert_array_equal(ds.images[2].labels, [1])
    assert [e.index for e in ds.images] == [0, 1, 2, 3]
    assert len(ds.warnings) == 1 and "3 annotations" in ds.warnings[0]  # category 99 (twice) and image 77


def test_filters_can_be_turned_off(tmp_path):
    images = [(1, "a.png", 40, 40), (2, "b.png", 20, 40)]
    ann_file, image_dir = write_dataset(
        tmp_path, images, [{"image_id": 2, "category_id": 3, "bbox": [1, 1, 4, 4]}], write=False
    )
    ds = CocoTrainDataset(ann_file, image_dir, min_size=0, filter_empty_gt=False)
    assert ds.file_names == ["a.png", "b.png"] and ds.dropped == []
    with pytest.raises(DatasetError, match="no training image left: 2 listed, 1 without annotations, 1 smaller"):
        CocoTrainDataset(ann_file, image_dir)


def test_labels_follow_file_category_order_with_noncontiguous_ids(tmp_path):
    images = [(1, "a.png", 48, 40)]
    anns = [{"image_id": 1, "category_id": c, "bbox": [1 + k, 2, 10, 10]} for k, c in enumerate([42, 3, 7, 3])]
    ann_file, image_dir = write_dataset(tmp_path, images, anns)
    ds = CocoTrainDataset(ann_file, image_dir, scale=(48, 40), flip_prob=0.0)
    assert ds.classes == ("seven", "three", "forty-two") and ds.category_ids == (7, 3, 42)
    assert ds.num_classes == 3
    sample = ds[0]
    assert sample.labels.dtype == torch.int64
    assert sample.labels.tolist() == [2, 1, 0, 1]


def test_resize_scales_and_clips_boxes(tmp_path):
    # 67 wide x 50 high, scale (100, 60): factor min(100/67, 60/50) = 1.2 -> 60 x int(80.4 + 0.5) = 80
    images = [(1, "a.png", 67, 50)]
    anns = [
        {"image_id": 1, "category_id": 7, "bbox": [10, 10, 10, 10]},
        {"image_id": 1, "category_id": 7, "bbox": [-5, -4, 10, 10]},  # clipped at 0
        {"image_id": 1, "category_id": 7, "bbox": [60, 45, 20, 20]},
    ]  # clipped at (80, 60)
    ann_file, image_dir = write_dataset(tmp_path, images, anns)
    ds = CocoTrainDataset(ann_file, image_dir, scale=(100, 60), flip_prob=0.0)
    s = ds[0]
    assert s.error is None and not s.flipped
    assert s.ori_shape == (50, 67) and s.img_shape == (60, 80)
    assert s.scale_factor == (80 / 67, 60 / 50)
    sw, sh = np.float32(80 / 67), np.float32(1.2)
    expected = np.array(
        [[10 * sw, 10 * sh, 20 * sw, 20 * sh], [0, 0, 5 * sw, 6 * sh], [60 * sw, 45 * sh, 80, 60]], np.float32
    )
    assert s.boxes.dtype == torch.float32
    np.testing.assert_array_equal(s.boxes.numpy(), expected)
    np.testing.assert_allclose(s.boxes[0].numpy(), [11.940299, 12.0, 23.880597, 24.0], rtol=1e-6)
    bgr = cv2.imread(str(image_dir / "a.png"), cv2.IMREAD_COLOR)
    want = normalize_pad(cv2.resize(bgr, (80, 60), interpolation=cv2.INTER_LINEAR), (60, 80))
    assert s.image.shape == (3, 60, 80) and s.image.dtype == torch.float32
    torch.testing.assert_close(s.image, want, rtol=0, atol=0)


def test_flip_mirrors_boxes_and_pixels(tmp_path):
    images = [(1, "a.png", 67, 50)]
    anns = [
        {"image_id": 1, "category_id": 7, "bbox": [10, 10, 10, 10]},
        {"image_id": 1, "category_id": 3, "bbox": [60, 5, 20, 20]},
    ]
    ann_file, image_dir = write_dataset(tmp_path, images, anns)
    plain = CocoTrainDataset(ann_file, image_dir, scale=(100, 60), flip_prob=0.0)[0]
    flipped = CocoTrainDataset(ann_file, image_dir, scale=(100, 60), flip_prob=1.0)[0]
    assert flipped.flipped and not plain.flipped
    b = plain.boxes  # resized and clipped: image is 80 wide
    want = torch.stack([80 - b[:, 2], b[:, 1], 80 - b[:, 0], b[:, 3]], dim=1)
    torch.testing.assert_close(flipped.boxes, want, rtol=0, atol=0)
    assert flipped.boxes[1].tolist() == pytest.approx([0.0, 6.0, 80 - 60 * 80 / 67, 30.0], abs=1e-4)
    torch.testing.assert_close(flipped.image, plain.image.flip(-1), rtol=0, atol=0)
    assert flipped.labels.tolist() == [0, 1]


def test_flip_decision_is_a_function_of_seed_epoch_index():
    draws = [flip_decision(0, 0, i, 0.5) for i in range(200)]
    assert draws == [flip_decision(0, 0, i, 0.5) for i in range(200)]
    assert draws != [flip_decision(0, 1, i, 0.5) for i in range(200)]
    assert draws != [flip_decision(1, 0, i, 0.5) for i in range(200)]
    assert 70 < sum(draws) < 130
    assert not any(flip_decision(0, 0, i, 0.0) for i in range(50))
    assert all(flip_decision(0, 0, i, 1.0) for i in range(50))


def test_order_and_flips_deterministic_per_seed_and_epoch(tmp_path):
    ds = box_dataset(tmp_path, n=8, seed=3)

    def run(epoch, **kw):
        batches = list(
            build_train_loader(ds, batch_size=1, seed=5, epoch=epoch, workers=0, aspect_ratio_grouping=False, **kw)
        )
        return [b.indices[0] for b in batches], [b.flipped[0] for b in batches], batches

    order0, flips0, batches0 = run(0)
    assert order0 == torch.randperm(8, generator=torch.Generator().manual_seed(5)).tolist()
    assert flips0 == [flip_decision(3, 0, i, 0.5) for i in order0]
    order0b, flips0b, batches0b = run(0, loader="threads")
    assert (order0b, flips0b) == (order0, flips0)
    for x, y in zip(batches0, batches0b, strict=False):
        torch.testing.assert_close(x.images, y.images, rtol=0, atol=0)
        torch.testing.assert_close(x.gt_boxes[0], y.gt_boxes[0], rtol=0, atol=0)
    order1, flips1, _ = run(1)
    assert order1 == torch.randperm(8, generator=torch.Generator().manual_seed(6)).tolist()
    assert order1 != order0
    assert [flip_decision(3, 1, i, 0.5) for i in range(8)] != [flip_decision(3, 0, i, 0.5) for i in range(8)]
    assert flips1 == [flip_decision(3, 1, i, 0.5) for i in order1]
    no_shuffle = list(build_train_loader(ds, batch_size=3, shuffle=False, workers=0, aspect_ratio_grouping=False))
    assert [b.indices for b in no_shuffle] == [[0, 1, 2], [3, 4, 5], [6, 7]]


def test_start_batch_skips_done_batches(tmp_path):
    ds = box_dataset(tmp_path, n=7)
    full = build_train_loader(ds, batch_size=2, seed=1, epoch=2, workers=2)
    resumed = build_train_loader(ds, batch_size=2, seed=1, epoch=2, workers=2, start_batch=2)
    assert full.total_batches == resumed.total_batches == 4 and len(full) == 4 and len(resumed) == 2
    assert resumed.batches == full.batches[2:]
    got_full, got_resumed = list(full), list(resumed)
    assert len(got_resumed) == 2
    for x, y in zip(got_full[2:], got_resumed, strict=False):
        assert x.file_names == y.file_names and x.flipped == y.flipped
        torch.testing.assert_close(x.images, y.images, rtol=0, atol=0)
    assert list(build_train_loader(ds, batch_size=2, seed=1, epoch=2, start_batch=4)) == []
    with pytest.raises(ValueError, match="start_batch 5 is outside this epoch's 4 batches"):
        build_train_loader(ds, batch_size=2, seed=1, epoch=2, start_batch=5)


def test_ddp_ranks_split_the_set(tmp_path):
    ds = box_dataset(tmp_path, n=5)
    ranks = [epoch_indices(5, seed=4, epoch=1, rank=r, world_size=2) for r in range(2)]
    assert [len(r) for r in ranks] == [3, 3]
    assert set(ranks[0]) | set(ranks[1]) == set(range(5))
    perm = torch.randperm(5, generator=torch.Generator().manual_seed(5)).tolist()
    padded = perm + perm[:1]  # padded by repetition to a multiple of the world size
    assert ranks == [padded[0::2], padded[1::2]]
    for r in range(2):
        sampler = DistributedSampler(ds, num_replicas=2, rank=r, shuffle=True, seed=4)
        sampler.set_epoch(1)
        assert list(sampler) == ranks[r]
        loader = build_train_loader(
            ds, batch_size=1, seed=4, epoch=1, rank=r, world_size=2, aspect_ratio_grouping=False, workers=0
        )
        assert [b[0] for b in loader.batches] == ranks[r]
    with pytest.raises(ValueError, match="rank"):
        build_train_loader(ds, batch_size=1, rank=2, world_size=2)


def test_aspect_ratio_grouping_matches_mmdet_batch_sampler():
    portrait = [True, False, True, False, False, True, False]
    # buckets fill in sampler order; a full bucket is emitted; leftovers (portrait first) at the end
    assert group_batches([0, 1, 2, 3, 4, 5, 6], 2, portrait=portrait) == [[0, 2], [1, 3], [4, 6], [5]]
    assert group_batches([5, 1, 0, 6, 4, 2, 3], 3, portrait=portrait) == [[1, 6, 4], [5, 0, 2], [3]]
    assert group_batches([3, 0, 1], 1, portrait=portrait) == [[3], [0], [1]]
    assert group_batches([3, 0, 1, 2, 4], 2) == [[3, 0], [1, 2], [4]]


def test_loader_groups_by_aspect_ratio(tmp_path):
    ds = box_dataset(tmp_path, n=8)
    loader = build_train_loader(ds, batch_size=2, seed=0, epoch=0, workers=0)
    portrait = [e.width < e.height for e in ds.images]
    order = epoch_indices(8, seed=0, epoch=0)
    assert loader.batches == group_batches(order, 2, portrait=portrait)
    assert sorted(i for b in loader.batches for i in b) == list(range(8))


def test_collate_pads_to_32_with_zeros_and_own_pad_shapes():
    def sample(h, w, value, name):
        return TrainSample(
            image=torch.full((3, h, w), value),
            boxes=torch.zeros((1, 4)),
            labels=torch.zeros(1, dtype=torch.int64),
            file_name=name,
            img_shape=(h, w),
            ori_shape=(h, w),
            scale_factor=(1.0, 1.0),
            flipped=False,
        )

    bad = TrainSample(
        image=None,
        boxes=torch.zeros((0, 4)),
        labels=torch.zeros(0, dtype=torch.int64),
        file_name="bad.png",
        img_shape=(0, 0),
        ori_shape=(0, 0),
        scale_factor=(1.0, 1.0),
        flipped=False,
        error="cannot read bad.png",
    )
    batch = collate_train([sample(33, 50, -1.5, "a"), bad, sample(64, 20, 2.0, "b")])
    assert batch.images.shape == (2, 3, 64, 64) and batch.batch_input_shape == (64, 64) and len(batch) == 2
    assert batch.pad_shapes == [(64, 64), (64, 32)]
    assert batch.img_shapes == [(33, 50), (64, 20)]
    assert batch.file_names == ["a", "b"] and batch.skipped == [("bad.png", "cannot read bad.png")]
    assert torch.all(batch.images[0, :, :33, :50] == -1.5) and torch.all(batch.images[1, :, :, :20] == 2.0)
    assert batch.images[0, :, 33:].abs().sum() == 0 and batch.images[0, :, :, 50:].abs().sum() == 0
    assert batch.images[1, :, :, 20:].abs().sum() == 0
    one = collate_train([sample(32, 96, 1.0, "c")])
    assert one.images.shape == (1, 3, 32, 96) and one.pad_shapes == [(32, 96)]
    empty = collate_train([bad])
    assert empty.images is None and len(empty) == 0 and empty.batch_input_shape is None
    assert empty.gt_boxes == [] and empty.pad_shapes == [] and empty.skipped == [("bad.png", "cannot read bad.png")]


def test_unreadable_image_is_reported_not_raised(tmp_path):
    images = [(1, "good.png", 48, 40), (2, "corrupt.png", 48, 40), (3, "missing.png", 48, 40)]
    anns = [{"image_id": i, "category_id": 7, "bbox": [1, 1, 10, 10]} for i in (1, 2, 3)]
    ann_file, image_dir = write_dataset(tmp_path, images, anns)
    (image_dir / "corrupt.png").write_bytes(b"not an image")
    (image_dir / "missing.png").unlink()
    ds = CocoTrainDataset(ann_file, image_dir, scale=(48, 40))
    s = ds[1]
    assert s.image is None and "corrupt.png" in s.error and "\n" not in s.error
    assert s.boxes.shape == (0, 4)
    assert "missing.png" in ds[2].error
    for workers in (0, 2):
        batches = list(build_train_loader(ds, batch_size=3, shuffle=False, workers=workers))
        assert len(batches) == 1 and batches[0].file_names == ["good.png"]
        assert [name for name, _ in batches[0].skipped] == ["corrupt.png", "missing.png"]
    alone = list(build_train_loader(ds, batch_size=1, shuffle=False, workers=0))
    assert [len(b) for b in alone] == [1, 0, 0] and alone[1].images is None


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "is not valid JSON"),
        (json.dumps([1, 2]), "not a COCO annotation file"),
        (
            json.dumps(
                {
                    "images": [{"id": 1, "file_name": "a.png", "width": 40, "height": 40}],
                    "annotations": [{"id": 1, "image_id": 1, "category_id": 7}],
                    "categories": CATS,
                }
            ),
            "needs a 'bbox'",
        ),
        (
            json.dumps(
                {"images": [{"id": 1, "file_name": "a.png", "width": 40}], "annotations": [], "categories": CATS}
            ),
            "image 1 needs a positive 'height'",
        ),
        (
            json.dumps({"images": [{"id": 1, "width": 40, "height": 40}], "annotations": [], "categories": CATS}),
            "has no 'file_name'",
        ),
    ],
)
def test_malformed_annotation_file_is_one_line_error(tmp_path, content, message):
    ann_file = tmp_path / "bad.json"
    ann_file.write_text(content)
    (tmp_path / "images").mkdir()
    with pytest.raises(DatasetError) as info:
        CocoTrainDataset(ann_file, tmp_path / "images")
    text = str(info.value)
    assert message in text and str(ann_file) in text and "\n" not in text


def test_missing_image_folder(tmp_path):
    with pytest.raises(DatasetError, match="image folder not found"):
        CocoTrainDataset(tmp_path / "x.json", tmp_path / "nope")


def test_process_workers_give_the_same_batches(tmp_path):
    ds = box_dataset(tmp_path, n=4, seed=1)
    threads = list(build_train_loader(ds, batch_size=2, seed=2, workers=2))
    procs = list(build_train_loader(ds, batch_size=2, seed=2, workers=1, loader="processes"))
    assert [b.file_names for b in procs] == [b.file_names for b in threads]
    for x, y in zip(threads, procs, strict=False):
        assert x.flipped == y.flipped and x.pad_shapes == y.pad_shapes
        torch.testing.assert_close(x.images, y.images, rtol=0, atol=0)
        for bx, by in zip(x.gt_boxes, y.gt_boxes, strict=False):
            torch.testing.assert_close(bx, by, rtol=0, atol=0)


@pytest.mark.parametrize("shape", [(160, 160), (37, 91), (1, 5)])
def test_loader_normalisation_equals_inference_normalisation(shape):
    """The loader's numpy normalisation (no torch kernel in its threads) is bit-identical to inference's."""

    image = np.random.default_rng(sum(shape)).integers(0, 256, (*shape, 3), dtype=np.uint8)
    ours = torch.from_numpy(normalize_numpy(image))
    assert ours.dtype == torch.float32 and ours.is_contiguous() and ours.shape == (3, *shape)
    assert torch.equal(ours, normalize_pad(image, shape))
    assert not torch.equal(ours, normalize_pad(image[:, :, ::-1].copy(), shape))  # channel order matters
