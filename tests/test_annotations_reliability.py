"""Bad values in the JSON files paadet reads (issue 30, items 3, 4 and 8): non-finite detections, annotation
fields that pycocotools would misread (``iscrowd`` of ``"0"``, NaN boxes...), and JSON nested too deeply.
Each is refused in one line that names the file (and the entry, id and value), before any model work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from paadet.batch.errors import BatchError
from paadet.batch.output import RUN_FILE, OutputFolder
from paadet.cli import main
from paadet.data.coco import DatasetError, load_coco
from paadet.evaluation.journal import JOURNAL_FORMAT, JOURNAL_VERSION, Journal
from paadet.evaluation.metrics import METRIC_KEYS, ResultsError, evaluate_results_file
from paadet.runtime.graph_info import METADATA_KEY, ExportFormatError, ExportInfo
from paadet.train.dataset import CocoTrainDataset

DEEP = "[" * 200_000


def annotations() -> dict:
    """Two images, three boxes (one a crowd), two categories."""
    return {
        "images": [
            {"id": 1, "file_name": "a.png", "width": 200, "height": 100},
            {"id": 2, "file_name": "b.png", "width": 120, "height": 160},
        ],
        "annotations": [
            {"id": 11, "image_id": 1, "category_id": 1, "bbox": [10, 10, 50, 40], "area": 2000, "iscrowd": 0},
            {"id": 12, "image_id": 1, "category_id": 3, "bbox": [100, 20, 60, 60], "area": 3600, "iscrowd": 1},
            {"id": 13, "image_id": 2, "category_id": 3, "bbox": [5, 30, 90, 100], "area": 9000, "iscrowd": 0},
        ],
        "categories": [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}],
    }


def detections() -> list[dict]:
    """The ground truth as detections, slightly shifted, with falling scores."""
    return [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": [v + 1 for v in a["bbox"]], "score": s}
        for a, s in zip(annotations()["annotations"], (0.9, 0.8, 0.7), strict=True)
    ]


def write(path: Path, data) -> Path:
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def one_error(capsys: pytest.CaptureFixture, command: str) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"paadet {command}: error: "), lines[0]
    return lines[0]


# --- item 3: NaN and infinite scores and boxes in --results -------------------------------------------------


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(
    "changes, count, first",
    [
        ({(0, "score"): NAN}, 1, "entry 0's score is NaN"),
        ({(2, "score"): INF}, 1, "entry 2's score is Infinity"),
        ({(1, "bbox"): [1, 2, -INF, NAN]}, 2, "entry 1's bbox[2] is -Infinity"),
        ({(1, "bbox"): [12345.5, 2, 3, 4], (1, "score"): NAN}, 2, "entry 1's bbox[0] is Infinity"),
    ],
)
def test_non_finite_results_are_counted_and_refused(tmp_path: Path, changes: dict, count: int, first: str) -> None:
    ann_file = write(tmp_path / "ann.json", annotations())
    dets = detections()
    for (entry, key), value in changes.items():
        dets[entry][key] = value
    text = json.dumps(dets).replace("12345.5", "1e999")  # a number too large for a float: it parses as infinity
    results = write(tmp_path / "dets.json", text)
    with pytest.raises(ResultsError) as exc:
        evaluate_results_file(results, ann_file)
    message = str(exc.value)
    assert message.startswith(f"{results}: {count} non-finite values") and first in message, message


def test_all_nan_scores_fail_the_command_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    ann_file = write(tmp_path / "ann.json", annotations())
    text = json.dumps([{**d, "score": float("nan")} for d in detections()])  # Python writes NaN literals
    results = write(tmp_path / "dets.json", text)
    assert main(["eval", "--results", str(results), "--ann", str(ann_file)]) == 2
    line = one_error(capsys, "eval")
    assert str(results) in line and "3 non-finite values" in line and "entry 0's score is NaN" in line


# --- item 4: iscrowd and the other fields pycocotools reads ----------------------------------------------


@pytest.mark.parametrize("value", ["0", "no", 2.5, None, -1, 2, [0]])
def test_iscrowd_must_be_0_or_1(tmp_path: Path, value) -> None:
    data = annotations()
    data["annotations"][2]["iscrowd"] = value
    ann_file = write(tmp_path / "ann.json", data)
    with pytest.raises(DatasetError) as exc:
        load_coco(ann_file)
    message = str(exc.value)
    assert message.startswith(f"{ann_file}: annotation 13: 'iscrowd' must be 0 or 1"), message
    assert message.endswith(f"got {json.dumps(value)}"), message  # a string shows its quotes: "0", not 0


@pytest.mark.parametrize("value", [0, 1, True, False, "absent"])
def test_iscrowd_integers_and_bools_score_as_pycocotools(tmp_path: Path, value) -> None:
    data = annotations()
    if value == "absent":
        del data["annotations"][0]["iscrowd"]
    else:
        data["annotations"][0]["iscrowd"] = value
    ann_file = write(tmp_path / "ann.json", data)
    results = write(tmp_path / "dets.json", detections())
    metrics = evaluate_results_file(results, ann_file)
    crowd = value in (1, True)
    # box 11 is scored as an ordinary box (matched: AP50 1.0) unless it is a crowd (ignored; the rest still match)
    assert metrics.stats["AP50"] == pytest.approx(1.0)
    assert metrics.stats["AR100"] != pytest.approx(-1.0)
    assert (load_coco(ann_file)[0].anns[11]["iscrowd"] == 1) == crowd


BAD_FIELDS = [
    (("annotations", 0, "bbox"), [1, 2, float("nan"), 4], "annotation 11 has a non-finite 'bbox' [1, 2, NaN, 4]"),
    (("annotations", 0, "bbox"), [1, 2, 3, float("inf")], "annotation 11 has a non-finite 'bbox'"),
    (("annotations", 0, "bbox"), [1, 2, -3, 4], "annotation 11 has a 'bbox' of negative width or height"),
    (("annotations", 0, "bbox"), [1, 2, "3", 4], "annotation 11 needs a 'bbox' of four numbers"),
    (("annotations", 1, "area"), -5, "annotation 12: 'area' must be a finite number >= 0, got -5"),
    (("annotations", 1, "area"), float("nan"), "annotation 12: 'area' must be a finite number >= 0, got NaN"),
    (("annotations", 1, "area"), "12", "annotation 12: 'area' must be a finite number >= 0, got \"12\""),
    (("annotations", 1, "ignore"), "0", "annotation 12: 'ignore' must be 0 or 1"),
    (("annotations", 2, "image_id"), float("nan"), "annotation 13 needs an 'image_id' and a 'category_id'"),
    (("annotations", 2, "category_id"), None, "annotation 13 needs an 'image_id' and a 'category_id'"),
    (("images", 1, "width"), 0, "image 2: 'width' must be a finite number > 0, got 0"),
    (("images", 0, "height"), "100", "image 1: 'height' must be a finite number > 0, got \"100\""),
    (("images", 0, "height"), float("inf"), "image 1: 'height' must be a finite number > 0, got Infinity"),
    (("images", 0, "id"), float("nan"), "images[0] needs an 'id'"),
    (("categories", 1, "name"), 5, "category 3: 'name' must be a string, got 5"),
]


@pytest.mark.parametrize("where, value, message", BAD_FIELDS)
def test_fields_pycocotools_reads_are_checked(tmp_path: Path, where: tuple, value, message: str) -> None:
    data = annotations()
    section, index, key = where
    data[section][index][key] = value
    ann_file = write(tmp_path / "ann.json", data)
    with pytest.raises(DatasetError) as exc:
        load_coco(ann_file)
    assert str(exc.value).startswith(f"{ann_file}: ") and message in str(exc.value), str(exc.value)


def test_bad_iscrowd_stops_eval_before_the_model(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The annotation file is reported, not the checkpoint that is not there (the model would come next)."""
    data = annotations()
    data["annotations"][0]["iscrowd"] = "no"
    ann_file = write(tmp_path / "ann.json", data)
    (tmp_path / "images").mkdir()
    code = main(["eval", "--ann", str(ann_file), "--images", str(tmp_path / "images"), "--checkpoint", "none.pth"])
    line = one_error(capsys, "eval")
    assert code == 2 and f"{ann_file}: annotation 11: 'iscrowd' must be 0 or 1" in line and '"no"' in line


def test_training_refuses_a_string_iscrowd(tmp_path: Path) -> None:
    """mmdetection's parser (as paadet's) takes any truthy iscrowd as a crowd: "0" would drop every box."""
    data = annotations()
    for ann in data["annotations"]:
        ann["iscrowd"] = "0"
    ann_file = write(tmp_path / "ann.json", data)
    (tmp_path / "images").mkdir()
    with pytest.raises(DatasetError, match=r"ann\.json: annotation 11: 'iscrowd' must be 0 or 1 .*got \"0\""):
        CocoTrainDataset(ann_file, tmp_path / "images")


# --- item 8: JSON nested too deeply ---------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["--ann", "--results"])
def test_deeply_nested_json_is_named(tmp_path: Path, which: str, capsys: pytest.CaptureFixture) -> None:
    files = {"--ann": write(tmp_path / "ann.json", annotations()), "--results": write(tmp_path / "d.json", [])}
    deep = write(tmp_path / "deep.json", DEEP)
    files[which] = deep
    assert main(["eval", "--results", str(files["--results"]), "--ann", str(files["--ann"])]) == 2
    line = one_error(capsys, "eval")
    assert f"{deep}: " in line and "nested too deeply" in line, line


def test_deeply_nested_info_does_not_fail_the_scoring(tmp_path: Path) -> None:
    """A nested ``info`` that parses (600 levels) is never deep-copied, so the metrics come out."""
    plain = write(tmp_path / "plain.json", annotations())
    with_info = annotations()
    with_info["info"] = json.loads("[" * 600 + "]" * 600)
    nested = write(tmp_path / "nested.json", with_info)
    results = write(tmp_path / "dets.json", detections())
    expected = evaluate_results_file(results, plain).stats
    assert [evaluate_results_file(results, nested).stats[k] for k in METRIC_KEYS] == [expected[k] for k in METRIC_KEYS]


def test_deeply_nested_training_annotations_are_named(tmp_path: Path) -> None:
    deep = write(tmp_path / "deep.json", DEEP)
    (tmp_path / "images").mkdir()
    with pytest.raises(DatasetError, match=r"deep\.json: annotation file is nested too deeply"):
        CocoTrainDataset(deep, tmp_path / "images")


def test_deeply_nested_batch_and_journal_files(tmp_path: Path) -> None:
    """paadet's own files, damaged: a batch folder's run.json is refused by name; a journal's last line is torn."""
    (tmp_path / "batch").mkdir()
    write(tmp_path / "batch" / RUN_FILE, DEEP)
    with pytest.raises(BatchError, match=r"run\.json: unreadable"):
        OutputFolder(tmp_path / "batch").check_run({"backend": "torch"})
    journal = tmp_path / "journal.jsonl"
    header = {"format": JOURNAL_FORMAT, "version": JOURNAL_VERSION, "settings": {"a": 1}}
    journal.write_text(json.dumps(header) + "\n" + DEEP)
    logged: list[str] = []
    opened = Journal.open(journal, {"a": 1}, resume=True, log=logged.append)
    opened.close()
    assert opened.records == {} and "torn last line" in logged[0]
    assert journal.read_text() == json.dumps(header) + "\n"


def test_deeply_nested_graph_metadata_is_named() -> None:
    """An exported graph whose paadet metadata is nested past the parser's depth: one line naming the graph."""
    with pytest.raises(ExportFormatError, match=r"^paa\.onnx: malformed paadet metadata \(nested too deeply\)"):
        ExportInfo.from_metadata({METADATA_KEY: DEEP}, "paa.onnx")
