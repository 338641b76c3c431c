"""The torch backend under test-time augmentation: each image run at several scales and flips, the candidates of
every view mapped back to the original image, and one NMS with PAA's score voting over their union.

The merge (why it is this one: ``docs/tta.md``):

1. each view is resized from the decoded image (:func:`paadet.preprocess.resize` with the view's preset), mirrored
   if it is a flipped view, and run through the network;
2. its candidates are PAA's own (:func:`paadet.postprocess.select_candidates`: the per-level top-k, decoded and
   rescaled to original-image pixels); a flipped view's boxes are mirrored back, ``x -> W - x`` on the original
   width ``W`` (mmdetection's ``bbox_flip``);
3. all views' candidates of an image are concatenated, and :func:`paadet.postprocess.multiclass_nms` runs once
   over the union: class-aware NMS, the best ``max_per_img`` kept, and each kept box replaced by the
   score-weighted vote of the union's candidates of its class that overlap it.

With one view at the preset's scale and no flip, that is exactly the detection without TTA.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

from paadet.detections import Detections
from paadet.postprocess import Candidates, multiclass_nms, select_candidates
from paadet.preprocess import ImageMeta, resize
from paadet.runtime.base import Backend, StageTimer
from paadet.runtime.spec import TORCH
from paadet.runtime.torch_backend import TorchBackend, detections_to_host
from paadet.runtime.tta import TTAOptions, View, source_preset


def unflip(candidates: Candidates, widths: torch.Tensor) -> Candidates:
    """Candidates of a left-right mirrored view, mapped back: ``x1, x2 -> W - x2, W - x1`` per image.

    Args:
        candidates: boxes ``[B, A, 4]`` xyxy in the mirrored original image's pixels.
        widths: ``[B]`` each original image's width ``W``.
    """
    boxes = candidates.boxes
    w = widths.to(boxes.dtype)[:, None]
    mirrored = torch.stack([w - boxes[..., 2], boxes[..., 1], w - boxes[..., 0], boxes[..., 3]], dim=-1)
    return Candidates(mirrored, candidates.nms_scores)


def union(per_image: Sequence[Sequence[Candidates]]) -> Candidates:
    """Each image's candidate lists (one per view, ``boxes [A_v, 4]``, ``nms_scores [A_v, C]``) concatenated,
    and the images padded to one length with score-0 rows (below any ``score_thr``, so never candidates):
    ``boxes [B, A, 4]``, ``nms_scores [B, A, C]``."""
    boxes = [torch.cat([c.boxes for c in views]) for views in per_image]
    scores = [torch.cat([c.nms_scores for c in views]) for views in per_image]
    length = max(b.shape[0] for b in boxes)
    out_boxes = boxes[0].new_zeros(len(boxes), length, 4)
    out_scores = scores[0].new_zeros(len(scores), length, scores[0].shape[-1])
    for i, (b, s) in enumerate(zip(boxes, scores, strict=True)):
        out_boxes[i, : b.shape[0]] = b
        out_scores[i, : s.shape[0]] = s
    return Candidates(out_boxes, out_scores)


class TTABackend(Backend):
    """A :class:`TorchBackend` run on several views of each image, their candidates merged (module docstring).

    Its ``preset`` is native: the loader hands it each image at its own size, and each view is resized from it
    (so a view is what the detector without TTA would see at that scale). Timings: ``preprocess`` holds every
    view's resizing and normalisation, ``network`` every view's forward pass, ``postprocess`` the candidates and
    the one merge.

    Args:
        inner: the torch backend (its preset is the views' base, its post-processing settings the merge's).
        options: the scales and flips.
    """

    name = TORCH

    def __init__(self, inner: TorchBackend, options: TTAOptions) -> None:
        self.inner = inner
        self.options = options
        self.base_preset = inner.preset
        self.views: list[View] = options.views(inner.preset)
        self.preset = source_preset(inner.preset)
        self.classes = inner.classes
        self.device = inner.device

    @torch.inference_mode()
    def infer(self, images: list[np.ndarray], metas: list[ImageMeta], timer: StageTimer | None = None) -> Detections:
        """Detect on BGR ``uint8`` images at their own size (as :attr:`preset` loads them); boxes in their pixels.

        Raises:
            ValueError: an image that was resized (its meta's ``img_shape`` is not its ``ori_shape``).
        """
        timer = timer or StageTimer(self.device)
        for meta in metas:
            if tuple(meta.img_shape) != tuple(meta.ori_shape):
                raise ValueError(
                    f"test-time augmentation resizes each view itself: give images at their own size "
                    f"(preset {self.preset.name}), not resized to {meta.img_shape[0]}x{meta.img_shape[1]}"
                )
        per_image: list[list[Candidates]] = [[] for _ in images]
        for view in self.views:
            for indices, candidates in self.view_candidates(view, images, timer):
                for row, index in enumerate(indices):
                    per_image[index].append(Candidates(candidates.boxes[row], candidates.nms_scores[row]))
        with timer.stage("postprocess"):
            dets = multiclass_nms(union(per_image), self.inner.post.config)
        if self.device.type != "cuda":
            return Detections(*(t.cpu() for t in dets))
        with timer.stage("copy_back"):
            return detections_to_host(dets)

    def view_candidates(
        self, view: View, images: Sequence[np.ndarray], timer: StageTimer
    ) -> Iterator[tuple[list[int], Candidates]]:
        """One view of ``images`` (at their own size): ``(indices, candidates)`` per network call, the images of
        one padded size together (each padded as it would be alone), boxes in original-image pixels."""
        inner = self.inner
        with timer.stage("preprocess"):
            pairs = [resize(image, view.preset) for image in images]
            if view.flip:
                pairs = [(np.ascontiguousarray(resized[:, ::-1]), meta) for resized, meta in pairs]
        groups: dict[tuple[int, int], list[int]] = {}
        for i, (_, meta) in enumerate(pairs):
            groups.setdefault(meta.pad_shape, []).append(i)
        for indices in groups.values():
            metas = [pairs[i][1] for i in indices]
            batch = inner.prepare([pairs[i][0] for i in indices], metas, timer)
            with timer.stage("network"):
                cls_logits, box_deltas, iou_logits = inner.network(batch)
            with timer.stage("postprocess"):
                candidates = self._candidates(cls_logits, box_deltas, iou_logits, metas)
                if view.flip:
                    widths = torch.tensor([m.ori_shape[1] for m in metas], dtype=torch.float32, device=self.device)
                    candidates = unflip(candidates, widths)
            yield indices, candidates

    def _candidates(
        self,
        cls_logits: list[torch.Tensor],
        box_deltas: list[torch.Tensor],
        iou_logits: list[torch.Tensor],
        metas: Sequence[ImageMeta],
    ) -> Candidates:
        """PAA's candidates of one network call (:func:`select_candidates` with the backend's own settings)."""
        post = self.inner.post
        feat_sizes = [(int(c.shape[-2]), int(c.shape[-1])) for c in cls_logits]
        img_shapes = torch.tensor([m.img_shape for m in metas], dtype=torch.float32, device=self.device)
        scale_factors = torch.tensor([m.scale_factor for m in metas], dtype=torch.float32, device=self.device)
        return select_candidates(
            cls_logits,
            box_deltas,
            iou_logits,
            post.anchors(feat_sizes, self.device),
            img_shapes,
            scale_factors,
            post.config.nms_pre,
            post.box_coder,
        )

    def describe(self) -> dict:
        info = self.inner.describe()
        info.update(
            preset=self.base_preset.name,
            tta=f"{self.options.describe()}: {len(self.views)} views ({', '.join(v.name for v in self.views)}), "
            "candidates merged by one NMS and score voting",
        )
        return info
