"""ONNX export: ONNX Runtime's detections vs the torch backend's, raw maps, checker, bad inputs.

Small custom presets keep the CPU cost low: a static 256x256 one and a /32 one whose inputs are at
most 256x320. Each graph is exported once per module.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from fixtures import run_cli_without_torch

from paadet.compare import MatchReport, match_detections
from paadet.data.synthetic import synthetic_image
from paadet.detector import Detector
from paadet.export import ExportError, ExportFormatError, ExportInfo, export_onnx
from paadet.model import PAANet
from paadet.model.seeded import seeded_net, seeded_state_dict
from paadet.postprocess import PostprocessConfig
from paadet.preprocess import Preset, normalize_pad, resize
from paadet.runtime.onnxruntime_backend import OnnxModelError, OnnxRuntimeBackend
from paadet.runtime.torch_backend import TorchBackend

FIXED = Preset("fixed256", (256, 256), size_divisor=None, fixed_size=(256, 256))
DIV32 = Preset("div32", (320, 256), size_divisor=32)
SIZES = [(180, 240), (300, 200), (256, 256), (120, 330)]


@pytest.fixture(scope="module")
def net() -> PAANet:
    torch.set_num_threads(2)
    return seeded_net(0)


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    return [synthetic_image(h, w, seed=i) for i, (h, w) in enumerate(SIZES)]


def compare(
    ort_backend: OnnxRuntimeBackend,
    torch_backend: TorchBackend,
    images: list[np.ndarray],
    batch_size: int,
    iou_thr: float,
    score_tol: float,
) -> MatchReport:
    """Run both backends through :class:`Detector` and match detections image by image."""
    ours = Detector(ort_backend, batch_size=batch_size, workers=0).predict(images)
    ref = Detector(torch_backend, batch_size=batch_size, workers=0).predict(images)
    total = MatchReport()
    for r, o in zip(ref, ours, strict=False):
        total += match_detections(
            r.boxes, r.scores, r.labels, o.boxes, o.scores, o.labels, iou_thr=iou_thr, score_tol=score_tol
        )
    return total


def assert_parity(report: MatchReport, min_matched: float, max_extra: float) -> None:
    assert report.reference > 0
    assert report.matched_fraction >= min_matched, str(report)
    assert report.extra <= max_extra * report.reference, str(report)


@pytest.fixture(scope="module")
def static_fp32(net, tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx") / "static.onnx"
    report = export_onnx(net, path, FIXED, batch_size=2, simplify=True, verify=True)
    return path, report


@pytest.fixture(scope="module")
def dynamic_fp32_novote(net, tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx") / "dynamic_novote.onnx"
    report = export_onnx(net, path, DIV32, dynamic_batch=True, score_voting=False, simplify=False, verify=False)
    return path, report


def test_static_fp32_export_report_and_checker(static_fp32):
    path, report = static_fp32
    assert report.parity_ok, report.parity
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    dims = {v.name: [d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim] for v in model.graph.output}
    assert dims == {"boxes": [2, 100, 4], "scores": [2, 100], "labels": [2, 100], "num_dets": [2]}
    inputs = {v.name: [d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim] for v in model.graph.input}
    assert inputs == {"images": [2, 256, 256, 3], "img_shapes": [2, 2], "scale_factors": [2, 2]}
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    info = ExportInfo.from_metadata({p.key: p.value for p in model.metadata_props}, str(path))
    assert (info.graph, info.batch, info.input_size, info.precision, info.score_voting) == (
        "full",
        2,
        (256, 256),
        "fp32",
        True,
    )
    assert str(path) in str(report) and "next:" in str(report)


def test_static_fp32_parity_with_voting(static_fp32, net, images):
    path, _ = static_fp32
    backend = OnnxRuntimeBackend.from_file(path, providers=["CPUExecutionProvider"], preset=FIXED)
    assert backend.fixed_batch == 2
    report = compare(backend, TorchBackend(net, FIXED), images[:3], batch_size=2, iou_thr=0.99, score_tol=1e-4)
    assert_parity(report, 0.995, 0.005)


def test_dynamic_batch_and_size_parity_without_voting(dynamic_fp32_novote, net, images):
    path, _report = dynamic_fp32_novote
    model = onnx.load(str(path), load_external_data=False)
    shape = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert shape == ["batch", "height", "width", 3]
    backend = OnnxRuntimeBackend.from_file(path, preset=DIV32)
    assert backend.fixed_batch is None and backend.info.score_voting is False
    # 180x240 and 170x240 share the padded size 256x320 (one batch of 2); 300x200 pads to 320x224
    batch = [images[0], images[1], synthetic_image(170, 240, seed=9)]
    ref_backend = TorchBackend(net, DIV32, postprocess=PostprocessConfig(score_voting=False))
    result = compare(backend, ref_backend, batch, batch_size=2, iou_thr=0.99, score_tol=1e-4)
    assert_parity(result, 0.995, 0.005)


def test_fp16_graph_parity(net, images, tmp_path):
    path = tmp_path / "fp16.onnx"
    report = export_onnx(net, path, FIXED, dynamic_batch=True, fp16=True, simplify=False, verify=False)
    assert report.info.precision == "fp16"
    model = onnx.load(str(path))
    types = {i.data_type for i in model.graph.initializer if len(i.dims) == 4}
    assert types == {onnx.TensorProto.FLOAT16}  # conv weights in half precision
    backend = OnnxRuntimeBackend.from_file(path, preset=FIXED)
    result = compare(backend, TorchBackend(net, FIXED), images[:2], batch_size=2, iou_thr=0.95, score_tol=1e-2)
    assert_parity(result, 0.97, 0.03)


def test_raw_maps_equal_network(net, tmp_path):
    path = tmp_path / "raw.onnx"
    report = export_onnx(net, path, DIV32, dynamic_batch=True, raw=True, simplify=False, verify=False)
    assert report.info.graph == "raw"
    backend = OnnxRuntimeBackend.from_file(path, preset=DIV32)
    for h, w in [(200, 300), (256, 192)]:
        resized, meta = resize(synthetic_image(h, w, seed=3), DIV32)
        x = normalize_pad(torch.from_numpy(resized), meta.pad_shape)[None].repeat(2, 1, 1, 1)
        got = backend.session.run(None, {"images": x.numpy()})
        with torch.inference_mode():
            cls, box, iou = net(x)
        assert len(got) == 15
        for g, r in zip(got, (*cls, *box, *iou), strict=False):
            assert g.shape == tuple(r.shape)
            np.testing.assert_allclose(g, r.numpy(), rtol=1e-3, atol=1e-3)


def test_raw_graph_through_backend(net, images, tmp_path):
    path = tmp_path / "raw_static.onnx"
    export_onnx(net, path, FIXED, batch_size=1, raw=True, simplify=False, verify=False)
    backend = OnnxRuntimeBackend.from_file(path)
    assert backend.preset == FIXED
    result = compare(backend, TorchBackend(net, FIXED), images[:1], batch_size=1, iou_thr=0.99, score_tol=1e-4)
    assert_parity(result, 0.995, 0.005)


def one_line_naming(exc: BaseException, path) -> str:
    text = str(exc)
    assert "\n" not in text and str(path) in text, text
    return text


def test_not_a_paadet_export(tmp_path):
    path = tmp_path / "other.onnx"
    node = onnx.helper.make_node("Relu", ["x"], ["y"])
    graph = onnx.helper.make_graph(
        [node],
        "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
    )
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]), str(path))
    with pytest.raises(ExportFormatError) as err:
        OnnxRuntimeBackend.from_file(path)
    assert "not a paadet export" in one_line_naming(err.value, path)


def test_text_file_and_missing_file(tmp_path):
    path = tmp_path / "notes.onnx"
    path.write_text("this is not a model\nsecond line\n")
    with pytest.raises(ExportFormatError) as err:
        OnnxRuntimeBackend.from_file(path)
    assert "cannot be read as an ONNX model" in one_line_naming(err.value, path)
    missing = tmp_path / "missing.onnx"
    with pytest.raises(ExportFormatError) as err:
        OnnxRuntimeBackend.from_file(missing)
    one_line_naming(err.value, missing)


def test_static_graph_refuses_what_does_not_fit(static_fp32, images):
    path, _ = static_fp32
    with pytest.raises(OnnxModelError) as err:
        OnnxRuntimeBackend.from_file(path, preset="mmdet")
    assert "preset" in one_line_naming(err.value, path)
    backend = OnnxRuntimeBackend.from_file(path, preset=FIXED)
    too_big = Preset("big", (320, 320), size_divisor=None, fixed_size=(320, 320))
    resized, meta = resize(images[0], too_big)
    with pytest.raises(OnnxModelError) as err:
        backend.infer([resized], [meta])
    assert "does not fit" in one_line_naming(err.value, path)
    resized, meta = resize(images[0], FIXED)
    with pytest.raises(OnnxModelError) as err:
        backend.infer([resized] * 3, [meta] * 3)
    assert "static batch of 2" in one_line_naming(err.value, path)


def test_export_argument_errors(net, tmp_path):
    with pytest.raises(ExportError):
        export_onnx(net, tmp_path / "x.onnx", FIXED, input_size=(320, 320), verify=False)
    with pytest.raises(ExportError):
        export_onnx(net, tmp_path / "x.onnx", DIV32, input_size=(250, 320), verify=False)
    with pytest.raises(ExportError):
        export_onnx(net, tmp_path / "x.onnx", DIV32, opset=9, verify=False)


def test_cli_export_real_preset(tmp_path, capsys):
    """``paadet export`` with a checkpoint file and the real 800 preset (static 800x800): shapes and metadata.

    Parity is checked on the small presets above; here the export alone (no ONNX Runtime run) keeps it cheap.
    """
    from paadet.cli import main

    ckpt = tmp_path / "seeded.pth"
    torch.save({"state_dict": seeded_state_dict(0)}, ckpt)
    out = tmp_path / "paa800.onnx"
    rc = main(
        [
            "export",
            "--checkpoint",
            str(ckpt),
            "--preset",
            "800",
            "--output",
            str(out),
            "--batch-size",
            "2",
            "--no-simplify",
            "--no-verify",
        ]
    )
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "images         uint8    [2, 800, 800, 3]" in text and "boxes          float32  [2, 100, 4]" in text
    model = onnx.load(str(out), load_external_data=False)
    info = ExportInfo.from_metadata({p.key: p.value for p in model.metadata_props}, str(out))
    assert (info.preset.name, info.input_size, info.batch) == ("800", (800, 800), 2)


def test_cli_bad_checkpoint_is_one_line(tmp_path, capsys):
    from paadet.cli import main

    bad = tmp_path / "bad.pth"
    bad.write_text("not a checkpoint")
    rc = main(["export", "--checkpoint", str(bad), "--output", str(tmp_path / "x.onnx"), "--no-verify"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and str(bad) in err


def test_predict_and_eval_on_onnxruntime_import_no_torch(dynamic_fp32_novote, images, tmp_path):
    """`paadet predict` and `paadet eval` on a full exported graph run without importing torch (about 1 s of
    start-up), with the detections this (torch-importing) process gets from the same graph."""
    import json

    import cv2

    path, _ = dynamic_fp32_novote
    folder = tmp_path / "images"
    folder.mkdir()
    names = []
    for i, image in enumerate(images[:2]):
        names.append(f"{i}.png")
        cv2.imwrite(str(folder / names[-1]), image)
    out = tmp_path / "r.json"
    run_cli_without_torch(
        [
            "predict",
            str(folder),
            "--backend",
            "onnxruntime",
            "--model",
            str(path),
            "--output",
            str(out),
            "--no-progress",
        ]
    )
    expected = Detector(OnnxRuntimeBackend.from_file(path), batch_size=1, workers=0).predict(
        [str(folder / n) for n in names]
    )
    assert len(json.loads(out.read_text())) == sum(len(r.scores) for r in expected) > 0
    ann = tmp_path / "ann.json"
    ann.write_text(
        json.dumps(
            {
                "images": [
                    {"id": i + 1, "file_name": n, "height": images[i].shape[0], "width": images[i].shape[1]}
                    for i, n in enumerate(names)
                ],
                "annotations": [
                    {
                        "id": i + 1,
                        "image_id": i + 1,
                        "category_id": 1,
                        "bbox": [4, 4, 30, 30],
                        "area": 900,
                        "iscrowd": 0,
                    }
                    for i in range(len(names))
                ],
                "categories": [{"id": 1, "name": "person"}],
            }
        )
    )
    run_cli_without_torch(
        [
            "eval",
            "--backend",
            "onnxruntime",
            "--model",
            str(path),
            "--ann",
            str(ann),
            "--images",
            str(folder),
            "--output-dir",
            str(tmp_path / "eval"),
            "--no-progress",
        ]
    )
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["images"]["evaluated"] == 2 and -1 <= metrics["AP"] <= 1
