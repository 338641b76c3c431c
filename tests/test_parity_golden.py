"""Parity with mmdetection 3.3: detections on generated images for seeded random checkpoints.

``tests/golden/mmdet_golden.json`` was written by ``tools/make_golden.py`` running mmdetection 3.3
(mmcv 2.1, torch 2.13 CPU). The weights are regenerated here from the same seeds. Rule: every
reference detection is matched by one of ours with the same label, box IoU >= 0.99 and
|score difference| <= 1e-4, and we output no extra ones.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from paadet.classes import LABEL_OF_CATEGORY
from paadet.cli import main
from paadet.compare import match_detections
from paadet.data.synthetic import synthetic_image
from paadet.model import PAANet
from paadet.model.seeded import seeded_state_dict
from paadet.postprocess import PAAPostprocess, PostprocessConfig
from paadet.preprocess import collate, get_preset, preprocess, resize
from paadet.runtime.torch_backend import TorchBackend

GOLDEN = json.loads((Path(__file__).parent / "golden" / "mmdet_golden.json").read_text())


@cache
def network(case: str) -> PAANet:
    spec = GOLDEN["cases"][case]
    net = PAANet()
    net.load_state_dict(seeded_state_dict(spec["seed"], cls_bias=spec["cls_bias"]), strict=True)
    return net


@cache
def raw_outputs(case: str, preset: str, height: int, width: int, seed: int):
    tensor, meta = preprocess(synthetic_image(height, width, seed=seed), get_preset(preset))
    images, img_shapes, scale_factors = collate([tensor], [meta])
    with torch.inference_mode():
        return network(case)(images), img_shapes, scale_factors, meta


def result_id(r: dict) -> str:
    im = r["image"]
    return f"{r['case']}-{r['preset']}-{'vote' if r['score_voting'] else 'novote'}-{im['height']}x{im['width']}"


@pytest.mark.parametrize("ref", GOLDEN["results"], ids=[result_id(r) for r in GOLDEN["results"]])
def test_matches_mmdetection(ref: dict) -> None:
    im = ref["image"]
    (cls, box, iou), img_shapes, scale_factors, meta = raw_outputs(
        ref["case"], ref["preset"], im["height"], im["width"], im["seed"]
    )
    assert list(meta.img_shape) == ref["img_shape"][:2]
    post = PAAPostprocess(PostprocessConfig(score_voting=ref["score_voting"]))
    dets = post(cls, box, iou, img_shapes, scale_factors)
    n = int(dets.num_dets[0])
    report = match_detections(
        ref["boxes"], ref["scores"], ref["labels"], dets.boxes[0, :n], dets.scores[0, :n], dets.labels[0, :n]
    )
    assert report.reference == len(ref["scores"])
    assert report.matched == report.reference, str(report)
    assert report.extra == 0, str(report)


def test_optimized_cpu_network_keeps_parity() -> None:
    """``optimize=True`` (traced, frozen, BatchNorm folded) changes logits by ~1e-5; detections still meet the rule."""
    backend = TorchBackend(network("dense"), preset="mmdet", optimize=True)
    refs = [r for r in GOLDEN["results"] if r["case"] == "dense" and r["preset"] == "mmdet" and r["score_voting"]]
    for ref in refs:
        im = ref["image"]
        resized, meta = resize(synthetic_image(im["height"], im["width"], seed=im["seed"]), "mmdet")
        dets = backend.infer([resized], [meta])
        n = int(dets.num_dets[0])
        report = match_detections(
            ref["boxes"], ref["scores"], ref["labels"], dets.boxes[0, :n], dets.scores[0, :n], dets.labels[0, :n]
        )
        assert report.matched == report.reference and report.extra == 0, str(report)
    assert backend.describe()["optimize"]


def test_golden_exercises_nms_and_voting() -> None:
    """The golden cases are hard ones: many candidates, voting moves boxes, and some images have < 100 detections."""
    by_key = {(r["case"], r["preset"], r["score_voting"], r["image"]["seed"]): r for r in GOLDEN["results"]}
    voted = by_key[("dense", "mmdet", True, 1)]
    plain = by_key[("dense", "mmdet", False, 1)]
    assert len(voted["scores"]) == 100
    shift = np.abs(np.array(sorted(map(tuple, voted["boxes"]))) - np.array(sorted(map(tuple, plain["boxes"])))).max()
    assert shift > 0.5
    assert min(len(r["scores"]) for r in GOLDEN["results"]) < 100
    assert len({label for r in GOLDEN["results"] for label in r["labels"]}) >= 5


def save_checkpoint(case: str, path: Path) -> Path:
    spec = GOLDEN["cases"][case]
    torch.save({"meta": {}, "state_dict": seeded_state_dict(spec["seed"], cls_bias=spec["cls_bias"])}, path)
    return path


def write_images(refs: list[dict], folder: Path) -> Path:
    """The golden images as PNG files (lossless, so pixels are equal) named ``img<seed>.png``."""
    folder.mkdir()
    for r in refs:
        im = r["image"]
        cv2.imwrite(str(folder / f"img{im['seed']}.png"), synthetic_image(im["height"], im["width"], seed=im["seed"]))
    return folder


def assert_results_json_matches(results_json: Path, refs: list[dict]) -> None:
    entries = json.loads(results_json.read_text())
    for r in refs:
        mine = [e for e in entries if e["file_name"] == f"img{r['image']['seed']}.png"]
        boxes = [[x, y, x + w, y + h] for x, y, w, h in (e["bbox"] for e in mine)]
        labels = [LABEL_OF_CATEGORY[e["category_id"]] for e in mine]
        report = match_detections(r["boxes"], r["scores"], r["labels"], boxes, [e["score"] for e in mine], labels)
        assert report.matched == report.reference == len(mine), str(report)


def test_predict_cli_json_matches_mmdetection(tmp_path: Path) -> None:
    """The same parity through ``paadet predict``'s COCO JSON on PNG files."""
    checkpoint = save_checkpoint("sparse", tmp_path / "sparse.pth")
    refs = [r for r in GOLDEN["results"] if r["case"] == "sparse" and r["score_voting"]]
    folder = write_images(refs, tmp_path / "images")
    out = tmp_path / "results.json"
    assert (
        main(["predict", str(folder), "--checkpoint", str(checkpoint), "--output", str(out), "--batch-size", "2"]) == 0
    )
    assert_results_json_matches(out, refs)


def test_onnxruntime_export_and_predict_match_mmdetection(tmp_path: Path) -> None:
    """``paadet export`` (full graph, FP32) then ``paadet predict --backend onnxruntime``: the same parity rule."""
    checkpoint = save_checkpoint("dense", tmp_path / "dense.pth")
    model = tmp_path / "paa.onnx"
    assert (
        main(
            [
                "export",
                "--checkpoint",
                str(checkpoint),
                "--preset",
                "mmdet",
                "--dynamic-batch",
                "--output",
                str(model),
                "--no-verify",
            ]
        )
        == 0
    )
    refs = [r for r in GOLDEN["results"] if r["case"] == "dense" and r["preset"] == "mmdet" and r["score_voting"]]
    folder = write_images(refs, tmp_path / "images")
    out = tmp_path / "results.json"
    assert main(["predict", str(folder), "--backend", "onnxruntime", "--model", str(model), "--output", str(out)]) == 0
    assert_results_json_matches(out, refs)
