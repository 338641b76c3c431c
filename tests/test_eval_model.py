"""Tests of evaluating a (seeded, random) detector: streaming, missing images, resume after a hard kill, the CLI.

Library-level runs use a tiny preset (images stay about 100 px) so that they are quick on a CPU; the
end-to-end CLI runs use the mmdet preset (800 px short side) on two or three 64x96 images.
"""

from __future__ import annotations

import importlib.util
import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from types import ModuleType

import cv2
import numpy as np
import pytest
import torch

from paadet.classes import CLASS_NAMES, LABEL_OF_CATEGORY
from paadet.cli import main
from paadet.data.coco import CocoDataset
from paadet.data.synthetic import synthetic_image
from paadet.evaluation.journal import JOURNAL_NAME, JournalError
from paadet.evaluation.metrics import METRIC_KEYS, evaluate_results_file
from paadet.evaluation.plots import PLOT_FILES, PlotOptions
from paadet.evaluation.run import DETECTIONS_NAME, METRICS_NAME, evaluate_detector
from paadet.model.seeded import seeded_state_dict

HELPER = textwrap.dedent('''
    """Builds the tiny-preset seeded detector; run as a script it evaluates ANN IMAGES OUT [resume | kill=K]
    (kill=K: SIGKILL itself right after journaling its K-th image, through evaluate_detector's on_record)."""
    import functools
    import os
    import signal
    import sys

    from paadet.data.coco import CocoDataset
    from paadet.detector import Detector
    from paadet.evaluation.run import evaluate_detector
    from paadet.model import PAANet
    from paadet.postprocess import PostprocessConfig
    from paadet.preprocess import Preset
    from paadet.runtime.torch_backend import TorchBackend
    from paadet.model.seeded import seeded_state_dict

    TINY = Preset("tiny", (128, 96), size_divisor=32)


    @functools.lru_cache
    def network(seed):
        net = PAANet()
        net.load_state_dict(seeded_state_dict(seed))
        return net


    def build(seed=0, batch_size=1, score_voting=True):
        backend = TorchBackend(
            network(seed), preset=TINY, device="cpu", postprocess=PostprocessConfig(score_voting=score_voting)
        )
        return Detector(backend, batch_size=batch_size, workers=2)


    def kill_after(count):
        records = []

        def on_record(record):
            records.append(record)
            if len(records) == count:
                os.kill(os.getpid(), signal.SIGKILL)

        return on_record


    if __name__ == "__main__":
        ann, images, out = sys.argv[1:4]
        extra = sys.argv[4] if len(sys.argv) > 4 else ""
        kill = kill_after(int(extra[5:])) if extra.startswith("kill=") else None
        evaluate_detector(build(), CocoDataset.load(ann, images), out, resume=extra == "resume", weights="seed0",
                          progress=False, on_record=kill)
''')

SHAPES = [(64, 96), (64, 96), (96, 64), (64, 96)]


@pytest.fixture(scope="module")
def helper(tmp_path_factory: pytest.TempPathFactory) -> ModuleType:
    path = tmp_path_factory.mktemp("helper") / "eval_helper.py"
    path.write_text(HELPER)
    spec = importlib.util.spec_from_file_location("eval_helper", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.PATH = path
    return module


def write_dataset(root: Path, image_dir: Path, detector, shapes=SHAPES) -> Path:
    """PNG images and annotations whose boxes are (shifted) detections of ``detector``: AP is neither 0 nor 1."""
    image_dir.mkdir(parents=True, exist_ok=True)
    images, anns = [], []
    files = []
    for i, (h, w) in enumerate(shapes):
        image_id = 10 * (i + 1)
        name = f"{image_id:012d}.png"
        cv2.imwrite(str(image_dir / name), synthetic_image(h, w, seed=i))
        images.append({"id": image_id, "file_name": name, "width": w, "height": h})
        files.append(image_dir / name)
    rng = np.random.default_rng(0)
    if detector is not None:
        for image, result in zip(images, detector.predict(files), strict=False):
            for entry in result.to_coco(image["id"])[:4]:
                x, y, bw, bh = entry["bbox"]
                anns.append(
                    {
                        "id": len(anns) + 1,
                        "image_id": image["id"],
                        "category_id": entry["category_id"],
                        "bbox": [x + float(rng.normal(0, 0.5)), y, bw, bh],
                        "area": bw * bh,
                        "iscrowd": 0,
                    }
                )
    else:
        for image in images:
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": image["id"],
                    "category_id": 1,
                    "bbox": [5.0, 5.0, 30.0, 20.0],
                    "area": 600.0,
                    "iscrowd": 0,
                }
            )
    categories = [
        {"id": cid, "name": CLASS_NAMES[LABEL_OF_CATEGORY[cid]]}
        for cid in sorted({a["category_id"] for a in anns} | {1})
    ]
    ann_file = root / "instances.json"
    ann_file.write_text(json.dumps({"images": images, "annotations": anns, "categories": categories}))
    return ann_file


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory, helper: ModuleType) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("tiny")
    ann_file = write_dataset(root, root / "images", helper.build())
    return ann_file, root / "images"


@pytest.fixture(scope="module")
def full_run(tmp_path_factory: pytest.TempPathFactory, helper: ModuleType, tiny_data: tuple[Path, Path]):
    out = tmp_path_factory.mktemp("full")
    report = evaluate_detector(
        helper.build(), CocoDataset.load(*tiny_data), out, per_class=True, weights="seed0", progress=False
    )
    return report, out


def test_eval_equals_predict_and_scoring_its_file(helper: ModuleType, tiny_data: tuple[Path, Path], full_run) -> None:
    report, out = full_run
    ann_file, image_dir = tiny_data
    assert 0.1 < report.metrics.stats["AP"] < 1.0
    dataset = CocoDataset.load(ann_file, image_dir)
    expected = []
    for entry, result in zip(dataset.images, helper.build().predict([e.path for e in dataset.images]), strict=False):
        expected += [{k: v for k, v in d.items() if k != "file_name"} for d in result.to_coco(entry.image_id)]
    assert json.loads((out / DETECTIONS_NAME).read_text()) == expected
    rescored = evaluate_results_file(out / DETECTIONS_NAME, ann_file, per_class=True)
    saved = json.loads((out / METRICS_NAME).read_text())
    for key in METRIC_KEYS:
        assert saved[key] == rescored.stats[key] == report.metrics.stats[key]
    assert saved["per_class_AP"] == rescored.per_class
    assert saved["images"] == {"evaluated": 4, "computed": 4, "resumed": 0, "missing": 0, "unreadable": 0}
    assert set(saved["timings"]["ms_per_image"]) >= {"decode", "preprocess", "network", "postprocess", "write"}
    assert saved["backend"]["backend"] == "torch"


def test_loader_processes_gives_the_same_detections(
    tmp_path: Path, helper: ModuleType, tiny_data: tuple[Path, Path], full_run
) -> None:
    report = evaluate_detector(
        helper.build(), CocoDataset.load(*tiny_data), tmp_path, weights="seed0", loader="processes", progress=False
    )
    assert (tmp_path / DETECTIONS_NAME).read_bytes() == (full_run[1] / DETECTIONS_NAME).read_bytes()
    assert report.metrics.stats == full_run[0].metrics.stats


def test_batching_changes_detections_only_by_rounding(
    tmp_path: Path, helper: ModuleType, tiny_data: tuple[Path, Path], full_run
) -> None:
    """Batched CPU convolutions round differently from single-image ones (ulps), nothing more."""
    evaluate_detector(
        helper.build(batch_size=3), CocoDataset.load(*tiny_data), tmp_path, weights="seed0", progress=False
    )
    batched = json.loads((tmp_path / DETECTIONS_NAME).read_text())
    single = json.loads((full_run[1] / DETECTIONS_NAME).read_text())
    assert [(d["image_id"], d["category_id"]) for d in batched] == [(d["image_id"], d["category_id"]) for d in single]
    np.testing.assert_allclose(
        [d["bbox"] + [d["score"]] for d in batched], [d["bbox"] + [d["score"]] for d in single], atol=1e-3
    )


def test_plots_are_drawn_before_metrics_json(tmp_path: Path, helper: ModuleType, tiny_data: tuple[Path, Path]) -> None:
    """``--plots`` from a detector run: the pictures of its detections, listed in metrics.json, written before it."""
    report = evaluate_detector(
        helper.build(), CocoDataset.load(*tiny_data), tmp_path, weights="seed0", progress=False, plots=PlotOptions(0.0)
    )
    saved = json.loads((tmp_path / METRICS_NAME).read_text())
    assert saved["plots"] == {"files": list(PLOT_FILES), "iou_thr": 0.5, "score_thr": 0.0}
    drawn = json.loads((tmp_path / "plots.json").read_text())
    assert abs(drawn["pr_curves"]["AP"]["0.50:0.95"] - report.metrics.stats["AP"]) < 1e-6
    counts = np.array(drawn["confusion_matrix"]["counts"])
    assert np.trace(counts) > 0 and counts[-1].sum() > 0  # boxes found (they were shifted detections), and others
    written = (tmp_path / METRICS_NAME).stat().st_mtime_ns
    assert all((tmp_path / name).stat().st_mtime_ns <= written for name in PLOT_FILES)


def test_missing_and_unreadable_images_count_as_no_detections(
    tmp_path: Path, helper: ModuleType, tiny_data: tuple[Path, Path]
) -> None:
    ann_file, image_dir = tiny_data
    images = tmp_path / "images"
    images.mkdir()
    names = sorted(p.name for p in image_dir.iterdir())
    for name in names[2:]:
        (images / name).write_bytes((image_dir / name).read_bytes())
    (images / names[1]).write_bytes(b"not an image")
    warnings: list[str] = []
    report = evaluate_detector(
        helper.build(), CocoDataset.load(ann_file, images), tmp_path / "out", progress=False, log=warnings.append
    )
    assert report.images["missing"] == 1 and report.images["unreadable"] == 1 and report.images["evaluated"] == 4
    assert report.missing_images == names[:2]
    assert sum(names[0] in w and "no such file" in w for w in warnings) == 1
    assert sum(names[1] in w for w in warnings) == 1
    detections = json.loads((tmp_path / "out" / DETECTIONS_NAME).read_text())
    assert {d["image_id"] for d in detections} == {30, 40}
    assert report.metrics.stats == evaluate_results_file(tmp_path / "out" / DETECTIONS_NAME, ann_file).stats


class CountingBackend:
    """Wraps a backend and counts the images it is asked to run."""

    def __init__(self, backend) -> None:
        self.inner = backend
        self.images = 0

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def infer(self, images, metas, timer=None):
        self.images += len(images)
        return self.inner.infer(images, metas, timer)


def test_resume_after_sigkill(tmp_path: Path, helper: ModuleType, tiny_data: tuple[Path, Path], full_run) -> None:
    ann_file, image_dir = tiny_data
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(helper.PATH), str(ann_file), str(image_dir), str(out), "kill=2"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    lines = (out / JOURNAL_NAME).read_bytes().splitlines()
    assert len(lines) == 3  # the header and two images
    assert not (out / DETECTIONS_NAME).exists() and not (out / METRICS_NAME).exists()
    with open(out / JOURNAL_NAME, "ab") as f:  # a write torn by the kill
        f.write(b'{"image_id":30,"file_name":"0000')

    detector = helper.build()
    counting = CountingBackend(detector.backend)
    detector.backend = counting
    warnings: list[str] = []
    report = evaluate_detector(
        detector,
        CocoDataset.load(ann_file, image_dir),
        out,
        per_class=True,
        resume=True,
        weights="seed0",
        progress=False,
        log=warnings.append,
    )
    assert counting.images == 2
    assert report.images["resumed"] == 2 and report.images["computed"] == 2
    assert any("torn last line" in w for w in warnings)
    assert (out / DETECTIONS_NAME).read_bytes() == (full_run[1] / DETECTIONS_NAME).read_bytes()
    assert report.metrics.stats == full_run[0].metrics.stats
    assert report.metrics.per_class == full_run[0].metrics.per_class
    assert len((out / JOURNAL_NAME).read_bytes().splitlines()) == 5


class InterruptingBackend(CountingBackend):
    """Raises KeyboardInterrupt (as Ctrl-C would) when asked for its second batch."""

    def infer(self, images, metas, timer=None):
        if self.images:
            raise KeyboardInterrupt
        return super().infer(images, metas, timer)


def test_resume_after_ctrl_c(tmp_path: Path, helper: ModuleType, tiny_data: tuple[Path, Path], full_run) -> None:
    detector = helper.build()
    detector.backend = InterruptingBackend(detector.backend)
    messages: list[str] = []
    dataset = CocoDataset.load(*tiny_data)
    with pytest.raises(KeyboardInterrupt):
        evaluate_detector(detector, dataset, tmp_path, weights="seed0", progress=False, log=messages.append)
    assert any("interrupted: 1 images are saved" in m and "--resume" in m for m in messages)
    report = evaluate_detector(helper.build(), dataset, tmp_path, weights="seed0", resume=True, progress=False)
    assert report.images["resumed"] == 1 and report.images["computed"] == 3
    assert (tmp_path / DETECTIONS_NAME).read_bytes() == (full_run[1] / DETECTIONS_NAME).read_bytes()


def test_resume_with_a_larger_limit_reuses_the_journal(
    tmp_path: Path, helper: ModuleType, tiny_data: tuple[Path, Path], full_run
) -> None:
    ann_file, image_dir = tiny_data
    first = evaluate_detector(
        helper.build(), CocoDataset.load(ann_file, image_dir, limit=2), tmp_path, weights="seed0", progress=False
    )
    assert first.metrics.num_images == 2
    again = evaluate_detector(
        helper.build(), CocoDataset.load(ann_file, image_dir), tmp_path, weights="seed0", resume=True, progress=False
    )
    assert again.images["resumed"] == 2 and again.images["computed"] == 2
    assert again.metrics.stats == full_run[0].metrics.stats


def test_journal_guards(tmp_path: Path, helper: ModuleType, tiny_data: tuple[Path, Path]) -> None:
    ann_file, image_dir = tiny_data
    one = CocoDataset.load(ann_file, image_dir, limit=1)
    evaluate_detector(helper.build(), one, tmp_path, weights="seed0", progress=False)
    with pytest.raises(JournalError, match="pass --resume"):
        evaluate_detector(helper.build(), one, tmp_path, weights="seed0", progress=False)
    with pytest.raises(JournalError, match="score_voting: True in the journal, False now"):
        evaluate_detector(helper.build(score_voting=False), one, tmp_path, weights="seed0", resume=True, progress=False)
    with pytest.raises(JournalError, match="weights: 'seed0' in the journal, 'seed1' now"):
        evaluate_detector(helper.build(), one, tmp_path, weights="seed1", resume=True, progress=False)
    (tmp_path / "file").write_text("")
    with pytest.raises(JournalError, match="is a file, not a folder"):
        evaluate_detector(helper.build(), one, tmp_path / "file", progress=False)
    with pytest.raises(JournalError, match="needs --output-dir"):
        evaluate_detector(helper.build(), one, None, resume=True, progress=False)
    lines = (tmp_path / JOURNAL_NAME).read_bytes().splitlines()
    other = json.loads(lines[1])
    other["file_name"] = "other.png"
    (tmp_path / JOURNAL_NAME).write_bytes(b"\n".join([lines[0], json.dumps(other).encode()]) + b"\n")
    with pytest.raises(JournalError, match="another dataset"):
        evaluate_detector(helper.build(), one, tmp_path, weights="seed0", resume=True, progress=False)
    (tmp_path / JOURNAL_NAME).write_bytes(b"\n".join([lines[0], b"{garbage", lines[1]]) + b"\n")
    with pytest.raises(JournalError, match="line 2 is damaged"):
        evaluate_detector(helper.build(), one, tmp_path, weights="seed0", resume=True, progress=False)


# ---------------------------------------------------------------------------------------------
# End to end through the command line (mmdet preset: a few seconds per image on a CPU).


@pytest.fixture(scope="module")
def cli_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli")
    checkpoint = root / "seeded.pth"
    torch.save({"state_dict": seeded_state_dict(0)}, checkpoint)
    data = root / "coco"
    (data / "annotations").mkdir(parents=True)
    ann = write_dataset(root, data / "val2017", None, shapes=SHAPES[:3])
    ann.rename(data / "annotations" / "instances_val2017.json")
    return {
        "checkpoint": checkpoint,
        "data": data,
        "ann": data / "annotations" / "instances_val2017.json",
        "root": root,
    }


@pytest.fixture(scope="module")
def cli_full(cli_data: dict[str, Path]) -> Path:
    out = cli_data["root"] / "full"
    assert (
        main(
            [
                "eval",
                "--checkpoint",
                str(cli_data["checkpoint"]),
                "--data",
                str(cli_data["data"]),
                "--limit",
                "2",
                "--output-dir",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    return out


def test_cli_eval_then_score_its_detections(
    cli_data: dict[str, Path], cli_full: Path, capsys: pytest.CaptureFixture
) -> None:
    saved = json.loads((cli_full / METRICS_NAME).read_text())
    assert saved["images"]["evaluated"] == 2 and saved["settings"]["preset"]["name"] == "mmdet"
    detections = json.loads((cli_full / DETECTIONS_NAME).read_text())
    ann = json.loads(cli_data["ann"].read_text())
    # random weights detect none of the annotation file's categories: scoring that file is an error, not AP 0
    assert detections and not {d["category_id"] for d in detections} & {c["id"] for c in ann["categories"]}
    assert (
        main(["eval", "--results", str(cli_full / DETECTIONS_NAME), "--ann", str(cli_data["ann"]), "--limit", "2"]) == 2
    )
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "none of its category ids" in err[0] and DETECTIONS_NAME in err[0]
    # with the annotation file's categories added, the file scores exactly as the run did
    ann["categories"] += [{"id": c, "name": f"c{c}"} for c in sorted({d["category_id"] for d in detections})]
    widened = cli_data["root"] / "widened.json"
    widened.write_text(json.dumps(ann))
    assert main(["eval", "--results", str(cli_full / DETECTIONS_NAME), "--ann", str(widened), "--limit", "2"]) == 0
    printed = capsys.readouterr().out.splitlines()
    rescored = evaluate_results_file(cli_full / DETECTIONS_NAME, widened, limit=2)
    assert printed[1].split()[:2] == ["AP", f"{rescored.stats['AP']:.4f}"] and printed[2].split()[0] == "AP50"


def test_cli_resume_after_kill(cli_data: dict[str, Path], cli_full: Path, capsys: pytest.CaptureFixture) -> None:
    out = cli_data["root"] / "killed"
    args = [
        "eval",
        "--checkpoint",
        str(cli_data["checkpoint"]),
        "--ann",
        str(cli_data["ann"]),
        "--images",
        str(cli_data["data"] / "val2017"),
        "--limit",
        "2",
        "--output-dir",
        str(out),
        "--no-progress",
    ]
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("eval_killed.py")), "1", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert main([*args, "--no-score-voting", "--resume"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("paadet eval: error:")]
    assert len(errors) == 1 and "cannot resume" in errors[0] and "score_voting" in errors[0]
    assert main([*args, "--resume"]) == 0
    saved = json.loads((out / METRICS_NAME).read_text())
    assert saved["images"]["resumed"] == 1 and saved["images"]["computed"] == 1
    full = json.loads((cli_full / METRICS_NAME).read_text())
    assert [saved[k] for k in METRIC_KEYS] == [full[k] for k in METRIC_KEYS]
    assert (out / DETECTIONS_NAME).read_bytes() == (cli_full / DETECTIONS_NAME).read_bytes()
