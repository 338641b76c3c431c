"""What every backend returns, and the post-processing settings: plain data, importable without torch.

:class:`Detections` is the batch result of :meth:`paadet.runtime.base.Backend.infer`: torch tensors from
the torch backend (and from a raw exported graph, post-processed in PyTorch), numpy arrays from a full
exported graph run by ONNX Runtime or OpenVINO, so that those backends run without importing torch
(about 1 s of a command's start-up). Both are indexed, sliced and converted (``numpy.asarray``) alike.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, NamedTuple, Union

if TYPE_CHECKING:
    import numpy as np
    from torch import Tensor

    Array = Union[Tensor, np.ndarray]


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
    def from_dict(cls, values: dict) -> "PostprocessConfig":
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

    boxes: "Array"
    scores: "Array"
    labels: "Array"
    num_dets: "Array"
