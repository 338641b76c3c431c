"""Tests for COCO scoring (paadet.evaluation.run), dataset loading (paadet.data.coco) and `paadet eval`
without a model."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from paadet.cli import main
from paadet.data.coco import CocoDataset, DatasetError, resolve_layout
from paadet.evaluation.metrics import METRIC_KEYS, ResultsError, evaluate_results_file, format_metrics

CATEGORIES = [
    {"id": 1, "name": "person"},
    {"id": 3, "name": "car"},
    {"id": 18, "name": "dog"},
    {"id": 90, "name": "toothbrush"},
]


def make_annotations(num_images: int = 6, seed: int = 0) -> dict:
    """A COCO instances dict with boxes of all three size ranges, a crowd box, and an image without boxes."""
    rng = np.random.default_rng(seed)
    images, anns = [], []
    sizes = [(8, 12), (20, 30), (50, 40), (120, 90), (200, 150)]  # small, small, medium, large, large
    for i in range(num_images):
        image_id = 100 + 7 * i  # not contiguous, not starting at 1
        images.append({"id": image_id, "file_name": f"img_{image_id}.png", "width": 640, "height": 480})
        if i == num_images - 1:
            continue
        for _k in range(int(rng.integers(2, 6))):
            w, h = sizes[int(rng.integers(0, len(sizes)))]
            x, y = float(rng.uniform(0, 640 - w)), float(rng.uniform(0, 480 - h))
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": image_id,
                    "category_id": CATEGORIES[int(rng.integers(0, 4))]["id"],
                    "bbox": [x, y, float(w), float(h)],
                    "area": float(w * h),
                    "iscrowd": 0,
                }
            )
    anns.append(
        {
            "id": len(anns) + 1,
            "image_id": images[0]["id"],
            "category_id": 1,
            "bbox": [300.0, 200.0, 150.0, 150.0],
            "area": 22500.0,
            "iscrowd": 1,
        }
    )
    return {"images": images, "annotations": anns, "categories": CATEGORIES}


def perfect(ann: dict) -> list[dict]:
    return [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": list(a["bbox"]), "score": 1.0}
        for a in ann["annotations"]
        if not a["iscrowd"]
    ]


def perturbed(ann: dict, seed: int) -> list[dict]:
    """Jittered boxes, random scores, dropped boxes, wrong classes, duplicates and false positives."""
    rng = np.random.default_rng(seed)
    out = []
    for a in ann["annotations"]:
        if rng.random() < 0.15:
            continue
        x, y, w, h = a["bbox"]
        jitter = rng.normal(0, 0.12, 4) * [w, h, w, h]
        cat = a["category_id"] if rng.random() > 0.1 else CATEGORIES[int(rng.integers(0, 4))]["id"]
        box = [x + jitter[0], y + jitter[1], max(1.0, w + jitter[2]), max(1.0, h + jitter[3])]
        out.append({"image_id": a["image_id"], "category_id": cat, "bbox": box, "score": float(rng.uniform(0.05, 1))})
        if rng.random() < 0.2:
            out.append(
                {
                    "image_id": a["image_id"],
                    "category_id": cat,
                    "bbox": [v + 2 for v in box],
                    "score": float(rng.uniform(0.05, 1)),
                }
            )
    for _ in range(15):
        image = ann["images"][int(rng.integers(0, len(ann["images"])))]
        w, h = rng.uniform(5, 150, 2)
        out.append(
            {
                "image_id": image["id"],
                "category_id": CATEGORIES[int(rng.integers(0, 4))]["id"],
                "bbox": [float(rng.uniform(0, 400)), float(rng.uniform(0, 300)), float(w), float(h)],
                "score": float(rng.uniform(0.05, 0.6)),
            }
        )
    return out


def pycocotools_direct(ann_file: Path, results_file: Path, img_ids: list[int] | None = None) -> COCOeval:
    """COCOeval exactly as its README runs it."""
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(ann_file))
        dt = gt.loadRes(str(results_file))
        ev = COCOeval(gt, dt, "bbox")
        if img_ids is not None:
            ev.params.imgIds = img_ids
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev


def write_json(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj))
    return path


@pytest.fixture
def ann_file(tmp_path: Path) -> Path:
    return write_json(tmp_path / "instances.json", make_annotations())


def test_ground_truth_as_detections_scores_one(tmp_path: Path, ann_file: Path) -> None:
    results = write_json(tmp_path / "dets.json", perfect(json.loads(ann_file.read_text())))
    metrics = evaluate_results_file(results, ann_file)
    for key in METRIC_KEYS:
        if key != "AR1":  # an image has several boxes of one class: one detection cannot recall them all
            assert metrics.stats[key] == pytest.approx(1.0, abs=1e-12), key
    assert 0.5 < metrics.stats["AR1"] < 1.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_perturbed_detections_equal_pycocotools(tmp_path: Path, seed: int) -> None:
    ann = make_annotations(num_images=8, seed=seed)
    ann_file = write_json(tmp_path / "instances.json", ann)
    results = write_json(tmp_path / "dets.json", perturbed(ann, seed))
    metrics = evaluate_results_file(results, ann_file, per_class=True)
    direct = pycocotools_direct(ann_file, results)
    assert 0.05 < metrics.stats["AP"] < 0.95
    np.testing.assert_allclose([metrics.stats[k] for k in METRIC_KEYS], direct.stats, rtol=0, atol=1e-6)
    precision = direct.eval["precision"]
    for k, cat_id in enumerate(direct.params.catIds):
        p = precision[:, :, k, 0, -1]
        name = direct.cocoGt.cats[cat_id]["name"]
        expected = float(np.mean(p[p > -1])) if (p > -1).any() else None
        assert (
            metrics.per_class[name] == pytest.approx(expected, abs=1e-12)
            if expected is not None
            else metrics.per_class[name] is None
        )


def test_limit_evaluates_only_the_first_images(tmp_path: Path) -> None:
    ann = make_annotations(num_images=8, seed=3)
    ann_file = write_json(tmp_path / "instances.json", ann)
    results = write_json(tmp_path / "dets.json", perturbed(ann, 3))
    metrics = evaluate_results_file(results, ann_file, limit=3)
    first = sorted(im["id"] for im in ann["images"])[:3]
    direct = pycocotools_direct(ann_file, results, img_ids=first)
    assert metrics.num_images == 3
    np.testing.assert_allclose([metrics.stats[k] for k in METRIC_KEYS], direct.stats, rtol=0, atol=1e-6)
    everything = pycocotools_direct(ann_file, results)
    assert not np.allclose(everything.stats, direct.stats)


def test_empty_results_score_zero(tmp_path: Path, ann_file: Path) -> None:
    metrics = evaluate_results_file(write_json(tmp_path / "dets.json", []), ann_file)
    assert metrics.stats["AP"] == 0.0 and metrics.stats["AR100"] == 0.0 and metrics.num_detections == 0


def test_table_puts_ap_and_ap50_first(tmp_path: Path, ann_file: Path) -> None:
    results = write_json(tmp_path / "dets.json", perfect(json.loads(ann_file.read_text())))
    lines = format_metrics(evaluate_results_file(results, ann_file, per_class=True)).splitlines()
    assert lines[1].split()[:2] == ["AP", "1.0000"] and lines[2].split()[0] == "AP50"
    assert any(line.split()[:2] == ["toothbrush", "1.0000"] for line in lines)


def test_cli_results_mode(tmp_path: Path, ann_file: Path, capsys: pytest.CaptureFixture) -> None:
    ann = json.loads(ann_file.read_text())
    results = write_json(tmp_path / "dets.json", perturbed(ann, 5))
    out_dir = tmp_path / "out"
    assert (
        main(["eval", "--results", str(results), "--ann", str(ann_file), "--output-dir", str(out_dir), "--per-class"])
        == 0
    )
    printed = capsys.readouterr().out
    direct = pycocotools_direct(ann_file, results)
    saved = json.loads((out_dir / "metrics.json").read_text())
    np.testing.assert_allclose([saved[k] for k in METRIC_KEYS], direct.stats, rtol=0, atol=1e-6)
    assert set(saved["per_class_AP"]) == {c["name"] for c in CATEGORIES}
    assert f"AP       {direct.stats[0]:.4f}" in printed


def test_cli_results_mode_with_data_root(tmp_path: Path) -> None:
    ann = make_annotations()
    (tmp_path / "coco" / "annotations").mkdir(parents=True)
    write_json(tmp_path / "coco" / "annotations" / "instances_val2017.json", ann)
    results = write_json(tmp_path / "dets.json", perfect(ann))
    assert (
        main(["eval", "--results", str(results), "--data", str(tmp_path / "coco"), "--output-dir", str(tmp_path / "o")])
        == 0
    )
    assert json.loads((tmp_path / "o" / "metrics.json").read_text())["AP"] == pytest.approx(1.0)


@pytest.mark.parametrize("images_dir", ["images/val2017", "val2017"])
def test_both_data_layouts(tmp_path: Path, images_dir: str) -> None:
    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    (root / images_dir).mkdir(parents=True)
    write_json(root / "annotations" / "instances_val2017.json", make_annotations())
    ann_file, image_dir = resolve_layout(root)
    assert image_dir == root / images_dir
    dataset = CocoDataset.from_root(root, limit=2)
    assert dataset.image_ids == [100, 107]
    assert dataset.images[0].path == root / images_dir / "img_100.png"
    assert CocoDataset.load(ann_file, image_dir).image_ids == sorted(im["id"] for im in make_annotations()["images"])


# ---------------------------------------------------------------------------------------------
# Bad data: one-line errors naming the file (exit status 2), or a warning.


def run_cli(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    status = main(["eval", *args])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def assert_one_line_error(status: int, err: str, *needles: str) -> None:
    assert status == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("paadet eval: error: ")
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def dataset_dir(tmp_path: Path, ann: dict | str | None) -> tuple[Path, Path]:
    images = tmp_path / "imgs"
    images.mkdir(exist_ok=True)
    ann_file = tmp_path / "instances.json"
    if ann is not None:
        ann_file.write_text(ann if isinstance(ann, str) else json.dumps(ann))
    return ann_file, images


BAD_ANNOTATIONS = [
    (None, "annotation file not found"),
    ('{"images": [', "not valid JSON"),
    ("[1, 2]", "not a COCO annotation file"),
    (json.dumps({"images": [], "annotations": []}), "no 'categories' list"),
    (
        json.dumps({"images": [{"file_name": "a.png"}], "annotations": [], "categories": CATEGORIES}),
        "images[0] needs an 'id'",
    ),
    (
        json.dumps(
            {
                "images": [{"id": 1, "file_name": "a.png"}, {"id": 1, "file_name": "b.png"}],
                "annotations": [],
                "categories": CATEGORIES,
            }
        ),
        "listed twice",
    ),
    (
        json.dumps(
            {
                "images": [{"id": 1, "file_name": "a.png"}],
                "categories": CATEGORIES,
                "annotations": [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1]}],
            }
        ),
        "annotations[0] has no 'id'",
    ),
    (
        json.dumps(
            {
                "images": [{"id": 1, "file_name": "a.png"}],
                "categories": CATEGORIES,
                "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 1]}],
            }
        ),
        "four numbers",
    ),
    (json.dumps({"images": [], "annotations": [], "categories": CATEGORIES}), "dataset is empty"),
]
MODEL_ONLY = [
    (json.dumps({"images": [{"id": 1}], "annotations": [], "categories": CATEGORIES}), "image 1 has no 'file_name'"),
    (
        json.dumps(
            {
                "images": [{"id": 1, "file_name": "a.png"}],
                "annotations": [],
                "categories": [{"id": 91, "name": "x"}, {"id": 200, "name": "y"}],
            }
        ),
        "none of the category ids",
    ),
]


@pytest.mark.parametrize("ann, message", BAD_ANNOTATIONS + MODEL_ONLY)
def test_bad_annotation_file_is_a_one_line_error(
    tmp_path: Path, ann, message: str, capsys: pytest.CaptureFixture
) -> None:
    ann_file, images = dataset_dir(tmp_path, ann)
    status, _, err = run_cli(
        ["--ann", str(ann_file), "--images", str(images), "--checkpoint", str(tmp_path / "none.pth")], capsys
    )
    assert_one_line_error(status, err, str(ann_file), message)


@pytest.mark.parametrize("ann, message", BAD_ANNOTATIONS)
def test_bad_annotation_file_in_results_mode(tmp_path: Path, ann, message: str, capsys: pytest.CaptureFixture) -> None:
    ann_file, _ = dataset_dir(tmp_path, ann)
    results = write_json(tmp_path / "dets.json", [])
    status, _, err = run_cli(["--results", str(results), "--ann", str(ann_file)], capsys)
    assert_one_line_error(status, err, str(ann_file), message)


def test_results_mode_is_as_lenient_as_pycocotools(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """No file names, string image ids, an annotation on an unlisted image: pycocotools scores these, so do we."""
    ann = make_annotations(num_images=5, seed=4)
    ids = {im["id"]: f"im{im['id']}" for im in ann["images"]}
    for im in ann["images"]:
        im["id"] = ids[im["id"]]
        del im["file_name"]
    for a in ann["annotations"]:
        a["image_id"] = ids[a["image_id"]]
    results = write_json(tmp_path / "dets.json", perturbed(ann, 4))
    ann["annotations"].append(
        {"id": 999, "image_id": "elsewhere", "category_id": 1, "bbox": [1, 2, 3, 4], "area": 12, "iscrowd": 0}
    )
    ann_file = write_json(tmp_path / "instances.json", ann)
    status, _, err = run_cli(["--results", str(results), "--ann", str(ann_file)], capsys)
    assert status == 0 and "1 annotations are on image or category ids that are not listed (ids 999)" in err
    direct = pycocotools_direct(ann_file, results)
    metrics = evaluate_results_file(results, ann_file)
    assert [metrics.stats[k] for k in METRIC_KEYS] == [float(v) for v in direct.stats]


def test_missing_image_folder(tmp_path: Path, ann_file: Path, capsys: pytest.CaptureFixture) -> None:
    status, _, err = run_cli(["--ann", str(ann_file), "--images", str(tmp_path / "nope")], capsys)
    assert_one_line_error(status, err, str(tmp_path / "nope"), "image folder not found")


def test_data_root_without_images(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "annotations").mkdir()
    write_json(tmp_path / "annotations" / "instances_val2017.json", make_annotations())
    status, _, err = run_cli(["--data", str(tmp_path)], capsys)
    assert_one_line_error(status, err, str(tmp_path / "val2017"), "image folder not found")
    status, _, err = run_cli(["--data", str(tmp_path / "elsewhere")], capsys)
    assert_one_line_error(status, err, "elsewhere", "dataset folder not found")


def test_missing_dataset_options(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    assert_one_line_error(*run_cli([], capsys)[::2], "--data ROOT")
    assert_one_line_error(*run_cli(["--ann", "x.json"], capsys)[::2], "--images")
    assert_one_line_error(*run_cli(["--data", "r", "--ann", "x.json"], capsys)[::2], "not both")


def test_some_foreign_categories_warn(tmp_path: Path) -> None:
    ann = make_annotations()
    ann["categories"] = [*CATEGORIES, {"id": 300, "name": "widget"}, {"id": 2, "name": "bike"}]
    ann_file, images = dataset_dir(tmp_path, ann)
    dataset = CocoDataset.load(ann_file, images)
    assert len(dataset.warnings) == 2
    assert "1 of 6 category ids are not the model's (300)" in dataset.warnings[0]
    assert "2 'bike' (model: 'bicycle')" in dataset.warnings[1]
    assert all(str(ann_file) in w for w in dataset.warnings)


def test_limit_must_be_positive(tmp_path: Path, ann_file: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exc:  # argparse refuses it, naming the flag
        run_cli(["--ann", str(ann_file), "--images", str(tmp_path), "--limit", "0"], capsys)
    assert exc.value.code == 2
    assert "argument --limit: must be >= 1, got 0" in capsys.readouterr().err


@pytest.mark.parametrize(
    "results, message",
    [
        (None, "results file not found"),
        ("[{", "not valid JSON"),
        (json.dumps({"a": 1}), "not a COCO results file"),
        (json.dumps([{"image_id": 100, "category_id": 1, "bbox": [1, 2, 3], "score": 0.5}]), "entry 0"),
        (json.dumps([{"image_id": 5, "category_id": 1, "bbox": [1, 2, 3, 4], "score": 0.5}]), "image ids are not in"),
    ],
)
def test_bad_results_file(tmp_path: Path, ann_file: Path, results, message: str, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "dets.json"
    if results is not None:
        path.write_text(results)
    status, _, err = run_cli(["--results", str(path), "--ann", str(ann_file)], capsys)
    assert_one_line_error(status, err, str(path), message)
    with pytest.raises((ResultsError, DatasetError)):
        evaluate_results_file(path, ann_file)


def test_missing_area_is_filled_from_the_box(tmp_path: Path) -> None:
    ann = make_annotations()
    for a in ann["annotations"]:
        del a["area"]
    ann_file = write_json(tmp_path / "instances.json", ann)
    results = write_json(tmp_path / "dets.json", perfect(ann))
    assert evaluate_results_file(results, ann_file).stats["APl"] == pytest.approx(1.0)
