"""Detections as data, importable without torch: what every backend returns, the post-processing settings, one
image's result (:class:`ImageResult`) and its COCO results entries.

:class:`Detections` is the batch result of :meth:`paadet.runtime.base.Backend.infer`: torch tensors from
the torch backend (and from a raw exported graph, post-processed in PyTorch), numpy arrays from a full
exported graph run by ONNX Runtime or OpenVINO, so that those backends run without importing torch
(about 1 s of a command's start-up). Both are indexed, sliced and converted (``numpy.asarray``) alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple, Protocol

import numpy as np

from paadet.classes import CATEGORY_IDS, ClassList

if TYPE_CHECKING:
    from torch import Tensor

    Array = Tensor | np.ndarray


class HasPath(Protocol):
    """An input with a file path (:class:`paadet.data.images.ImageSource` is one)."""

    path: Path


@dataclass(frozen=True)
class PostprocessConfig:
    """Test-time settings of the reference config (``paa_r50_fpn_1x_coco.py``'s ``test_cfg``).

    Attributes:
        nms_pre: anchors kept per level (by ``max_c sqrt(score_c * iou)``) before NMS.
        score_thr: candidates need ``sqrt(score * iou) > score_thr`` (strict).
        iou_thr: NMS suppresses same-class boxes with IoU strictly above this.
        max_per_img: detections kept per image after NMS.
        score_voting: refine each kept box by PAA's score voting.
        voting_iou_thr: voting uses candidates with IoU strictly above this.
        voting_sigma: the Gaussian's ``sigma`` in ``exp(-(1 - iou)^2 / sigma)``.
        nms_tile: candidates of each image that NMS decides per step (speed and memory only;
            results are exact for any value, see :func:`paadet.postprocess.greedy_nms_first`).
        nms_sweeps_per_check: fixed-point sweeps between convergence tests in NMS (speed only: each
            test is a host-device synchronisation on a GPU).
        nms_chunk_elements: upper bound on the elements of one IoU block (memory).
    """

    nms_pre: int = 1000
    score_thr: float = 0.05
    iou_thr: float = 0.6
    max_per_img: int = 100
    score_voting: bool = True
    voting_iou_thr: float = 0.01
    voting_sigma: float = 0.025
    nms_tile: int = 256
    nms_sweeps_per_check: int = 4
    nms_chunk_elements: int = 1 << 26

    @classmethod
    def from_dict(cls, values: dict) -> PostprocessConfig:
        """The config from a dict such as :func:`dataclasses.asdict` gives, ignoring keys this version does not know
        (speed-only settings of other versions, e.g. in an exported graph's metadata)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


class Detections(NamedTuple):
    """Fixed-shape detections of a batch, sorted by score within each image; torch tensors or numpy arrays
    (see the module's docstring), on the host unless a torch backend keeps them on its device.

    Attributes:
        boxes: ``[B, max_det, 4]`` float32 xyxy in original-image pixels (zeros beyond ``num_dets``).
        scores: ``[B, max_det]`` float32 (zeros beyond ``num_dets``).
        labels: ``[B, max_det]`` int64 class indices 0..C-1 (-1 beyond ``num_dets``).
        num_dets: ``[B]`` int64 number of valid rows per image.
    """

    boxes: Array
    scores: Array
    labels: Array
    num_dets: Array


@dataclass
class ImageResult:
    """Detections of one image, sorted by score.

    Attributes:
        boxes: ``[N, 4]`` float32 xyxy in original-image pixels.
        scores: ``[N]`` float32.
        labels: ``[N]`` int64 class indices into the model's class list (COCO's 80: see :mod:`paadet.classes`).
        ori_shape: ``(height, width)`` of the decoded image.
        file_name: the image's name for reports (relative path), or None for arrays.
    """

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    ori_shape: tuple[int, int]
    file_name: str | None = None

    def to_coco(self, image_id: int, category_ids: Sequence[int] | None = None) -> list[dict]:
        """COCO results entries (``bbox`` as ``[x, y, w, h]``, ``category_id`` from ``category_ids``: the
        model's, default COCO's 80)."""
        category_ids = CATEGORY_IDS if category_ids is None else category_ids
        out = []
        for (x1, y1, x2, y2), score, label in zip(
            self.boxes.tolist(), self.scores.tolist(), self.labels.tolist(), strict=False
        ):
            entry = {
                "image_id": image_id,
                "category_id": category_ids[label],
                "bbox": [x1, y1, x2 - x1, y2 - y1],
                "score": score,
            }
            if self.file_name is not None:
                entry["file_name"] = self.file_name
            out.append(entry)
        return out


def image_ids(sources: Sequence[HasPath]) -> list[int]:
    """COCO ``image_id`` per input: the file stem when every stem is a distinct integer (COCO's
    ``000000397133.jpg`` -> 397133), otherwise the position in the input list (0, 1, ...: inputs in the
    order given, each folder's images sorted by their path in it)."""
    stems = [s.path.stem for s in sources]
    if stems and all(st.isdigit() for st in stems) and len({int(st) for st in stems}) == len(stems):
        return [int(st) for st in stems]
    return list(range(len(sources)))


def coco_entries(results: dict, sources: Sequence[HasPath], category_ids: Sequence[int] | None = None) -> list[dict]:
    """COCO results entries for ``results`` keyed by input position, ids from :func:`image_ids` over
    ``sources``, in input order; inputs without a result contribute nothing. ``category_ids``: the
    model's (default COCO's 80)."""
    ids = image_ids(sources)
    entries: list[dict] = []
    for index in sorted(results):
        entries.extend(results[index].to_coco(ids[index], category_ids=category_ids))
    return entries


def detections_json(
    result: ImageResult, classes: ClassList, score_thr: float | None = None, max_dets: int | None = None
) -> dict:
    """One image's detections as ``paadet serve`` answers them (``/v1/detect``) and ``paadet predict`` writes each
    JSON line: ``{"width", "height", "detections": [{"bbox": [x1, y1, x2, y2], "score", "label", "category_id",
    "name"}]}``, sorted by score (ties keep the model's order), at least ``score_thr``, at most ``max_dets``."""
    order = np.argsort(-result.scores, kind="stable")
    if score_thr is not None:
        order = order[result.scores[order] >= np.float32(score_thr)]
    if max_dets is not None:
        order = order[:max_dets]
    boxes, scores, labels = result.boxes[order].tolist(), result.scores[order].tolist(), result.labels[order].tolist()
    height, width = result.ori_shape
    return {
        "width": int(width),
        "height": int(height),
        "detections": [
            {
                "bbox": box,
                "score": score,
                "label": label,
                "category_id": classes.category_ids[label],
                "name": classes.names[label],
            }
            for box, score, label in zip(boxes, scores, labels, strict=False)
        ],
    }


@dataclass
class FrameResult:
    """Detections of one frame of a video, webcam or stream (what :meth:`paadet.detector.Detector.stream` yields).

    Attributes:
        source: the source's report name.
        frame: the frame's 0-based index among the source's decoded frames.
        time_ms: its timestamp in milliseconds from the stream's start (None for a still image).
        result: its detections (boxes xyxy in the frame's pixels).
        image: the decoded frame, BGR ``uint8`` ``[H, W, 3]``, when asked for (to draw on), else None.
    """

    source: str
    frame: int
    time_ms: float | None
    result: ImageResult
    image: np.ndarray | None = None

    def to_json(self, classes: ClassList) -> dict:
        """The frame's JSON line: ``{"source", "frame", "time_ms", "width", "height", "detections"}`` with the
        detections of :func:`detections_json`."""
        return {
            "source": self.source,
            "frame": self.frame,
            "time_ms": self.time_ms,
            **detections_json(self.result, classes),
        }
