"""Parity with mmdetection 3.3's ``paa_r101_fpn_1x_coco``: detections on generated images for seeded R-101 weights.

``tests/golden/mmdet_golden_r101.json`` was written by ``tools/make_golden.py --depth 101`` running mmdetection
3.3 (mmcv 2.1, torch CPU) on ``seeded_state_dict(seed, cls_bias, depth=101)``; the weights are regenerated here.
Rules: the torch backend matches every reference detection (same label, box IoU >= 0.99, |score difference|
<= 1e-4) with no extra one; the end-to-end ONNX export (preset 800) on ONNX Runtime matches at least 99.5% with at
most 0.5% extra. The network is sized from the checkpoint's keys: no flag says R-101.
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
from paadet.compare import MatchReport, match_detections
from paadet.data.synthetic import synthetic_image
from paadet.model import PAANet
from paadet.model.seeded import seeded_state_dict
from paadet.postprocess import PAAPostprocess, PostprocessConfig
from paadet.preprocess import collate, get_preset, preprocess
from paadet.runtime.graph_info import read_export_info

GOLDEN = json.loads((Path(__file__).parent / "golden" / "mmdet_golden_r101.json").read_text())


@cache
def state_dict(case: str) -> dict[str, torch.Tensor]:
    spec = GOLDEN["cases"][case]
    return seeded_state_dict(spec["seed"], cls_bias=spec["cls_bias"], depth=101)


@cache
def network(case: str) -> PAANet:
    net = PAANet(depth=101)
    net.load_state_dict(state_dict(case), strict=True)
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


def refs_of(case: str, preset: str, voting: bool = True) -> list[dict]:
    return [r for r in GOLDEN["results"] if (r["case"], r["preset"], r["score_voting"]) == (case, preset, voting)]


def test_golden_is_mmdetections_r101() -> None:
    """The file says which config made it, and its weights have R-101's 675 keys (23 blocks in ``layer3``)."""
    assert GOLDEN["depth"] == 101 and GOLDEN["config"] == "paa_r101_fpn_1x_coco.py"
    keys = state_dict("dense")
    assert len(keys) == 675 and "backbone.layer3.22.conv3.weight" in keys


@pytest.mark.parametrize("ref", GOLDEN["results"], ids=[result_id(r) for r in GOLDEN["results"]])
def test_torch_matches_mmdetection(ref: dict) -> None:
    im = ref["image"]
    (cls, box, iou), img_shapes, scale_factors, meta = raw_outputs(
        ref["case"], ref["preset"], im["height"], im["width"], im["seed"]
    )
    assert list(meta.img_shape) == ref["img_shape"][:2]
    dets = PAAPostprocess(PostprocessConfig(score_voting=ref["score_voting"]))(cls, box, iou, img_shapes, scale_factors)
    n = int(dets.num_dets[0])
    report = match_detections(
        ref["boxes"], ref["scores"], ref["labels"], dets.boxes[0, :n], dets.scores[0, :n], dets.labels[0, :n]
    )
    assert report.reference == len(ref["scores"])
    assert report.matched == report.reference, str(report)
    assert report.extra == 0, str(report)


def test_golden_exercises_nms_voting_and_short_lists() -> None:
    """Hard cases: 100 detections out of thousands of candidates, voting moves boxes, and some images have < 100."""
    voted, plain = refs_of("dense", "mmdet", True)[0], refs_of("dense", "mmdet", False)[0]
    assert len(voted["scores"]) == 100
    shift = np.abs(np.array(sorted(map(tuple, voted["boxes"]))) - np.array(sorted(map(tuple, plain["boxes"])))).max()
    assert shift > 0.5
    assert all(0 < len(r["scores"]) < 100 for r in refs_of("sparse", "mmdet"))
    assert {r["preset"] for r in GOLDEN["results"]} == {"mmdet", "800"}
    assert {r["score_voting"] for r in GOLDEN["results"]} == {True, False}


def save_mmdet_checkpoint(case: str, path: Path) -> Path:
    """The weights in mmdetection's file layout (``meta`` + ``state_dict``), nothing saying R-101."""
    meta = {"mmdet_version": "3.3.0", "epoch": 12, "iter": 87960}
    torch.save({"meta": meta, "state_dict": state_dict(case)}, path)
    return path


def write_images(refs: list[dict], folder: Path) -> Path:
    """The golden images as PNG files (lossless, so pixels are equal) named ``img<seed>.png``."""
    folder.mkdir()
    for r in refs:
        im = r["image"]
        cv2.imwrite(str(folder / f"img{im['seed']}.png"), synthetic_image(im["height"], im["width"], seed=im["seed"]))
    return folder


def match_results_json(results_json: Path, refs: list[dict]) -> MatchReport:
    """``paadet predict``'s COCO results entries against the references, summed over the images."""
    entries = json.loads(results_json.read_text())
    total = MatchReport()
    for r in refs:
        mine = [e for e in entries if e["file_name"] == f"img{r['image']['seed']}.png"]
        boxes = [[x, y, x + w, y + h] for x, y, w, h in (e["bbox"] for e in mine)]
        labels = [LABEL_OF_CATEGORY[e["category_id"]] for e in mine]
        total += match_detections(r["boxes"], r["scores"], r["labels"], boxes, [e["score"] for e in mine], labels)
    assert total.reference == sum(len(r["scores"]) for r in refs) > 0
    assert total.ours == len(entries)
    return total


def test_predict_cli_on_mmdetection_checkpoint_matches(tmp_path: Path) -> None:
    """``paadet predict IMAGES --checkpoint R101.pth --preset mmdet --output r.json``: 100% matched, no extra."""
    checkpoint = save_mmdet_checkpoint("sparse", tmp_path / "r101.pth")
    refs = refs_of("sparse", "mmdet")
    folder = write_images(refs, tmp_path / "images")
    out = tmp_path / "r.json"
    argv = ["predict", str(folder), "--checkpoint", str(checkpoint), "--preset", "mmdet", "--output", str(out)]
    assert main(argv) == 0
    report = match_results_json(out, refs)
    assert report.matched == report.reference and report.extra == 0, str(report)


def test_onnxruntime_export_at_800_matches(tmp_path: Path) -> None:
    """``paadet export --preset 800`` (end to end, score voting inside), then ``paadet predict --backend onnxruntime``:
    at least 99.5% of mmdetection's detections matched, at most 0.5% extra; the graph records R-101."""
    checkpoint = save_mmdet_checkpoint("dense", tmp_path / "r101.pth")
    model = tmp_path / "paa_r101.onnx"
    export = ["export", "--checkpoint", str(checkpoint), "--preset", "800", "--output", str(model), "--no-verify"]
    assert main(export) == 0
    info = read_export_info(model)
    assert (info.depth, info.architecture, info.preset.name, info.graph) == (101, "PAA R101-FPN", "800", "full")
    refs = refs_of("dense", "800")
    folder = write_images(refs, tmp_path / "images")
    out = tmp_path / "r.json"
    assert main(["predict", str(folder), "--backend", "onnxruntime", "--model", str(model), "--output", str(out)]) == 0
    total = match_results_json(out, refs)
    assert total.matched_fraction >= 0.995, str(total)
    assert total.extra <= 0.005 * total.reference, str(total)
