"""Test-time augmentation (``--tta``): its views, the flip's mapping back, the merge by NMS and score voting over
every view's candidates, the flags of predict / eval / bench / serve, and its refusal on the graph backends.

Seeded weights on small images (a 192x128 preset), one PyTorch thread.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from paadet.cli import build_parser, main
from paadet.data.synthetic import SHAPES, SyntheticSpec, generate_split, synthetic_image
from paadet.detector import Detector
from paadet.model.seeded import seeded_net, seeded_state_dict
from paadet.postprocess import PostprocessConfig
from paadet.preprocess import PRESETS, Preset, resize
from paadet.runtime.base import StageTimer
from paadet.runtime.registry import torch_backend
from paadet.runtime.spec import DetectorSpec
from paadet.runtime.tta import TTAOptions, View, parse_scales
from paadet.runtime.tta_backend import TTABackend

SMALL = Preset("small", (192, 128))


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def net():
    return seeded_net(0)


def detector(net, tta: TTAOptions | None, batch_size: int = 1, score_voting: bool = True) -> Detector:
    return Detector(torch_backend(net, DetectorSpec(tta=tta, score_voting=score_voting), SMALL), batch_size)


def view_candidates(backend: TTABackend, view: View, image: np.ndarray):
    [(indices, candidates)] = list(backend.view_candidates(view, [image], StageTimer()))
    assert indices == [0]
    return candidates.boxes[0].numpy(), candidates.nms_scores[0].numpy()


def mirror(boxes: np.ndarray, width: float) -> np.ndarray:
    return np.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], axis=1)


# ---------------------------------------------------------------------------------------------------- views


def test_default_views_are_three_scales_each_flipped_around_the_preset() -> None:
    base = PRESETS["mmdet"]
    views = TTAOptions().views(base)
    assert [(v.preset.scale, v.flip) for v in views] == [
        ((1066, 640), False),
        ((1066, 640), True),
        ((1333, 800), False),
        ((1333, 800), True),
        ((1600, 960), False),
        ((1600, 960), True),
    ]
    assert views[2].preset is base  # the preset's own scale keeps the preset itself (its padding too)
    assert views[0].preset.size_divisor == 32 and views[0].preset.fixed_size is None
    fixed = TTAOptions((0.5, 1.0), flip=False).views(PRESETS["800"])
    assert fixed[1].preset is PRESETS["800"] and fixed[0].preset.scale == (400, 400) and fixed[0].preset.size_divisor


def test_scales_parse_factors_and_sizes_and_refuse_the_rest() -> None:
    assert parse_scales("1333x640, 1333x800,0.5") == ((1333, 640), (1333, 800), 0.5)
    assert TTAOptions(parse_scales("1,1333x800")).sizes(PRESETS["mmdet"]) == [(1333, 800)]  # no repeats
    for text, message in [
        ("", "no scale"),
        ("big", "neither a factor"),
        ("13x", "not a size"),
        ("0", r"in \(0, 4\]"),
        ("nan", r"in \(0, 4\]"),
        ("5", r"in \(0, 4\]"),
        ("0x800", "two sides >= 1"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse_scales(text)


# ------------------------------------------------------------------------------------------ one view, flips


def test_one_view_at_the_preset_scale_without_flip_is_exactly_the_plain_detection(net) -> None:
    images = [synthetic_image(100, 150, seed=3), synthetic_image(120, 90, seed=4), synthetic_image(100, 150, seed=5)]
    plain = detector(net, None, batch_size=2).predict(images)
    one = detector(net, TTAOptions((1.0,), flip=False), batch_size=2).predict(images)
    assert sum(len(r.scores) for r in plain) > 50
    for a, b in zip(plain, one, strict=True):
        assert np.array_equal(a.boxes, b.boxes) and np.array_equal(a.scores, b.scores)
        assert np.array_equal(a.labels, b.labels) and a.ori_shape == b.ori_shape


def test_a_flipped_view_of_a_symmetric_image_mirrors_the_plain_view(net) -> None:
    half = synthetic_image(128, 96, seed=7)
    image = np.ascontiguousarray(np.concatenate([half, half[:, ::-1]], axis=1))  # 128 x 192, symmetric
    backend = detector(net, TTAOptions((1.0,))).backend
    boxes, scores = view_candidates(backend, View(SMALL, False), image)
    flipped_boxes, flipped_scores = view_candidates(backend, View(SMALL, True), image)
    assert len(scores) > 100 and (scores > 0.05).sum() > 50
    assert np.array_equal(flipped_scores, scores)  # the same input, so the same network outputs
    np.testing.assert_allclose(flipped_boxes, mirror(boxes, 192.0), atol=1e-4)
    assert not np.allclose(flipped_boxes, boxes, atol=1.0)  # mapped back: not the plain view's boxes


def test_a_flipped_view_is_the_mirrored_image_seen_as_is_and_mapped_back(net) -> None:
    image = synthetic_image(110, 170, seed=8)  # resized to 124 x 192 by the view
    backend = detector(net, TTAOptions((1.0,))).backend
    flipped_boxes, flipped_scores = view_candidates(backend, View(SMALL, True), image)
    mirrored_image = np.ascontiguousarray(image[:, ::-1])
    resized, _ = resize(image, SMALL)
    resized_mirror, _ = resize(mirrored_image, SMALL)
    boxes, scores = view_candidates(backend, View(SMALL, False), mirrored_image)
    if np.array_equal(resized[:, ::-1], resized_mirror):  # OpenCV's resize commutes with the flip here
        assert np.array_equal(flipped_scores, scores)
    np.testing.assert_allclose(flipped_scores, scores, atol=1e-4)
    np.testing.assert_allclose(flipped_boxes, mirror(boxes, 170.0), atol=0.05)


# ------------------------------------------------------------------------------------------------ the merge


def reference_voting(det_boxes, det_labels, cand_boxes, cand_scores, config: PostprocessConfig) -> np.ndarray:
    """PAA's score voting as mmdetection's ``score_voting`` loops it, in float64, over ``cand`` (``[A, 4]``,
    ``[A, C]``): every (anchor, class) pair above ``score_thr`` is a candidate of its class."""
    out = []
    for box, label in zip(det_boxes.astype(np.float64), det_labels, strict=True):
        use = cand_scores[:, label] > config.score_thr
        boxes, scores = cand_boxes[use].astype(np.float64), cand_scores[use, label].astype(np.float64)
        lt, rb = np.maximum(box[:2], boxes[:, :2]), np.minimum(box[2:], boxes[:, 2:])
        inter = np.prod(np.clip(rb - lt, 0, None), axis=1)
        areas = np.prod(boxes[:, 2:] - boxes[:, :2], axis=1)
        iou = inter / np.maximum(np.prod(box[2:] - box[:2]) + areas - inter, 1e-6)
        keep = iou > config.voting_iou_thr
        w = np.exp(-((1 - iou[keep]) ** 2) / config.voting_sigma) * scores[keep]
        out.append((w[:, None] * boxes[keep]).sum(0) / w.sum())
    return np.array(out)


def test_the_merge_is_one_nms_and_score_voting_over_every_views_candidates(net) -> None:
    image = synthetic_image(100, 150, seed=3)
    options = TTAOptions((0.75, 1.0))
    voted = detector(net, options).predict([image])[0]
    unvoted = detector(net, options, score_voting=False).predict([image])[0]
    # the same NMS (same winners, scores and order); voting then moves the boxes
    assert len(voted.scores) == len(unvoted.scores) == 100
    assert np.array_equal(voted.scores, unvoted.scores) and np.array_equal(voted.labels, unvoted.labels)
    backend = detector(net, options).backend
    per_view = [view_candidates(backend, view, image) for view in backend.views]
    assert len(per_view) == 4
    cand_boxes = np.concatenate([b for b, _ in per_view])
    cand_scores = np.concatenate([s for _, s in per_view])
    expected = reference_voting(unvoted.boxes, unvoted.labels, cand_boxes, cand_scores, PostprocessConfig())
    np.testing.assert_allclose(voted.boxes, expected, rtol=1e-4, atol=1e-3)
    # ... over the union: voting within the winner's own view alone gives other boxes
    with np.errstate(invalid="ignore"):  # a winner with no partner in that view votes 0 / 0
        own = reference_voting(unvoted.boxes, unvoted.labels, *per_view[0], PostprocessConfig())
    assert np.nanmax(np.abs(own - expected)) > 0.5
    # and NMS ran over the union: every winner is a candidate of some view, and they come from several views
    from_views = [int(np.isclose(unvoted.boxes[:, None], b[None]).all(-1).any(-1).sum()) for b, _ in per_view]
    assert sum(from_views) >= len(unvoted.scores) and sum(1 for n in from_views if n) >= 2


# -------------------------------------------------------------------------------------------- the commands


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """An 8-class checkpoint trained at the small preset (seeded weights), and 2 synthetic 128-pixel images."""
    root = tmp_path_factory.mktemp("tta")
    checkpoint = root / "seeded.pth"
    meta = {"dataset_meta": {"classes": list(SHAPES)}, "preset": SMALL.to_meta()}
    torch.save({"meta": meta, "state_dict": seeded_state_dict(0, cls_bias=-6.0, num_classes=8)}, checkpoint)
    ann, images = generate_split(root / "val", 2, split="val", spec=SyntheticSpec(size=128, max_size=100.0))
    return {"checkpoint": checkpoint, "ann": ann, "images": images, "root": root}


TTA_FLAGS = ["--tta-scales", "0.75,1", "--no-tta-flip"]


def test_predict_with_tta(data: dict[str, Path]) -> None:
    out = data["root"] / "predict" / "r.json"
    args = ["predict", str(data["images"]), "--checkpoint", str(data["checkpoint"]), "--output", str(out)]
    assert main([*args, *TTA_FLAGS, "--no-progress"]) == 0
    entries = json.loads(out.read_text())
    spec = DetectorSpec(checkpoint=str(data["checkpoint"]), tta=TTAOptions((0.75, 1.0), flip=False))
    expected = Detector.from_spec(spec).predict(sorted(data["images"].glob("*.jpg")))
    assert len(entries) == sum(len(r.scores) for r in expected) > 0
    plain = data["root"] / "predict" / "plain.json"
    assert main([*args[:-1], str(plain), "--no-progress"]) == 0
    assert json.loads(plain.read_text()) != entries


def test_eval_with_tta_records_its_views(data: dict[str, Path]) -> None:
    out = data["root"] / "eval"
    args = ["eval", "--checkpoint", str(data["checkpoint"]), "--ann", str(data["ann"]), "--images", str(data["images"])]
    assert main([*args, "--tta", "--output-dir", str(out), "--no-progress"]) == 0
    saved = json.loads((out / "metrics.json").read_text())
    assert "6 views" in saved["settings"]["tta"] and saved["images"]["evaluated"] == 2
    assert main([*args, "--output-dir", str(out), "--no-progress", "--resume"]) == 2  # other settings


def test_bench_with_tta(data: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    out = data["root"] / "bench.json"
    args = ["bench", "--checkpoint", str(data["checkpoint"]), "--preset", "mmdet", "--iters", "1", "--warmup", "0"]
    assert main([*args, "--tta-scales", "0.1,0.15", "--skip-engine", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["backend"] == "torch" and "tta" in json.dumps(report)
    assert report["e2e"]["images"] == 1


@pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`")
def test_serve_with_tta_answers_as_predict(data: dict[str, Path]) -> None:
    from starlette.testclient import TestClient

    from paadet.commands import serve as serve_command
    from paadet.serve.app import create_app

    args = build_parser("serve").parse_args(["serve", "--checkpoint", str(data["checkpoint"]), *TTA_FLAGS])
    spec = serve_command.MODEL.spec(args)
    assert spec.tta == TTAOptions((0.75, 1.0), flip=False)
    path = sorted(data["images"].glob("*.jpg"))[0]
    expected = Detector.from_spec(spec).predict([path])[0]
    with TestClient(create_app(Detector.from_spec(spec))) as client:
        deadline = time.monotonic() + 120
        while client.get("/readyz").status_code != 200 and time.monotonic() < deadline:  # warming up
            time.sleep(0.2)
        answer = client.post("/v1/detect", content=path.read_bytes())
    assert answer.status_code == 200, answer.text
    detections = answer.json()["detections"]
    assert len(detections) == len(expected.scores) > 0
    np.testing.assert_allclose([d["score"] for d in detections], expected.scores, rtol=1e-5)


def test_graph_backends_refuse_tta_in_one_line(data: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    graph = data["root"] / "paa.onnx"
    graph.write_bytes(b"not read: the flags are refused first")
    for backend in ("onnxruntime", "openvino"):
        args = ["predict", str(data["images"]), "--backend", backend, "--model", str(graph), "--tta"]
        assert main([*args, "--output", str(data["root"] / "x.json")]) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(err) == 1 and "--tta is for --backend torch" in err[0] and "candidates" in err[0]
    with pytest.raises(ValueError, match="--tta is for --backend torch"):
        DetectorSpec(backend="onnxruntime", model="m.onnx", tta=TTAOptions()).validate()
    assert main(["predict", str(data["images"]), "--no-tta-flip", "--output", str(data["root"] / "y.json")]) == 2
    assert "--no-tta-flip needs --tta" in capsys.readouterr().err


def test_images_given_resized_are_refused(net) -> None:
    backend = detector(net, TTAOptions()).backend
    resized, meta = resize(synthetic_image(100, 150, seed=3), SMALL)
    with pytest.raises(ValueError, match="at their own size"):
        backend.infer([resized], [meta])
    assert backend.preset.native
