"""Bad input and interruptions, as a new user meets them: nothing lost, nothing overwritten, errors early."""

from __future__ import annotations

import json
import os
import re
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from paadet import cli
from paadet.cli import main
from paadet.data.images import list_images
from paadet.data.synthetic import synthetic_image
from paadet.detector import Detector
from paadet.fileio import atomic_write_json
from paadet.model.seeded import seeded_state_dict
from paadet.visualize import draw_detections, safe_relative

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "seeded.pth"
    torch.save({"meta": {}, "state_dict": seeded_state_dict(0, cls_bias=-8.0)}, path)
    return path


def _image(path: Path, seed: int, size: tuple[int, int] = (96, 128)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), synthetic_image(*size, seed=seed))
    return path


def _one_error(err: str, command: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"paadet {command}: error: "), lines[0]
    return lines[0]


# --- 1. --save-vis never writes over an input, nor outside its folder ------------------------------


def test_save_vis_keeps_inputs_and_writes_under_the_folder(tmp_path: Path, checkpoint: Path, monkeypatch) -> None:
    photos = tmp_path / "photos"
    abs_input = _image(photos / "a.jpg", 1)
    rel_root = tmp_path / "work"
    rel_root.mkdir()
    _image(tmp_path / "rel" / "b.jpg", 2)
    before = {p: p.read_bytes() for p in (abs_input, tmp_path / "rel" / "b.jpg")}
    monkeypatch.chdir(rel_root)
    out = tmp_path / "results.json"
    code = main(
        [
            "predict",
            str(abs_input),
            "../rel/b.jpg",
            "--checkpoint",
            str(checkpoint),
            "--preset",
            "800",
            "--output",
            str(out),
            "--save-vis",
            "vis/",
            "--vis-score-thr",
            "0",
            "--no-progress",
        ]
    )
    assert code == 0
    assert {p: p.read_bytes() for p in before} == before  # the photos are byte-identical
    written = sorted(p.relative_to(rel_root / "vis").as_posix() for p in (rel_root / "vis").rglob("*") if p.is_file())
    assert len(written) == 2
    assert written == sorted([safe_relative(str(abs_input)).as_posix(), "__/rel/b.jpg"])
    assert all(not w.startswith("/") and ".." not in w.split("/") for w in written)


def test_inputs_sharing_a_name_get_distinct_files_and_names(tmp_path: Path, checkpoint: Path) -> None:
    for folder, seed in (("a", 1), ("b", 2)):
        _image(tmp_path / folder / "x.jpg", seed)
    _image(tmp_path / "a" / "y.jpg", 3)
    _image(tmp_path / "a" / "y.png", 4)
    out, vis = tmp_path / "r.json", tmp_path / "vis"
    assert (
        main(
            [
                "predict",
                str(tmp_path / "a"),
                str(tmp_path / "b"),
                "--checkpoint",
                str(checkpoint),
                "--preset",
                "800",
                "--output",
                str(out),
                "--save-vis",
                str(vis),
                "--no-progress",
            ]
        )
        == 0
    )
    names = {e["file_name"] for e in json.loads(out.read_text())}
    sources = list_images([tmp_path / "a", tmp_path / "b"])
    assert len({s.file_name for s in sources}) == 4  # a/x.jpg and b/x.jpg told apart
    assert names <= {s.file_name for s in sources}
    assert len([p for p in vis.rglob("*") if p.is_file()]) == 4


def test_save_vis_onto_the_input_folder_is_refused_before_work(tmp_path: Path, capsys) -> None:
    photos = tmp_path / "photos"
    original = _image(photos / "a.jpg", 1).read_bytes()
    code = main(
        [
            "predict",
            str(photos),
            "--checkpoint",
            str(tmp_path / "absent.pth"),
            "--output",
            str(tmp_path / "r.json"),
            "--save-vis",
            str(photos),
        ]
    )
    line = _one_error(capsys.readouterr().err, "predict")
    assert code == 2 and "overwrite the input" in line and "absent.pth" not in line  # refused before the model loads
    assert (photos / "a.jpg").read_bytes() == original


# --- 2. output paths are checked before any work -----------------------------------------------------


@pytest.mark.parametrize(
    "command, flag", [("predict", "--output"), ("export", "--output"), ("eval", "--output-dir"), ("bench", "--json")]
)
def test_bad_output_paths_fail_before_the_model_loads(tmp_path: Path, capsys, command: str, flag: str) -> None:
    image = _image(tmp_path / "in" / "a.jpg", 1)
    ann = tmp_path / "ann.json"
    ann.write_text(
        json.dumps(
            {
                "images": [{"id": 1, "file_name": "a.jpg", "width": 128, "height": 96}],
                "annotations": [],
                "categories": [{"id": 1, "name": "person"}],
            }
        )
    )
    existing_dir = tmp_path / "a_folder"
    existing_dir.mkdir()
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    target = a_file if flag == "--output-dir" else existing_dir
    missing = str(tmp_path / "absent.pth")
    argv = {
        "predict": ["predict", str(image), "--checkpoint", missing, "--output", str(target)],
        "export": ["export", "--checkpoint", missing, "--output", str(target)],
        "eval": [
            "eval",
            "--ann",
            str(ann),
            "--images",
            str(image.parent),
            "--checkpoint",
            missing,
            "--output-dir",
            str(target),
        ],
        "bench": ["bench", "--checkpoint", missing, "--json", str(target)],
    }[command]
    assert main(argv) == 2
    line = _one_error(capsys.readouterr().err, command)
    assert str(target) in line and "absent.pth" not in line


def test_output_that_is_an_input_is_refused(tmp_path: Path, checkpoint: Path, capsys) -> None:
    image = _image(tmp_path / "a.jpg", 1)
    before = image.read_bytes()
    assert main(["predict", str(image), "--checkpoint", str(checkpoint), "--output", str(image)]) == 2
    assert "one of the inputs" in _one_error(capsys.readouterr().err, "predict")
    assert image.read_bytes() == before


def test_unwritable_parent_is_refused(tmp_path: Path, checkpoint: Path, capsys) -> None:
    image = _image(tmp_path / "a.jpg", 1)
    blocker = tmp_path / "plain_file"
    blocker.write_text("x")
    assert (
        main(["predict", str(image), "--checkpoint", str(checkpoint), "--output", str(blocker / "sub" / "r.json")]) == 2
    )
    assert "is a file, not a folder" in _one_error(capsys.readouterr().err, "predict")


# --- 4. one bad entry never aborts a folder -------------------------------------------------------------


def test_symlink_loop_and_unlistable_folder_are_skipped(tmp_path: Path, checkpoint: Path, capsys, monkeypatch) -> None:
    photos = tmp_path / "photos"
    _image(photos / "good.jpg", 1)
    _image(photos / "locked" / "hidden.jpg", 2)
    os.symlink("loop2.jpg", photos / "loop1.jpg")
    os.symlink("loop1.jpg", photos / "loop2.jpg")
    os.symlink(".", photos / "self_dir")
    real_scandir = os.scandir
    locked = str(photos / "locked")

    def scandir(path="."):  # root reads every folder, so the permission error is simulated for one folder
        if os.fspath(path) == locked:
            raise PermissionError(13, "Permission denied", locked)
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    out = tmp_path / "r.json"
    code = main(
        [
            "predict",
            str(photos),
            "--checkpoint",
            str(checkpoint),
            "--preset",
            "800",
            "--output",
            str(out),
            "--no-progress",
        ]
    )
    err = capsys.readouterr().err
    assert code == 1  # something was skipped
    assert "locked" in err and "Permission denied" in err
    assert "loop1.jpg" in err and "symbolic links" in err
    assert {e["file_name"] for e in json.loads(out.read_text())} == {"good.jpg"}


# --- 5. mistakes that look like success exit non-zero ---------------------------------------------------


def test_predict_on_folders_without_images_fails(tmp_path: Path, capsys) -> None:
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    assert main(["predict", str(tmp_path / "empty"), "--output", str(tmp_path / "r.json")]) == 2
    assert "no images in" in _one_error(capsys.readouterr().err, "predict")
    assert not (tmp_path / "r.json").exists()


def test_eval_with_every_image_missing_fails(tmp_path: Path, capsys) -> None:
    ann = tmp_path / "ann.json"
    ann.write_text(
        json.dumps(
            {
                "images": [{"id": 1, "file_name": "gone.jpg", "width": 64, "height": 64}],
                "annotations": [
                    {"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 9, 9], "area": 81, "iscrowd": 0}
                ],
                "categories": [{"id": 1, "name": "person"}],
            }
        )
    )
    (tmp_path / "imgs").mkdir()
    assert main(["eval", "--ann", str(ann), "--images", str(tmp_path / "imgs")]) == 2
    assert "none of the 1 images" in _one_error(capsys.readouterr().err, "eval")


def test_eval_results_with_foreign_categories_fails(tmp_path: Path, capsys) -> None:
    ann = tmp_path / "ann.json"
    ann.write_text(
        json.dumps(
            {
                "images": [{"id": 1, "file_name": "a.jpg", "width": 64, "height": 64}],
                "annotations": [],
                "categories": [{"id": 1, "name": "cat"}],
            }
        )
    )
    results = tmp_path / "det.json"
    results.write_text(json.dumps([{"image_id": 1, "category_id": 7, "bbox": [1, 1, 5, 5], "score": 0.9}]))
    assert main(["eval", "--results", str(results), "--ann", str(ann)]) == 2
    line = _one_error(capsys.readouterr().err, "eval")
    assert "none of its category ids (7)" in line and str(ann) in line


# --- 9. flags are validated by argparse, naming the flag ---------------------------------------------------


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["predict", "x.jpg", "--output", "r.json", "--batch-size", "0"], "--batch-size"),
        (["predict", "x.jpg", "--output", "r.json", "--workers", "-1"], "--workers"),
        (["predict", "x.jpg", "--output", "r.json", "--vis-score-thr", "1.5"], "--vis-score-thr"),
        (["eval", "--ann", "a.json", "--images", "d", "--limit", "0"], "--limit"),
        (["export", "--batch-size", "0"], "--batch-size"),
        (["export", "--opset", "-3"], "--opset"),
        (["export", "--input-size", "0x320"], "--input-size"),
        (["bench", "--iters", "0"], "--iters"),
        (["bench", "--warmup", "-1"], "--warmup"),
        (["bench", "--batch-size", "two"], "--batch-size"),
    ],
)
def test_numeric_flags_are_validated(argv: list[str], flag: str, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert f"argument {flag}:" in capsys.readouterr().err


# --- 11. Ctrl-C keeps the work done --------------------------------------------------------------------


def test_interrupted_predict_writes_partial_results(tmp_path: Path, checkpoint: Path, capsys, monkeypatch) -> None:
    for i in range(3):
        _image(tmp_path / "photos" / f"{i}.jpg", i)
    real_run = Detector.run

    def run_then_interrupt(self, loaded, timer=None):
        for n, pair in enumerate(real_run(self, loaded, timer)):
            if n == 1:
                raise KeyboardInterrupt
            yield pair

    monkeypatch.setattr(Detector, "run", run_then_interrupt)
    out = tmp_path / "r.json"
    code = main(
        [
            "predict",
            str(tmp_path / "photos"),
            "--checkpoint",
            str(checkpoint),
            "--preset",
            "800",
            "--output",
            str(out),
            "--no-progress",
        ]
    )
    err = capsys.readouterr().err
    assert code == 130
    assert "partial results of 1 of 3 images" in err
    entries = json.loads(out.read_text())
    assert entries and {e["file_name"] for e in entries} == {"0.jpg"}


# --- 12. small rough edges -------------------------------------------------------------------------------


def test_outputs_get_the_users_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        path = atomic_write_json(tmp_path / "out.json", {"a": 1})
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_help_and_version_do_not_import_torch() -> None:
    code = (
        "import sys; from paadet.cli import main\n"
        "for argv in (['--help'], ['--version']):\n"
        "    try: main(argv)\n"
        "    except SystemExit: pass\n"
        "print('torch' in sys.modules)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "False"
    assert all(name in proc.stdout for name in cli.COMMANDS)


def test_labels_stay_inside_the_image_and_boxes_are_counted() -> None:
    image = np.zeros((60, 80, 3), np.uint8)
    boxes = np.array([[70, 0, 80, 10], [0, 50, 10, 60], [5, 5, 20, 20]], np.float32)
    out, drawn = draw_detections(image, boxes, np.array([0.9, 0.8, 0.1]), np.array([0, 1, 2]), score_thr=0.3)
    assert drawn == 2
    assert out.shape == image.shape and out[0:12, 30:80].any()  # the top-right label was shifted left, still inside


def test_small_images_are_drawn_enlarged_with_one_label_per_box_and_no_label_over_another() -> None:
    """A crowded 160 px image, as a weak model draws it (each box under three classes): an enlarged canvas,
    the three classes of a box in one label, no two labels overlapping, every label inside the image."""
    from paadet.visualize import MIN_CANVAS, group_boxes, place_labels

    rng = np.random.default_rng(0)
    boxes, scores, labels = [], [], []
    for _ in range(12):
        x, y = rng.integers(0, 110, 2)
        w, h = rng.integers(20, 50, 2)
        for c in range(3):
            boxes.append([x, y, x + w, y + h])
            scores.append(0.3 + 0.2 * rng.random())
            labels.append(c)
    boxes, scores, labels = np.array(boxes, float), np.array(scores), np.array(labels)
    image = np.zeros((120, 160, 3), np.uint8)
    out, drawn = draw_detections(image, boxes, scores, labels, 0.3, ["a", "b", "c"], MIN_CANVAS)
    assert out.shape == (480, 640, 3) and drawn == 36  # enlarged 4x to reach 640 px
    groups = group_boxes(boxes, scores, labels, 0.3)
    assert len(groups) == 12 and all(len(g) == 3 for g in groups)
    rects = [tuple(int(v) * 4 for v in boxes[g[0]]) for g in groups]
    spots = [s for s in place_labels(rects, [(150, 20)] * 12, 640, 480) if s is not None]
    assert len(spots) >= 9  # almost every label finds a free place
    assert all(x1 >= 0 and y1 >= 0 and x2 <= 640 and y2 <= 480 for x1, y1, x2, y2 in spots)
    for i, a in enumerate(spots):
        for b in spots[i + 1 :]:
            assert not (a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]), (a, b)
    same, _ = draw_detections(image, boxes, scores, labels, 0.3, ["a", "b", "c"])  # a video frame: its own size
    assert same.shape == image.shape


def test_save_vis_reports_how_many_boxes_it_drew(tmp_path: Path, checkpoint: Path, capsys) -> None:
    image = _image(tmp_path / "a.jpg", 1)
    assert (
        main(
            [
                "predict",
                str(image),
                "--checkpoint",
                str(checkpoint),
                "--preset",
                "800",
                "--output",
                str(tmp_path / "r.json"),
                "--save-vis",
                str(tmp_path / "vis"),
                "--vis-score-thr",
                "0",
                "--no-progress",
            ]
        )
        == 0
    )
    assert re.search(r"drew \d+ boxes \(score >= 0; 0 below it not drawn\) on 1 images under", capsys.readouterr().out)


def _readme_commands() -> list[str]:
    """Every ``paadet ...`` command in the shell blocks of the README and of the reference pages in ``docs/``
    (``bash`` blocks, and the ``$ `` lines of ``console`` blocks), continuation lines joined, comments dropped."""
    commands = []
    for page in [README, *sorted((README.parent / "docs").glob("*.md"))]:
        for kind, block in re.findall(r"```(bash|console)\n(.*?)```", page.read_text(), re.DOTALL):
            joined = re.sub(r"\\\n\s*", " ", block)
            for line in joined.splitlines():
                if kind == "console":
                    if not line.startswith("$ "):
                        continue
                    line = line[2:]
                for part in re.split(r"&&", line):
                    part = part.split(" #")[0].strip().removesuffix(" &")
                    if part.startswith("paadet "):
                        commands.append(part)
    return commands


def test_every_documented_command_parses() -> None:
    commands = _readme_commands()
    assert len(commands) >= 10
    for command in commands:
        argv = shlex.split(command)[1:]
        parser = cli.build_parser(argv[0], all_commands=False) if argv else cli.build_parser()
        try:
            args, extra = parser.parse_known_args(argv)
        except SystemExit as exc:
            raise AssertionError(f"README command does not parse: {command}") from exc
        assert not extra, f"README command has unknown flags {extra}: {command}"
        assert getattr(args, "func", None) is not None, command
        assert not getattr(args, "accepts_any_arguments", False), f"command unavailable here: {command}"


# --- 6 and 7. an exported graph: its printed commands run as printed; a static batch is refused early -----


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, checkpoint: Path) -> tuple[Path, list[str]]:
    """``paadet export`` (preset mmdet: dynamic size, static batch 1) and the "next:" commands it printed."""
    import io
    from contextlib import redirect_stdout

    folder = tmp_path_factory.mktemp("export")
    model = folder / "paa.onnx"
    buffer = io.StringIO()
    with redirect_stdout(buffer):
        code = main(["export", "--checkpoint", str(checkpoint), "--output", str(model), "--no-simplify", "--no-verify"])
    assert code == 0, buffer.getvalue()
    lines = buffer.getvalue().splitlines()
    start = lines.index("  next:")
    return model, [line.strip() for line in lines[start + 1 :] if line.strip().startswith("paadet ")]


def test_export_next_commands_run_as_printed(exported, tmp_path: Path, monkeypatch, capsys) -> None:
    _model, commands = exported
    assert [c.split()[1] for c in commands] == ["predict", "eval", "bench"]
    _image(tmp_path / "IMAGE.jpg", 1)
    _image(tmp_path / "IMAGES_DIR" / "a.jpg", 2)
    (tmp_path / "ANNOTATIONS.json").write_text(
        json.dumps(
            {
                "images": [{"id": 1, "file_name": "a.jpg", "width": 128, "height": 96}],
                "annotations": [
                    {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 40, 30], "area": 1200, "iscrowd": 0}
                ],
                "categories": [{"id": 1, "name": "person"}],
            }
        )
    )
    monkeypatch.chdir(tmp_path)
    for command in commands:
        quick = ["--iters", "1", "--warmup", "0"] if command.split()[1] == "bench" else []  # a short timing
        assert main([*shlex.split(command)[1:], *quick]) == 0, command
    out = capsys.readouterr().out
    assert (tmp_path / "results.json").is_file() and (tmp_path / "runs" / "onnx" / "metrics.json").is_file()
    assert "mmdet" in out  # bench ran the graph's preset, not its own default (800)


def test_export_suggests_the_graph_viewer_only_when_installed(tmp_path: Path, monkeypatch) -> None:
    from paadet.export.exporter import next_commands

    monkeypatch.setenv("PATH", str(tmp_path))  # no netron here
    assert not any("netron" in command for command in next_commands(Path("paa.onnx")))
    viewer = tmp_path / "netron"
    viewer.write_text("#!/bin/sh\n")
    viewer.chmod(0o755)
    assert next_commands(Path("paa.onnx"))[-1].startswith("netron paa.onnx")


def test_bench_takes_the_graphs_preset_and_batch(exported) -> None:
    from paadet import DetectorSpec
    from paadet.bench import BenchTiming, run_benchmark

    model, _ = exported
    report = run_benchmark(
        DetectorSpec(backend="onnxruntime", model=str(model), device=None),
        BenchTiming(iters=1, warmup=0, skip_engine=True),
    )
    assert (report["preset"], report["batch_size"]) == ("mmdet", 1)


def test_static_batch_graph_refuses_a_larger_batch_at_start(exported, tmp_path: Path, capsys) -> None:
    model, _ = exported
    image = _image(tmp_path / "a.jpg", 1)
    code = main(
        [
            "predict",
            str(image),
            "--backend",
            "onnxruntime",
            "--model",
            str(model),
            "--batch-size",
            "4",
            "--output",
            str(tmp_path / "r.json"),
        ]
    )
    line = _one_error(capsys.readouterr().err, "predict")
    assert code == 2 and "--batch-size 4" in line and "static batch of 1" in line
    assert not (tmp_path / "r.json").exists()
