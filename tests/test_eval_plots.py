"""Tests of the evaluation pictures (paadet.evaluation.plots, .curves, .matching, .examples) and `paadet eval --plots`,
on the synthetic shapes with simulated detections (no model run)."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from paadet.cli import main
from paadet.data.coco import coco_from_dict, load_coco
from paadet.data.synthetic import SyntheticSpec, generate_split
from paadet.evaluation.curves import pr_curves
from paadet.evaluation.examples import pick_examples
from paadet.evaluation.matching import CONFUSED, FOUND, MISSED, TP, ImageMatch, match_detections
from paadet.evaluation.metrics import coco_evaluate
from paadet.evaluation.plots import PLOT_FILES, draw_pr_curves, write_eval_plots

CONFUSABLE = {1: 6, 6: 1, 2: 7, 7: 2, 4: 3}
"""Shapes a simulated detector mistakes for one another (circle-ring, square-hexagon, star as triangle)."""


def simulated_detections(gt: COCO, seed: int) -> list[dict]:
    """A detector's output, simulated from the ground truth: jittered boxes (more for small objects), misses,
    class confusions, duplicates, false positives, and detections of a category without ground truth (9)."""
    rng = np.random.default_rng(seed)
    dets = []
    for a in gt.dataset["annotations"]:
        x, y, w, h = a["bbox"]
        small = w * h < 32 * 32
        if rng.random() < (0.35 if small else 0.1):
            continue
        jitter = rng.normal(0, 0.15 if small else 0.06, 4) * [w, h, w, h]
        cat = a["category_id"]
        if cat in CONFUSABLE and rng.random() < 0.2:
            cat = CONFUSABLE[cat]
        box = [x + jitter[0], y + jitter[1], w + jitter[2], h + jitter[3]]
        dets.append({"image_id": a["image_id"], "category_id": cat, "bbox": box, "score": float(rng.beta(5, 2))})
        if rng.random() < 0.1:
            dets.append({**dets[-1], "score": float(rng.beta(2, 5))})
    for image in gt.dataset["images"]:
        for _ in range(int(rng.integers(0, 4))):
            w, h = rng.uniform(8, 60, 2)
            box = [float(rng.uniform(0, 128 - w)), float(rng.uniform(0, 128 - h)), float(w), float(h)]
            cat = int(rng.integers(1, 10))
            dets.append({"image_id": image["id"], "category_id": cat, "bbox": box, "score": float(rng.beta(2, 4))})
    return dets


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, COCO]:
    """20 synthetic 128 px images; the annotation file gains a category (9) that has no box."""
    root = tmp_path_factory.mktemp("shapes")
    ann_file, image_dir = generate_split(
        root, 20, split="val", seed=5, spec=SyntheticSpec(size=128, max_objects=5, min_size=8, max_size=80)
    )
    data = json.loads(ann_file.read_text())
    data["categories"].append({"id": 9, "name": "ghost"})
    ann_file.write_text(json.dumps(data))
    gt, _ = load_coco(ann_file)
    return ann_file, image_dir, gt


def pycocotools_direct(gt: COCO, dets: list[dict]) -> COCOeval:
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator = COCOeval(gt, gt.loadRes([dict(d) for d in dets]), iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_area_under_the_drawn_curves_is_pycocotools_ap(shapes: tuple[Path, Path, COCO], seed: int) -> None:
    _, _, gt = shapes
    dets = simulated_detections(gt, seed)
    direct = pycocotools_direct(gt, dets)
    metrics = coco_evaluate(gt, dets, per_class=True)
    curves = pr_curves(metrics.arrays)
    assert 0.1 < direct.stats[0] < 0.9
    assert abs(curves.area("0.50:0.95") - direct.stats[0]) < 1e-6
    assert abs(curves.area("0.50") - direct.stats[1]) < 1e-6
    for k, name in enumerate(curves.names):  # per class: the per-class AP; the ghost class has no curve
        expected = metrics.per_class[name]
        area = curves.class_area("0.50:0.95")[k]
        assert np.isnan(area) if expected is None else abs(area - expected) < 1e-6
    assert curves.names[-1] == "ghost" and np.isnan(curves.class_area("0.50")[-1])
    # the curves are the lines drawn (write_eval_plots draws these and saves their numbers in plots.json)
    figure = draw_pr_curves(curves)
    for ax, key in zip(figure.axes, ("0.50", "0.50:0.95"), strict=True):
        np.testing.assert_array_equal(ax.lines[-1].get_ydata(), curves.all_classes[key])
        np.testing.assert_array_equal(ax.lines[-1].get_xdata(), direct.params.recThrs)
        assert len(ax.lines) == 1 + sum(not np.isnan(a) for a in curves.class_area(key))


def test_pictures_are_written_atomically_beside_metrics(shapes: tuple[Path, Path, COCO], tmp_path: Path) -> None:
    _, image_dir, gt = shapes
    dets = simulated_detections(gt, 0)
    plots = write_eval_plots(tmp_path, gt, dets, coco_evaluate(gt, dets), image_dir=image_dir)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(PLOT_FILES)  # no temporary file left behind
    assert [p.name for p in plots.files] == list(PLOT_FILES)
    for name in PLOT_FILES[:-1]:
        image = cv2.imread(str(tmp_path / name))
        assert image is not None and min(image.shape[:2]) >= 400 and image.std() > 5, name
    # without an image folder there are no examples, and nothing else changes
    other = tmp_path / "no_images"
    plots = write_eval_plots(other, gt, dets, coco_evaluate(gt, dets))
    assert sorted(p.name for p in other.iterdir()) == sorted(set(PLOT_FILES) - {"examples.jpg"})


def hand_made() -> tuple[COCO, list[dict]]:
    """Two images; categories cat (1), dog (2), bird (3: no box, no detection); a crowd of cats holding a cat."""
    anns = [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 50, 50], "area": 2500, "iscrowd": 0},  # A
        {"id": 2, "image_id": 1, "category_id": 2, "bbox": [100, 100, 40, 40], "area": 1600, "iscrowd": 0},  # B
        {"id": 3, "image_id": 1, "category_id": 1, "bbox": [200, 10, 30, 30], "area": 900, "iscrowd": 0},  # C
        {"id": 4, "image_id": 1, "category_id": 1, "bbox": [300, 300, 100, 100], "area": 1e4, "iscrowd": 1},
        {"id": 5, "image_id": 1, "category_id": 1, "bbox": [310, 310, 40, 40], "area": 1600, "iscrowd": 0},  # D
        {"id": 6, "image_id": 2, "category_id": 2, "bbox": [100, 100, 20, 10], "area": 200, "iscrowd": 0},  # E
    ]
    gt = coco_from_dict(
        {
            "images": [{"id": 1, "width": 500, "height": 500}, {"id": 2, "width": 500, "height": 500}],
            "annotations": anns,
            "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}, {"id": 3, "name": "bird"}],
        }
    )
    dets = [
        {"image_id": 1, "category_id": 1, "bbox": [11, 10, 50, 50], "score": 0.9},  # on A: true positive
        {"image_id": 1, "category_id": 1, "bbox": [12, 11, 50, 50], "score": 0.85},  # A again: false positive
        {"image_id": 1, "category_id": 1, "bbox": [100, 102, 40, 40], "score": 0.8},  # on dog B: confusion
        {"image_id": 1, "category_id": 2, "bbox": [400, 10, 20, 20], "score": 0.7},  # on nothing: false positive
        {"image_id": 1, "category_id": 1, "bbox": [311, 310, 40, 40], "score": 0.65},  # on D (inside the crowd)
        {"image_id": 1, "category_id": 1, "bbox": [320, 320, 30, 30], "score": 0.6},  # D taken; in the crowd: ignored
        {"image_id": 1, "category_id": 1, "bbox": [200, 11, 30, 30], "score": 0.2},  # on C, below 0.3
        {"image_id": 2, "category_id": 1, "bbox": [0, 0, 20, 20], "score": 0.5},  # on nothing
        {"image_id": 2, "category_id": 2, "bbox": [100, 100, 10, 10], "score": 0.75},  # on E, IoU exactly 0.5
        {"image_id": 2, "category_id": 7, "bbox": [0, 0, 20, 20], "score": 0.9},  # a category gt lacks: left out
    ]
    return gt, dets


def test_confusion_matrix_counts_a_hand_made_case() -> None:
    gt, dets = hand_made()
    matrix, images = match_detections(gt, dets, score_thr=0.3)
    #                  cat dog bird background(missed)
    expected = [
        [2, 0, 0, 1],  # cat: A and D found (D before the crowd, as pycocotools), C missed (its detection: 0.2)
        [1, 1, 0, 0],  # dog: B taken by a cat detection; E found at IoU 0.5 exactly
        [0, 0, 0, 0],  # bird
        [2, 1, 0, 0],  # background: false positives: A's duplicate and image 2's cat, the dog on nothing
    ]
    assert matrix.counts.tolist() == expected
    assert matrix.present() == [0, 1] and matrix.names == ["cat", "dog", "bird"]
    np.testing.assert_allclose(matrix.normalized()[:2], [[2 / 3, 0, 0, 1 / 3], [0.5, 0.5, 0, 0]])
    first = images[0]
    assert first.gt_status == [FOUND, CONFUSED, MISSED, FOUND] and first.missed == 2
    assert first.dt_status == [TP, "fp", CONFUSED, "fp", TP]  # the crowd's detection is not shown; 0.2 is below
    assert first.dt_scores.tolist() == [0.9, 0.85, 0.8, 0.7, 0.65]
    # a lower threshold lets C's detection in; a stricter IoU turns the shifted detections into misses
    assert match_detections(gt, dets, score_thr=0.1)[0].counts[0].tolist() == [3, 0, 0, 0]
    strict = match_detections(gt, dets, iou_thr=0.99, score_thr=0.3)[0].counts
    assert strict[:2].tolist() == [[0, 0, 0, 3], [0, 0, 0, 2]] and strict[3].tolist() == [4, 2, 0, 0]


@pytest.mark.parametrize("score_thr", [0.0, 0.5])
def test_diagonal_is_pycocotools_true_positives_at_iou_half(shapes: tuple[Path, Path, COCO], score_thr: float) -> None:
    """The diagonal counts exactly the detections that pycocotools matches at IoU 0.5 (area all, 100 detections)."""
    _, _, gt = shapes
    dets = simulated_detections(gt, 3)
    matrix, _ = match_detections(gt, dets, score_thr=score_thr)
    direct = pycocotools_direct(gt, dets)
    p = direct.params
    expected = dict.fromkeys(p.catIds, 0)
    for e in direct.evalImgs:
        if e is None or e["aRng"] != p.areaRng[0] or e["maxDet"] != p.maxDets[-1]:
            continue
        hit = (e["dtMatches"][0] > 0) & ~e["dtIgnore"][0] & (np.array(e["dtScores"]) >= score_thr)
        expected[e["category_id"]] += int(hit.sum())
    assert sum(expected.values()) > 20
    assert np.diag(matrix.counts)[:-1].tolist() == [expected[c] for c in matrix.cat_ids]
    # every non-crowd box is counted once in its row; with no threshold, every detection of a known category once
    boxes = [sum(1 for a in gt.dataset["annotations"] if a["category_id"] == c) for c in matrix.cat_ids]
    assert matrix.counts[:-1].sum(1).tolist() == boxes
    if score_thr == 0.0:
        assert matrix.counts[:, :-1].sum() == sum(1 for d in dets if d["category_id"] in gt.cats)
    assert matrix.counts[:-1, :-1].sum() - np.trace(matrix.counts) > 0  # the simulated confusions show


def test_examples_start_with_the_images_missing_most_boxes() -> None:
    def match(image_id: int, statuses: list[str]) -> ImageMatch:
        n = len(statuses)
        return ImageMatch(image_id, np.zeros((n, 4)), [1] * n, statuses, np.zeros((0, 4)), [], np.zeros(0), [])

    matches = [
        match(1, [FOUND, MISSED]),
        match(2, [MISSED, MISSED, FOUND, FOUND]),
        match(3, [MISSED, CONFUSED]),  # two missed of two: before image 2
        match(4, [FOUND]),
        match(5, []),
        match(6, [MISSED, MISSED, MISSED]),
    ]
    names = {m.image_id: f"{m.image_id}.jpg" for m in matches}
    picked = pick_examples(matches, names, worst=3, samples=2)
    assert [(e.match.image_id, e.kind) for e in picked] == [
        (6, "worst"),
        (3, "worst"),
        (2, "worst"),
        (1, "sample"),
        (5, "sample"),
    ]


def test_cli_plots_in_results_mode(shapes: tuple[Path, Path, COCO], tmp_path: Path) -> None:
    ann_file, image_dir, gt = shapes
    dets = simulated_detections(gt, 1)
    results = tmp_path / "dets.json"
    results.write_text(json.dumps(dets))
    out = tmp_path / "run"
    args = ["eval", "--results", str(results), "--ann", str(ann_file), "--output-dir", str(out)]
    assert main([*args, "--images", str(image_dir), "--plots", "--plot-score-thr", "0.4"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["plots"] == {"files": list(PLOT_FILES), "iou_thr": 0.5, "score_thr": 0.4}
    saved = json.loads((out / "plots.json").read_text())
    assert abs(saved["pr_curves"]["AP"]["0.50:0.95"] - metrics["AP"]) < 1e-6
    assert abs(np.mean(saved["pr_curves"]["all_classes"]["0.50"]) - metrics["AP50"]) < 1e-6
    assert saved["confusion_matrix"]["counts"] == match_detections(gt, dets, score_thr=0.4)[0].counts.tolist()
    worst = max(m.missed for m in match_detections(gt, dets, score_thr=0.4)[1])
    assert saved["examples"][0]["kind"] == "worst" and saved["examples"][0]["missed"] == worst
    # a run without --plots in the same folder removes the pictures, which would describe other detections
    assert main(args) == 0
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json"]
    assert "plots" not in json.loads((out / "metrics.json").read_text())
    # an input among the files --output-dir would replace is refused, and kept
    (out / "plots.json").write_text(json.dumps(dets))
    assert main(["eval", "--results", str(out / "plots.json"), "--ann", str(ann_file), "--output-dir", str(out)]) == 2
    assert json.loads((out / "plots.json").read_text()) == dets


def test_cli_plots_refusals(
    shapes: tuple[Path, Path, COCO], tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    ann_file, _, _ = shapes
    results = tmp_path / "dets.json"
    results.write_text("[]")
    args = ["eval", "--results", str(results), "--ann", str(ann_file), "--plots"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--plots needs --output-dir" in err[0]
    assert main([*args, "--output-dir", str(tmp_path / "a"), "--images", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nowhere: image folder not found" in err[0]
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else find_spec(name))
    assert main([*args, "--output-dir", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'paadet[plots]'" in err[0]
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # refused before any work


def test_curves_need_pycocotools_arrays(shapes: tuple[Path, Path, COCO]) -> None:
    _, _, gt = shapes
    arrays = coco_evaluate(gt, []).arrays
    curves = pr_curves(arrays)
    assert curves.area("0.50:0.95") == 0.0  # no detections: every curve of a class with boxes is 0
    arrays.area_labels = ["small", "medium"]
    with pytest.raises(ValueError, match="no area range 'all'"):
        pr_curves(arrays)
