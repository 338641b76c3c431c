"""IoU, GIoU, valid flags and the batched MaxIoUAssigner: hand-computed cases (ties, the low-quality
overwrite, images without GT, invalid anchors) and agreement with a plain per-image, per-GT transcription
of mmdetection 3.3's ``MaxIoUAssigner.assign_wrt_overlaps`` on random batches."""
from __future__ import annotations

import math

import pytest
import torch

from paadet.errors import PaadetError
from paadet.model.anchors import AnchorGenerator, feature_sizes
from paadet.train.assign import (MaxIoUAssigner, aligned_giou, aligned_iou, pad_targets, pairwise_iou,
                                 valid_flags)

STRIDES = (8, 16, 32, 64, 128)


# ---------------------------------------------------------------- plain transcriptions of mmdetection 3.3

def mmdet_bbox_overlaps(b1: torch.Tensor, b2: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``bbox_overlaps(b1 [M, 4], b2 [N, 4], mode='iou', is_aligned=False)``, a line-by-line copy."""
    area1 = (b1[..., 2] - b1[..., 0]) * (b1[..., 3] - b1[..., 1])
    area2 = (b2[..., 2] - b2[..., 0]) * (b2[..., 3] - b2[..., 1])
    lt = torch.max(b1[..., :, None, :2], b2[..., None, :, :2])
    rb = torch.min(b1[..., :, None, 2:], b2[..., None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    overlap = wh[..., 0] * wh[..., 1]
    union = area1[..., None] + area2[..., None, :] - overlap
    union = torch.max(union, union.new_tensor([eps]))
    return overlap / union


def mmdet_assign(anchors: torch.Tensor, gt_boxes: torch.Tensor, pos_iou_thr: float = 0.1, neg_iou_thr: float = 0.1,
                 min_pos_iou: float = 0.0) -> torch.Tensor:
    """``MaxIoUAssigner.assign`` on one image's valid anchors (gt_max_assign_all, match_low_quality): gt_inds."""
    num_gts, num_bboxes = gt_boxes.shape[0], anchors.shape[0]
    assigned = torch.full((num_bboxes,), -1, dtype=torch.long)
    if num_gts == 0:
        assigned[:] = 0
        return assigned
    overlaps = mmdet_bbox_overlaps(gt_boxes, anchors)
    max_overlaps, argmax_overlaps = overlaps.max(dim=0)
    gt_max_overlaps, _ = overlaps.max(dim=1)
    assigned[(max_overlaps >= 0) & (max_overlaps < neg_iou_thr)] = 0
    pos = max_overlaps >= pos_iou_thr
    assigned[pos] = argmax_overlaps[pos] + 1
    for i in range(num_gts):
        if gt_max_overlaps[i] >= min_pos_iou:
            assigned[overlaps[i, :] == gt_max_overlaps[i]] = i + 1
    return assigned


def mmdet_valid_flags(feat_sizes, pad_shape) -> torch.Tensor:
    """``AnchorGenerator.valid_flags`` for one image: loops over levels as mmdetection's code does."""
    flags = []
    for (feat_h, feat_w), stride in zip(feat_sizes, STRIDES):
        h, w = pad_shape
        valid_h = min(int(math.ceil(h / stride)), feat_h)
        valid_w = min(int(math.ceil(w / stride)), feat_w)
        valid_x = torch.zeros(feat_w, dtype=torch.bool)
        valid_y = torch.zeros(feat_h, dtype=torch.bool)
        valid_x[:valid_w] = True
        valid_y[:valid_h] = True
        yy, xx = torch.meshgrid(valid_y, valid_x, indexing="ij")
        flags.append((xx & yy).reshape(-1))
    return torch.cat(flags)


def reference_gt_inds(anchors: torch.Tensor, gt_boxes: list[torch.Tensor], valid: torch.Tensor) -> torch.Tensor:
    """Per image: assign on the valid anchors only, then unmap (invalid anchors -1): ``[B, A]``."""
    out = torch.full(valid.shape, -1, dtype=torch.long)
    for i, boxes in enumerate(gt_boxes):
        out[i, valid[i]] = mmdet_assign(anchors[valid[i]], boxes)
    return out


def random_gt_boxes(gen: torch.Generator, num: int, height: int, width: int, integer: bool = False) -> torch.Tensor:
    """``num`` boxes inside ``height x width``, 4 to ~120 px; integer corners on a coarse grid (ties) if asked."""
    xy = torch.rand(num, 2, generator=gen) * torch.tensor([width * 0.9, height * 0.9])
    wh = torch.rand(num, 2, generator=gen) * 116 + 4
    boxes = torch.cat([xy, xy + wh], dim=1)
    if integer:
        boxes = (boxes / 8).round() * 8
        boxes[:, 2:] = torch.maximum(boxes[:, 2:], boxes[:, :2] + 8)
    return boxes


def batch_anchors(height: int, width: int) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    sizes = feature_sizes(height, width)
    return torch.cat(AnchorGenerator(STRIDES)(sizes)), sizes


# ---------------------------------------------------------------- IoU and GIoU

def test_pairwise_iou_hand_computed():
    a = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 0.0, 0.0]])
    b = torch.tensor([[5.0, 5.0, 15.0, 15.0], [0.0, 0.0, 10.0, 10.0], [20.0, 0.0, 30.0, 10.0], [2.0, 2.0, 2.0, 2.0]])
    iou = pairwise_iou(a, b)
    # overlap 25, union 100 + 100 - 25 = 175; identical boxes 1; disjoint 0; zero-area boxes 0 (union clamped), not NaN
    expected = torch.tensor([[25 / 175, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(iou, expected, rtol=0, atol=1e-7)
    assert iou.shape == (2, 4)
    # no +1: [0, 0, 1, 1] vs [0, 0, 2, 1] is 1/2 (with +1 it would be 4/6)
    assert pairwise_iou(torch.tensor([[0.0, 0.0, 1.0, 1.0]]), torch.tensor([[0.0, 0.0, 2.0, 1.0]])).item() == 0.5


def test_pairwise_iou_broadcasts_over_a_batch():
    gen = torch.Generator().manual_seed(0)
    a = random_gt_boxes(gen, 6, 200, 200).reshape(2, 3, 4)
    b = random_gt_boxes(gen, 5, 200, 200)
    out = pairwise_iou(a, b[None])
    assert out.shape == (2, 3, 5)
    for i in range(2):
        assert torch.equal(out[i], mmdet_bbox_overlaps(a[i], b))


def test_aligned_iou_and_giou_hand_computed():
    a = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 10.0], [3.0, 3.0, 3.0, 3.0]])
    b = torch.tensor([[5.0, 5.0, 15.0, 15.0], [20.0, 0.0, 30.0, 10.0], [0.0, 0.0, 10.0, 10.0], [3.0, 3.0, 3.0, 3.0]])
    iou = aligned_iou(a, b)
    giou = aligned_giou(a, b)
    torch.testing.assert_close(iou, torch.tensor([25 / 175, 0.0, 1.0, 0.0]), rtol=0, atol=1e-7)
    # 1: enclosing 15 x 15 = 225, union 175 -> 1/7 - 50/225; 2: enclosing 30 x 10 = 300, union 200 -> -1/3;
    # 4: a point with itself: union and enclosing area clamped to 1e-6 -> 0 - (1e-6 - 1e-6) / 1e-6 = 0
    torch.testing.assert_close(giou, torch.tensor([25 / 175 - 50 / 225, -1 / 3, 1.0, 0.0]), rtol=0, atol=1e-7)
    diag = pairwise_iou(a, b).diagonal()
    assert torch.equal(diag, iou)


# ---------------------------------------------------------------- valid flags

def test_valid_flags_follow_each_images_pad_shape():
    sizes = feature_sizes(256, 192)  # (32, 24), (16, 12), (8, 6), (4, 3), (2, 2)
    assert sizes == [(32, 24), (16, 12), (8, 6), (4, 3), (2, 2)]
    flags = valid_flags(sizes, STRIDES, [(256, 192), (224, 160)])
    assert flags.shape == (2, 768 + 192 + 48 + 12 + 4)
    assert bool(flags[0].all())
    # image 2 per level: ceil(224/s) x ceil(160/s) = 28x20, 14x10, 7x5, 4x3 (ceil(3.5), ceil(2.5)), 2x2
    starts = [0, 768, 960, 1008, 1020, 1024]
    counts = [int(flags[1, starts[i]:starts[i + 1]].sum()) for i in range(5)]
    assert counts == [28 * 20, 14 * 10, 7 * 5, 4 * 3, 2 * 2]
    # row-major: the cell (y=0, x=19) is valid, (y=0, x=20) is not, (y=27, x=0) is, (y=28, x=0) is not
    level0 = flags[1, :768].reshape(32, 24)
    assert level0[0, 19] and not level0[0, 20] and level0[27, 0] and not level0[28, 0]
    for i, pad in enumerate([(256, 192), (224, 160)]):
        assert torch.equal(flags[i], mmdet_valid_flags(sizes, pad))


def test_valid_flags_clip_at_the_feature_size():
    sizes = [(3, 3), (2, 2), (1, 1), (1, 1), (1, 1)]
    flags = valid_flags(sizes, STRIDES, [(1000, 1000)])
    assert bool(flags.all())
    with pytest.raises(PaadetError):
        valid_flags(sizes[:4], STRIDES, [(32, 32)])


# ---------------------------------------------------------------- padding the targets

def test_pad_targets_with_an_empty_image():
    padded = pad_targets([torch.tensor([[0.0, 0.0, 5.0, 5.0], [1.0, 1.0, 4.0, 4.0]]), torch.zeros(0, 4)],
                         [torch.tensor([3, 7]), torch.zeros(0, dtype=torch.long)])
    assert padded.boxes.shape == (2, 2, 4)
    assert padded.mask.tolist() == [[True, True], [False, False]]
    assert padded.labels.tolist() == [[3, 7], [-1, -1]]
    empty = pad_targets([torch.zeros(0, 4)], [torch.zeros(0, dtype=torch.long)])
    assert empty.boxes.shape == (1, 0, 4) and empty.mask.shape == (1, 0)
    with pytest.raises(PaadetError):
        pad_targets([torch.zeros(2, 4)], [torch.zeros(3, dtype=torch.long)])


# ---------------------------------------------------------------- MaxIoUAssigner, hand-computed

def assign_one(anchors, boxes, labels=None, valid=None, **kwargs):
    labels = labels if labels is not None else torch.arange(boxes.shape[0])
    targets = pad_targets([boxes], [labels])
    out = MaxIoUAssigner(**kwargs)(anchors, targets, None if valid is None else valid[None])
    return out.gt_inds[0], out.labels[0], out.max_overlaps[0]


def test_thresholds_and_first_gt_on_ties():
    anchors = torch.tensor([
        [0.0, 0.0, 10.0, 10.0],    # IoU 1 with GT 0 -> GT 0
        [20.0, 0.0, 30.0, 10.0],   # IoU 1 with GT 1 -> GT 1
        [10.0, 0.0, 20.0, 10.0],   # touches both, IoU 0 with both -> negative
        [5.0, 0.0, 25.0, 10.0],    # IoU 50/250 = 0.2 with both GTs (a tie) -> the first, GT 0
        [100.0, 100.0, 110.0, 110.0],  # far away -> negative
    ])
    gts = torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 0.0, 30.0, 10.0]])
    gt_inds, labels, max_ov = assign_one(anchors, gts, torch.tensor([4, 9]))
    assert gt_inds.tolist() == [1, 2, 0, 1, 0]
    assert labels.tolist() == [4, 9, -1, 4, -1]
    torch.testing.assert_close(max_ov, torch.tensor([1.0, 1.0, 0.0, 0.2, 0.0]))
    assert torch.equal(gt_inds, mmdet_assign(anchors, gts))


def test_low_quality_match_later_gt_overwrites():
    # both GTs have anchor 0 as their best anchor (IoU 0.04 and 0.0625, below 0.1): GT 1, the later, keeps it
    anchors = torch.tensor([[0.0, 0.0, 20.0, 20.0], [200.0, 200.0, 220.0, 220.0]])
    gts = torch.tensor([[0.0, 0.0, 4.0, 4.0], [10.0, 10.0, 15.0, 15.0]])
    gt_inds, _, _ = assign_one(anchors, gts)
    assert gt_inds.tolist() == [2, 0]
    # the overwrite also beats a regular (above-threshold) match of an earlier GT
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 12.0]])
    gts = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 40.0]])
    # anchor 1: IoU 100/120 with GT 0, 120/400 = 0.3 with GT 1 (GT 1's best) -> GT 1 overwrites GT 0's argmax
    gt_inds, _, _ = assign_one(anchors, gts)
    assert gt_inds.tolist() == [1, 2]
    assert torch.equal(gt_inds, mmdet_assign(anchors, gts))


def test_low_quality_match_takes_every_anchor_tied_at_the_best_iou():
    # GT of 4x4 at the middle of four 20x20 anchors: IoU 4/400 with each (ties): all four go to it
    anchors = torch.tensor([[0.0, 0.0, 20.0, 20.0], [18.0, 0.0, 38.0, 20.0], [0.0, 18.0, 20.0, 38.0],
                            [18.0, 18.0, 38.0, 38.0], [100.0, 100.0, 120.0, 120.0]])
    gts = torch.tensor([[17.0, 17.0, 21.0, 21.0]])
    gt_inds, _, _ = assign_one(anchors, gts)
    assert gt_inds.tolist() == [1, 1, 1, 1, 0]
    # without gt_max_assign_all only the first best anchor
    gt_inds, _, _ = assign_one(anchors, gts, gt_max_assign_all=False)
    assert gt_inds.tolist() == [1, 0, 0, 0, 0]
    # without the low-quality match nothing is positive
    gt_inds, _, _ = assign_one(anchors, gts, match_low_quality=False)
    assert gt_inds.tolist() == [0, 0, 0, 0, 0]


def test_zero_area_gt_grabs_every_iou_zero_anchor():
    # min_pos_iou = 0: a GT whose best IoU is 0 matches every anchor with IoU 0 (mmdetection's logic)
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0], [50.0, 50.0, 60.0, 60.0], [100.0, 100.0, 110.0, 110.0]])
    gts = torch.tensor([[0.0, 0.0, 10.0, 10.0], [200.0, 200.0, 200.0, 200.0]])
    gt_inds, _, _ = assign_one(anchors, gts)
    assert gt_inds.tolist() == [2, 2, 2]  # even anchor 0 (IoU 0 with GT 1) is overwritten
    assert torch.equal(gt_inds, mmdet_assign(anchors, gts))


def test_image_without_gt_and_invalid_anchors():
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 0.0, 30.0, 10.0], [40.0, 0.0, 50.0, 10.0]])
    valid = torch.tensor([True, False, True])
    targets = pad_targets([torch.tensor([[20.0, 0.0, 30.0, 10.0]]), torch.zeros(0, 4)],
                          [torch.tensor([5]), torch.zeros(0, dtype=torch.long)])
    out = MaxIoUAssigner()(anchors, targets, valid[None].expand(2, -1))
    # image 0: the GT's perfect anchor is invalid: -1 (never assigned); the best valid anchors have IoU 0,
    # so the low-quality match takes both (computed over the valid anchors only, as mmdetection does)
    assert out.gt_inds[0].tolist() == [1, -1, 1]
    # image 1 has no GT: every valid anchor negative, the invalid one -1
    assert out.gt_inds[1].tolist() == [0, -1, 0]
    assert out.labels[1].tolist() == [-1, -1, -1]
    ref = reference_gt_inds(anchors, [targets.boxes[0], torch.zeros(0, 4)], valid[None].expand(2, -1))
    assert torch.equal(out.gt_inds, ref)
    # a batch where no image has a GT
    none = pad_targets([torch.zeros(0, 4)], [torch.zeros(0, dtype=torch.long)])
    assert MaxIoUAssigner()(anchors, none, valid[None]).gt_inds.tolist() == [[0, -1, 0]]


def test_torch_max_returns_the_first_of_tied_maxima():
    """The tie rule both mmdetection (overlaps.max(dim=0) on [M, A]) and we (max(dim=1) on [B, M, A]) rely on."""
    gen = torch.Generator().manual_seed(1)
    ov = torch.randint(0, 3, (2, 40, 5000), generator=gen).float() / 4
    _, idx = ov.max(dim=1)
    first = torch.where(ov == ov.amax(dim=1, keepdim=True), torch.arange(40)[None, :, None], 40).amin(dim=1)
    assert torch.equal(idx, first)
    assert torch.equal(ov[0].max(dim=0).indices, first[0])


# ---------------------------------------------------------------- random batches against the transcription

@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_matches_the_per_image_transcription(seed):
    gen = torch.Generator().manual_seed(seed)
    anchors, sizes = batch_anchors(256, 192)
    pads = [(256, 192), (224, 160), (256, 128)]
    valid = valid_flags(sizes, STRIDES, pads)
    counts = [[1, 8, 0], [50, 3, 17], [2, 0, 33], [12, 12, 12]][seed]
    # integer boxes on an 8-px grid make exact IoU ties (between GTs and between anchors) common
    boxes = [random_gt_boxes(gen, n, h, w, integer=seed % 2 == 1) for n, (h, w) in zip(counts, pads)]
    labels = [torch.randint(0, 80, (n,), generator=gen) for n in counts]
    out = MaxIoUAssigner()(anchors, pad_targets(boxes, labels), valid)
    ref = reference_gt_inds(anchors, boxes, valid)
    assert torch.equal(out.gt_inds, ref)
    for i in range(3):
        pos = ref[i] > 0
        assert torch.equal(out.labels[i][pos], labels[i][ref[i][pos] - 1])
    assert int((out.gt_inds > 0).sum()) > 0


def test_duplicate_gts_the_later_wins_the_low_quality_match():
    anchors, sizes = batch_anchors(128, 128)
    box = torch.tensor([[30.0, 30.0, 60.0, 70.0]])
    boxes = torch.cat([box, box, box])  # identical GTs: argmax picks GT 0, the low-quality pass GT 2
    out = MaxIoUAssigner()(anchors, pad_targets([boxes], [torch.tensor([1, 2, 3])]))
    ref = mmdet_assign(anchors, boxes)
    assert torch.equal(out.gt_inds[0], ref)
    assert set(ref[ref > 0].tolist()) == {1, 3}
