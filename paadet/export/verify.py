"""Check an export against PyTorch: ONNX Runtime (CPU) vs :class:`TorchBackend` on a generated image."""

from __future__ import annotations

import os

import numpy as np
import torch

from paadet.compare import match_detections
from paadet.export.sample import sample_image
from paadet.model import PAANet
from paadet.postprocess import PostprocessConfig
from paadet.preprocess import Preset, normalize_pad

FP32_TOLERANCE = {"iou_thr": 0.99, "score_tol": 1e-4, "min_matched": 0.995, "max_extra": 0.005}
FP16_TOLERANCE = {"iou_thr": 0.95, "score_tol": 1e-2, "min_matched": 0.97, "max_extra": 0.03}


def verify_export(
    path: str | os.PathLike,
    net: PAANet,
    preset: Preset,
    fp16: bool = False,
    config: PostprocessConfig = PostprocessConfig(),
    seed: int = 0,
) -> tuple[str, bool]:
    """Run ``path`` on ONNX Runtime's CPU provider and ``net`` in PyTorch (fp32, CPU) on one generated image.

    Full graphs are compared with :func:`paadet.compare.match_detections` (fp32: IoU >= 0.99 and
    |score diff| <= 1e-4 for >= 99.5% of PyTorch's detections, <= 0.5% extra; fp16: IoU >= 0.95,
    |diff| <= 1e-2, >= 97%); raw graphs by the largest absolute difference of the 15 maps.

    Returns:
        ``(one-line summary, passed)``.
    """
    from paadet.runtime.onnxruntime_backend import OnnxRuntimeBackend
    from paadet.runtime.torch_backend import TorchBackend

    backend = OnnxRuntimeBackend.from_file(path, providers=["CPUExecutionProvider"], preset=preset)
    resized, meta = sample_image(preset, backend.info.input_size, seed=seed)
    if backend.info.graph == "raw":
        x = normalize_pad(torch.from_numpy(resized), meta.pad_shape)[None]
        rows = backend.fixed_batch or 1
        feed = x.expand(rows, -1, -1, -1).contiguous().numpy()
        got = backend.session.run(backend.output_names, {backend.input_names[0]: feed})
        with torch.inference_mode():
            cls, box, iou = net.eval()(x)
        diffs = [float(np.abs(g[:1] - r.numpy()).max()) for g, r in zip(got, (*cls, *box, *iou), strict=False)]
        scale = max(float(r.abs().max()) for r in (*cls, *box, *iou))
        worst = max(diffs)
        tol = (2e-2 if fp16 else 1e-3) * max(scale, 1.0)
        return (
            f"15 maps, max |diff| {worst:.2e} (largest |value| {scale:.1f}) "
            f"on a {meta.pad_shape[0]}x{meta.pad_shape[1]} input",
            worst <= tol,
        )
    ref = TorchBackend(net, preset=preset, postprocess=config).infer([resized], [meta])
    ours = backend.infer([resized], [meta])
    n_ref, n_ours = int(ref.num_dets[0]), int(ours.num_dets[0])
    tol = FP16_TOLERANCE if fp16 else FP32_TOLERANCE
    report = match_detections(
        ref.boxes[0, :n_ref],
        ref.scores[0, :n_ref],
        ref.labels[0, :n_ref],
        ours.boxes[0, :n_ours],
        ours.scores[0, :n_ours],
        ours.labels[0, :n_ours],
        iou_thr=tol["iou_thr"],
        score_tol=tol["score_tol"],
    )
    extra = report.extra / max(report.reference, 1)
    ok = report.matched_fraction >= tol["min_matched"] and extra <= tol["max_extra"]
    rule = f"IoU >= {tol['iou_thr']}, |score diff| <= {tol['score_tol']:g}"
    return f"{report} ({rule}) on a generated {meta.ori_shape[0]}x{meta.ori_shape[1]} image", ok
