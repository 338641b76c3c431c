"""paadet's training data path and PAA losses against mmdetection 3.3 (tests/golden/mmdet_train_golden.json, and
tests/golden/mmdet_train_golden_r101.json for the ResNet-101).

The golden file comes from ``tools/make_train_golden.py`` (mmdetection's own PAA config, loader, data
preprocessor and ``model.loss`` on the CPU) on the fixture of ``tests/fixtures.py:write_train_fixture``
with the seeded weights of ``paadet.model.seeded.train_state_dict``; both are regenerated here. Checked:
which images are kept and skipped, the parsed boxes and labels in the network frame with the image
geometry, and per batch loss_cls / loss_bbox / loss_iou (relative 1e-4) and the positives per image
after PAA's reassignment (equal). The runs at the small Resize scale (400, 256) are replayed in full;
of the run at the config's own scale (1333, 800) the boxes of every image are checked and the losses
of ``FULL_SCALE_LOSS_IMAGES`` (two images, to keep the network's CPU time down). The R-101 file (``--depth 101``
of the tool: mmdetection's ``paa_r101_fpn_1x_coco``) has the small-scale runs with batch sizes 1 and 2.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from fixtures import TRAIN_FIXTURE_CATEGORIES, TRAIN_GOLDEN_WEIGHTS, train_fixture_annotations, write_train_fixture

from paadet.model import PAANet
from paadet.model.seeded import train_state_dict
from paadet.train.dataset import CocoTrainDataset
from paadet.train.loader import collate_train
from paadet.train.loss import PAALoss

GOLDEN_DIR = Path(__file__).parent / "golden"
GOLDENS = {
    depth: json.loads((GOLDEN_DIR / name).read_text())
    for depth, name in ((50, "mmdet_train_golden.json"), (101, "mmdet_train_golden_r101.json"))
}
FULL_SCALE_LOSS_IMAGES = ("sub/img_f.png", "img_h.png")
LOSS_KEYS = ("loss_cls", "loss_bbox", "loss_iou")

golden = GOLDENS[50]
RUNS = {f"r{depth}_{run['name']}": dict(run, depth=depth) for depth, g in GOLDENS.items() for run in g["runs"]}


@pytest.fixture(scope="module")
def fixture_files(tmp_path_factory) -> tuple[str, str]:
    return write_train_fixture(tmp_path_factory.mktemp("train_fixture"), seed=golden["fixture"]["seed"])


@pytest.fixture(scope="module")
def datasets(fixture_files):
    cache: dict[tuple[int, int], CocoTrainDataset] = {}

    def get(scale) -> CocoTrainDataset:
        key = tuple(scale)
        if key not in cache:
            cache[key] = CocoTrainDataset(*fixture_files, scale=key, flip_prob=0.0)
        return cache[key]

    return get


@pytest.fixture(scope="module")
def models():
    cache: dict[tuple[str, int], PAANet] = {}

    def get(weights: str, depth: int = 50) -> PAANet:
        if (weights, depth) not in cache:
            seed, cls_bias = TRAIN_GOLDEN_WEIGHTS[weights]
            num_classes = len(TRAIN_FIXTURE_CATEGORIES)
            model = PAANet(num_classes=num_classes, depth=depth)
            model.load_state_dict(train_state_dict(seed, cls_bias=cls_bias, num_classes=num_classes, depth=depth))
            cache[weights, depth] = model.eval()
        return cache[weights, depth]

    return get


ROUNDING = 1e-6
"""Relative size of the float32 rounding differences between CPUs' convolution kernels (AVX2 / AVX-512 / AMX)."""
ROUNDING_TRIES = 20


@pytest.fixture(scope="module")
def losses(datasets, models):
    """paadet's LossOutput for (weights, scale, file names of one batch), computed once per batch; with ``perturb=s``,
    the same with the network's outputs scaled by ``1 + ROUNDING * N(0, 1)`` (seed ``s``): the outputs another CPU's
    kernels could have given, rounding aside."""
    cache: dict[tuple, object] = {}
    loss_fn = PAALoss()

    def get(weights: str, scale, file_names: list[str], perturb: int | None = None, depth: int = 50):
        key = (weights, tuple(scale), tuple(file_names), perturb, depth)
        if key not in cache:
            dataset = datasets(scale)
            index = {name: i for i, name in enumerate(dataset.file_names)}
            batch = collate_train([dataset[index[name]] for name in file_names])
            assert batch.file_names == list(file_names) and not batch.skipped
            with torch.no_grad():
                outputs = models(weights, depth)(batch.images)
                if perturb is not None:
                    gen = torch.Generator().manual_seed(perturb)
                    outputs = [
                        [t * (1 + ROUNDING * torch.randn(t.shape, generator=gen)) for t in level] for level in outputs
                    ]
                cache[key] = (batch, loss_fn(*outputs, batch.gt_boxes, batch.gt_labels, batch.pad_shapes))
        return cache[key]

    return get


@pytest.mark.parametrize("depth", GOLDENS)
def test_golden_matches_the_fixture_and_weights(depth):
    golden = GOLDENS[depth]
    assert golden.get("depth", 50) == depth and f"paa_r{depth}_fpn_1x_coco.py" in golden["config"]
    assert golden["fixture"] == GOLDENS[50]["fixture"]
    assert all(w.get("depth", 50) == depth for w in golden["weights"].values())
    assert golden["fixture"]["classes"] == [name for _, name in TRAIN_FIXTURE_CATEGORIES]
    assert golden["fixture"]["category_ids"] == [cid for cid, _ in TRAIN_FIXTURE_CATEGORIES]
    assert {k: (v["seed"], v["cls_bias"]) for k, v in golden["weights"].items()} == TRAIN_GOLDEN_WEIGHTS
    annotated = [im["file_name"] for im in train_fixture_annotations(golden["fixture"]["seed"])["images"]]
    assert golden["annotated_images"] == annotated
    assert golden["skipped_images"] == ["img_d.png", "img_e.png"]  # no annotations; under 32 px
    assert golden["kept_images"] == [name for name in annotated if name not in golden["skipped_images"]]


def test_fixture_is_the_one_mmdetection_saw(fixture_files):
    """Same annotations and decoded pixels as when the golden file was made (else regenerate it)."""
    _, image_dir = fixture_files
    annotations = json.dumps(train_fixture_annotations(golden["fixture"]["seed"]), sort_keys=True).encode()
    assert hashlib.sha256(annotations).hexdigest() == golden["fixture"]["annotations_sha256"]
    for name, digest in golden["fixture"]["pixels_sha256"].items():
        pixels = np.ascontiguousarray(cv2.imread(os.path.join(image_dir, name), cv2.IMREAD_COLOR))
        assert hashlib.sha256(pixels.tobytes()).hexdigest() == digest, name


def test_kept_and_skipped_images(datasets):
    dataset = datasets(golden["runs"][0]["scale"])
    assert dataset.file_names == golden["kept_images"]
    assert [name for name, _ in dataset.dropped] == golden["skipped_images"]
    assert list(dataset.classes) == golden["fixture"]["classes"]
    assert list(dataset.category_ids) == golden["fixture"]["category_ids"]


@pytest.mark.parametrize("run_name", [name for name, run in RUNS.items() if run["batch_size"] == 1])
def test_parsed_boxes_and_geometry(datasets, run_name):
    run = RUNS[run_name]
    dataset = datasets(run["scale"])
    for batch in run["batches"]:
        (ref,) = batch["images"]
        sample = dataset[dataset.file_names.index(ref["file_name"])]
        assert sample.file_name == ref["file_name"]
        assert list(sample.img_shape) == ref["img_shape"]
        assert list(sample.ori_shape) == ref["ori_shape"]
        assert list(sample.scale_factor) == pytest.approx(ref["scale_factor"], rel=1e-6)
        assert collate_train([sample]).pad_shapes == [tuple(ref["pad_shape"])]
        assert sample.flipped is False
        assert sample.labels.tolist() == ref["gt_labels"], ref["file_name"]
        expected = torch.tensor(ref["gt_boxes"], dtype=torch.float64).reshape(-1, 4)
        torch.testing.assert_close(sample.boxes.double(), expected, rtol=0, atol=1e-4, msg=ref["file_name"])


def _losses_differ(out, ref: dict) -> str | None:
    """What differs between paadet's losses and the golden record's, or None (losses to 1e-4, equal positives)."""
    for key in LOSS_KEYS:
        ours = float(getattr(out, key))
        if ours != pytest.approx(ref[key], rel=1e-4, abs=1e-7):
            return f"{ref['file_names']} {key}: {ours} vs {ref[key]}"
    if out.num_pos.tolist() != [im["num_pos"] for im in ref["images"]]:
        return f"{ref['file_names']} num_pos: {out.num_pos.tolist()} vs {[im['num_pos'] for im in ref['images']]}"
    return None


ROUNDING_SENSITIVE: dict[int, list[str]] = {depth: [] for depth in GOLDENS}


def _check_losses(losses, run: dict, ref: dict) -> None:
    """paadet's losses equal the golden record's; or, for a record that sits on a knife edge (a GMM split that
    float32 rounding tips), the golden is reproduced exactly once the network's outputs move by rounding alone.

    The golden file was made on one CPU; another CPU's convolution kernels round differently (seen on a 2-core AMD
    EPYC without AVX-512: 1 of the 29 records, one GT's GMM keeping 5 positives instead of 6). At most one record in
    the file may need that, and it must then match the golden to the same tolerance.
    """
    depth = run["depth"]
    _, out = losses(run["weights"], run["scale"], ref["file_names"], depth=depth)
    differ = _losses_differ(out, ref)
    if differ is None:
        return
    tipped = [
        s
        for s in range(ROUNDING_TRIES)
        if _losses_differ(losses(run["weights"], run["scale"], ref["file_names"], perturb=s, depth=depth)[1], ref)
        is None
    ]
    assert tipped, f"{differ}, and no rounding-sized change of the network's outputs reproduces the golden"
    ROUNDING_SENSITIVE[depth].append(f"{run['name']} {ref['file_names']}")
    assert len(ROUNDING_SENSITIVE[depth]) <= 1, ROUNDING_SENSITIVE


@pytest.mark.parametrize("run_name", [name for name, run in RUNS.items() if tuple(run["scale"]) != (1333, 800)])
def test_losses_small_scale(losses, run_name):
    run = RUNS[run_name]
    for ref in run["batches"]:
        batch, _ = losses(run["weights"], run["scale"], ref["file_names"], depth=run["depth"])
        assert batch.pad_shapes == [tuple(im["pad_shape"]) for im in ref["images"]]
        assert list(batch.batch_input_shape) == ref["batch_input_shape"]
        _check_losses(losses, run, ref)


def test_losses_full_scale(losses):
    (run,) = [run for run in RUNS.values() if tuple(run["scale"]) == (1333, 800)]
    refs = [ref for ref in run["batches"] if ref["file_names"][0] in FULL_SCALE_LOSS_IMAGES]
    assert len(refs) == len(FULL_SCALE_LOSS_IMAGES)
    for ref in refs:
        _check_losses(losses, run, ref)
