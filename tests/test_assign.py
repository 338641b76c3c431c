"""IoU, GIoU, valid flags and the batched MaxIoUAssigner: hand-computed cases (ties, the low-quality
overwrite, images without GT, invalid anchors) and agreement with a plain per-image, per-GT transcription
of mmdetection 3.3's ``MaxIoUAssigner.assign_wrt_overlaps`` on random batches. The sparse IoUs
(:mod:`paadet.train.sparse_iou`): the windows hold exactly the overlapping pairs, and the assignment is
bit for bit the dense one on random batches of every kind of box, every setting, ties, GTs touching no
valid anchor, odd coordinates (dense fallback), with one host sync."""

from __future__ import annotations

import math

import pytest
import torch

from paadet.bench.profiling import count_device_work
from paadet.boxes import aligned_giou, aligned_iou, bbox_overlaps
from paadet.errors import PaadetError
from paadet.model.anchors import AnchorGenerator, feature_sizes
from paadet.train.assign import MaxIoUAssigner, PaddedTargets, pad_targets, valid_flags
from paadet.train.sparse_iou import AnchorGrid, anchor_max, candidate_pairs, gt_max, pair_iou

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


def mmdet_assign(
    anchors: torch.Tensor,
    gt_boxes: torch.Tensor,
    pos_iou_thr: float = 0.1,
    neg_iou_thr: float = 0.1,
    min_pos_iou: float = 0.0,
) -> torch.Tensor:
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
    for (feat_h, feat_w), stride in zip(feat_sizes, STRIDES, strict=False):
        h, w = pad_shape
        valid_h = min(math.ceil(h / stride), feat_h)
        valid_w = min(math.ceil(w / stride), feat_w)
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
    iou = bbox_overlaps(a, b)
    # overlap 25, union 100 + 100 - 25 = 175; identical boxes 1; disjoint 0; zero-area boxes 0 (union clamped), not NaN
    expected = torch.tensor([[25 / 175, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(iou, expected, rtol=0, atol=1e-7)
    assert iou.shape == (2, 4)
    # no +1: [0, 0, 1, 1] vs [0, 0, 2, 1] is 1/2 (with +1 it would be 4/6)
    assert bbox_overlaps(torch.tensor([[0.0, 0.0, 1.0, 1.0]]), torch.tensor([[0.0, 0.0, 2.0, 1.0]])).item() == 0.5


def test_pairwise_iou_broadcasts_over_a_batch():
    gen = torch.Generator().manual_seed(0)
    a = random_gt_boxes(gen, 6, 200, 200).reshape(2, 3, 4)
    b = random_gt_boxes(gen, 5, 200, 200)
    out = bbox_overlaps(a, b[None])
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
    diag = bbox_overlaps(a, b).diagonal()
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
    counts = [int(flags[1, starts[i] : starts[i + 1]].sum()) for i in range(5)]
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
    padded = pad_targets(
        [torch.tensor([[0.0, 0.0, 5.0, 5.0], [1.0, 1.0, 4.0, 4.0]]), torch.zeros(0, 4)],
        [torch.tensor([3, 7]), torch.zeros(0, dtype=torch.long)],
    )
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
    anchors = torch.tensor(
        [
            [0.0, 0.0, 10.0, 10.0],  # IoU 1 with GT 0 -> GT 0
            [20.0, 0.0, 30.0, 10.0],  # IoU 1 with GT 1 -> GT 1
            [10.0, 0.0, 20.0, 10.0],  # touches both, IoU 0 with both -> negative
            [5.0, 0.0, 25.0, 10.0],  # IoU 50/250 = 0.2 with both GTs (a tie) -> the first, GT 0
            [100.0, 100.0, 110.0, 110.0],  # far away -> negative
        ]
    )
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
    anchors = torch.tensor(
        [
            [0.0, 0.0, 20.0, 20.0],
            [18.0, 0.0, 38.0, 20.0],
            [0.0, 18.0, 20.0, 38.0],
            [18.0, 18.0, 38.0, 38.0],
            [100.0, 100.0, 120.0, 120.0],
        ]
    )
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
    targets = pad_targets(
        [torch.tensor([[20.0, 0.0, 30.0, 10.0]]), torch.zeros(0, 4)],
        [torch.tensor([5]), torch.zeros(0, dtype=torch.long)],
    )
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
    boxes = [random_gt_boxes(gen, n, h, w, integer=seed % 2 == 1) for n, (h, w) in zip(counts, pads, strict=False)]
    labels = [torch.randint(0, 80, (n,), generator=gen) for n in counts]
    out = MaxIoUAssigner()(anchors, pad_targets(boxes, labels), valid)
    ref = reference_gt_inds(anchors, boxes, valid)
    assert torch.equal(out.gt_inds, ref)
    for i in range(3):
        pos = ref[i] > 0
        assert torch.equal(out.labels[i][pos], labels[i][ref[i][pos] - 1])
    assert int((out.gt_inds > 0).sum()) > 0


def test_duplicate_gts_the_later_wins_the_low_quality_match():
    anchors, _sizes = batch_anchors(128, 128)
    box = torch.tensor([[30.0, 30.0, 60.0, 70.0]])
    boxes = torch.cat([box, box, box])  # identical GTs: argmax picks GT 0, the low-quality pass GT 2
    out = MaxIoUAssigner()(anchors, pad_targets([boxes], [torch.tensor([1, 2, 3])]))
    ref = mmdet_assign(anchors, boxes)
    assert torch.equal(out.gt_inds[0], ref)
    assert set(ref[ref > 0].tolist()) == {1, 3}


# ---------------------------------------------------------------- the sparse IoUs (paadet.train.sparse_iou)

SMALL = (128, 160)  # 428 anchors over P3..P7: the sparse tests stay fast


def small_grid(
    height: int = SMALL[0], width: int = SMALL[1], strides: tuple[int, ...] = STRIDES, octave_base_scale: float = 8.0
) -> tuple[torch.Tensor, list[tuple[int, int]], AnchorGrid]:
    sizes = feature_sizes(height, width, len(strides))
    anchors = torch.cat(AnchorGenerator(strides, octave_base_scale)(sizes))
    return anchors, sizes, AnchorGrid.from_anchors(anchors, sizes)


def assert_bit_identical(sparse, dense) -> None:
    """Same gt_inds and labels, and max_overlaps equal bit for bit (NaN and the sign of zero included)."""
    assert torch.equal(sparse.gt_inds, dense.gt_inds)
    assert torch.equal(sparse.labels, dense.labels)
    assert sparse.max_overlaps.dtype == dense.max_overlaps.dtype == torch.float32
    assert torch.equal(sparse.max_overlaps.view(torch.int32), dense.max_overlaps.view(torch.int32))


def assert_sparse_matches_dense(assigner: MaxIoUAssigner, anchors, grid, targets, valid, expect_pairs: bool = True):
    if expect_pairs:  # the sparse path must really be taken, not its dense fallback
        pairs = candidate_pairs(
            grid, anchors, targets.boxes, targets.mask, valid, assigner.iou_eps, assigner.max_pair_density
        )
        assert (pairs is not None) or targets.mask.shape[1] == 0
    dense = assigner(anchors, targets, valid)
    sparse = assigner(anchors, targets, valid, grid)
    assert_bit_identical(sparse, dense)
    return sparse, dense


def mixed_boxes(gen: torch.Generator, num: int, height: int, width: int) -> torch.Tensor:
    """Boxes of every kind: tiny to larger than the image (log-uniform sides), some partly or wholly
    outside, on an 8-px or 4-px lattice (exact ties with anchors and between GTs), zero-width or
    zero-height, inverted, duplicated, with -0.0 left and top edges."""
    kind = torch.randint(0, 8, (num,), generator=gen)
    span = torch.tensor([float(width), float(height)])
    centre = torch.rand(num, 2, generator=gen) * 1.4 * span - 0.2 * span
    sides = torch.exp(torch.rand(num, 2, generator=gen) * math.log(2.0 * max(height, width) / 0.25)) * 0.25
    boxes = torch.cat([centre - sides / 2, centre + sides / 2], dim=1)
    lattice = torch.where((kind == 1)[:, None], 8.0, 4.0)
    boxes = torch.where((kind <= 2)[:, None], (boxes / lattice).round() * lattice, boxes) + 0.0  # no -0.0 from round
    boxes[kind == 3, 2] = boxes[kind == 3, 0]  # zero width
    boxes[kind == 4, 3] = boxes[kind == 4, 1]  # zero height
    boxes[kind == 5] = boxes[kind == 5][:, [2, 3, 0, 1]]  # inverted
    boxes[kind == 6, :2] = -0.0  # -0.0 left and top edges (on the anchors' +0.0 edges) stay sparse
    if num >= 2 and bool(kind[0] < 4):
        boxes[1] = boxes[0]  # duplicate GTs: exact ties between GTs
    return boxes


def random_valid(gen: torch.Generator, sizes, batch: int, height: int, width: int) -> torch.Tensor:
    """Per image: pad-shape valid flags (random pad shapes), random holes, or none valid at all."""
    rows = []
    for _ in range(batch):
        choice = int(torch.randint(0, 6, (1,), generator=gen))
        pad = (
            int(torch.randint(1, height // 32 + 1, (1,), generator=gen)) * 32,
            int(torch.randint(1, width // 32 + 1, (1,), generator=gen)) * 32,
        )
        flags = valid_flags(sizes, STRIDES[: len(sizes)], [pad])[0]
        if choice == 0:
            flags = torch.ones_like(flags)
        elif choice == 1:
            flags = flags & (torch.rand(flags.shape, generator=gen) < 0.8)
        elif choice == 2:
            flags = torch.zeros_like(flags)
        rows.append(flags)
    return torch.stack(rows)


def random_targets(gen: torch.Generator, batch: int, height: int, width: int, prefix_mask: bool):
    """Padded targets with 0..14 GTs per image; with ``prefix_mask`` False the real GTs are scattered among
    padding rows that hold junk (NaN, inf, -0.0, huge boxes), which only the mask must exclude."""
    counts = torch.randint(0, 15, (batch,), generator=gen).tolist()
    if int(torch.randint(0, 4, (1,), generator=gen)) == 0:
        counts[0] = 0  # an image without GT
    boxes = [mixed_boxes(gen, n, height, width) for n in counts]
    labels = [torch.randint(0, 80, (n,), generator=gen) for n in counts]
    targets = pad_targets(boxes, labels)
    if prefix_mask or targets.mask.shape[1] == 0:
        return targets
    num = targets.mask.shape[1] + 3
    order = torch.argsort(torch.rand(batch, num, generator=gen), dim=1)
    junk = torch.tensor([[float("nan"), 0.0, 5.0, 5.0], [-0.0, -0.0, 1e30, float("inf")]])
    out_boxes = junk[torch.randint(0, 2, (batch, num), generator=gen)]
    out_labels = torch.full((batch, num), -1)
    mask = torch.zeros(batch, num, dtype=torch.bool)
    for b in range(batch):
        slots = order[b, : counts[b]]
        out_boxes[b, slots] = boxes[b]
        out_labels[b, slots] = labels[b]
        mask[b, slots] = True
    return PaddedTargets(out_boxes, out_labels, mask)


ASSIGNER_VARIANTS = [
    {},
    {"gt_max_assign_all": False},
    {"match_low_quality": False},
    {"min_pos_iou": 0.3},
    {"min_pos_iou": -1.0},
    {"min_pos_iou": -2.0, "gt_max_assign_all": False},
    {"pos_iou_thr": 0.0, "neg_iou_thr": 0.0},
    {"pos_iou_thr": 0.5, "neg_iou_thr": 0.4},
]


def test_pair_iou_is_bbox_overlaps_bit_for_bit():
    gen = torch.Generator().manual_seed(5)
    a = mixed_boxes(gen, 4000, 300, 300)
    b = mixed_boxes(gen, 4000, 300, 300)
    b[::7] = a[::7]  # identical pairs
    b[1::7, :2] = a[1::7, 2:]  # touching corners
    a[:4] = torch.tensor(
        [[-5.0, 0.0, -0.0, 10.0], [float("nan"), 0, 1, 1], [0, 0, float("inf"), 1], [-3e38, 0, 3e38, 1]]
    )
    b[:4] = torch.tensor([[0.0, 0.0, 10.0, 10.0]])  # a -0.0 IoU, NaN, 0 / inf, an overflowing area
    sparse = pair_iou(a.T.contiguous(), b.T.contiguous(), 1e-6)
    for dense in (bbox_overlaps(a[:, None], b[:, None])[:, 0, 0], bbox_overlaps(a, b).diagonal().contiguous()):
        nan = torch.isnan(dense)  # NaN payloads depend on the kernel (NaN inputs take the dense path anyway)
        assert torch.equal(torch.isnan(sparse), nan) and nan.sum() == 1
        assert torch.equal(sparse.view(torch.int32)[~nan], dense.view(torch.int32)[~nan])
    assert torch.signbit(sparse[0]) and sparse[0] == 0


def test_anchor_grid_describes_the_levels():
    anchors, sizes, grid = small_grid()
    assert sizes == [(16, 20), (8, 10), (4, 5), (2, 3), (1, 2)] and grid.num_anchors == anchors.shape[0] == 428
    assert grid.exact
    assert grid.level_start.tolist() == [0, 320, 400, 420, 426] and grid.level_width.tolist() == [20, 10, 5, 3, 2]
    level1 = anchors[320:400].reshape(8, 10, 4)
    assert torch.equal(grid.col_x0[1, :10], level1[0, :, 0]) and torch.equal(grid.row_y1[1, :8], level1[:, 0, 3])
    assert bool(torch.isinf(grid.col_x0[1, 10:]).all()) and bool(torch.isinf(grid.row_y0[4, 1:]).all())
    with pytest.raises(PaadetError):
        AnchorGrid.from_anchors(anchors[torch.randperm(428, generator=torch.Generator().manual_seed(0))], sizes)
    with pytest.raises(PaadetError):
        AnchorGrid.from_anchors(anchors, sizes[:4])
    odd = anchors.clone()
    assert bool((odd[4:320:20, 0] == 0).all())
    odd[4:320:20, 0] = -0.0  # column 4 of level 0, every row: a -0.0 left edge does not matter
    assert AnchorGrid.from_anchors(odd, sizes).exact
    shifted = anchors - torch.tensor([40.0, 0.0, 40.0, 0.0])  # column 1 of level 0 ends at x = 0
    zero = shifted[:, 2] == 0
    assert bool(zero.any()) and AnchorGrid.from_anchors(shifted, sizes).exact
    shifted[zero, 2] = -0.0  # a -0.0 right edge does
    assert not AnchorGrid.from_anchors(shifted, sizes).exact


def test_windows_hold_every_overlapping_pair_and_every_other_iou_is_plus_zero():
    gen = torch.Generator().manual_seed(11)
    # fractional anchor edges (octave_base_scale 3.3) and GT edges exactly on, or one ulp off, anchor edges
    for scale in (8.0, 3.3):
        anchors, _sizes, grid = small_grid(octave_base_scale=scale)
        edges = anchors.reshape(-1)[torch.randint(0, anchors.numel(), (600,), generator=gen)]
        nudge = torch.randint(-1, 2, (600,), generator=gen).float()
        edges = torch.where(nudge > 0, torch.nextafter(edges, edges + 1), edges)
        edges = torch.where(nudge < 0, torch.nextafter(edges, edges - 1), edges).reshape(150, 4)
        boxes = torch.cat([mixed_boxes(gen, 150, *SMALL), edges]).reshape(3, 100, 4)
        mask = torch.ones(3, 100, dtype=torch.bool)
        pairs = candidate_pairs(grid, anchors, boxes, mask, torch.ones(3, 428, dtype=torch.bool), 1e-6)
        assert pairs is not None
        dense = bbox_overlaps(boxes, anchors[None])  # [3, 100, 428]
        flat_gt = pairs.gt
        image = flat_gt // 100
        key = flat_gt * 428 + (pairs.anchor - image * 428)
        assert key.unique().numel() == key.numel()  # no pair twice
        listed = torch.zeros(3 * 100 * 428, dtype=torch.bool)
        listed[key] = True
        listed = listed.reshape(3, 100, 428)
        box, anchor = boxes[:, :, None], anchors[None, None]
        window = ((anchor[..., 2:] > box[..., :2]) & (anchor[..., :2] < box[..., 2:])).all(-1)
        assert torch.equal(listed, window)
        lt = torch.maximum(box[..., :2], anchor[..., :2])
        rb = torch.minimum(box[..., 2:], anchor[..., 2:])
        strict = ((rb - lt) > 0).all(-1)  # the same for boxes of positive width and height
        proper = ((boxes[..., 2:] > boxes[..., :2]).all(-1))[:, :, None]
        assert torch.equal(strict, window & proper) and bool(proper.any()) and not bool(proper.all())
        assert torch.equal(pairs.iou.view(torch.int32), dense.reshape(-1)[key].view(torch.int32))
        assert bool((dense[~listed].view(torch.int32) == 0).all())  # +0 exactly off the windows


@pytest.mark.parametrize("seed", range(24))
def test_sparse_assignment_is_bit_identical_to_dense(seed):
    gen = torch.Generator().manual_seed(100 + seed)
    height, width = [(128, 160), (96, 128), (160, 96)][seed % 3]
    anchors, sizes, grid = small_grid(height, width)
    batch = 1 + seed % 3
    for trial in range(3):
        targets = random_targets(gen, batch, height, width, prefix_mask=(seed + trial) % 2 == 0)
        valid = random_valid(gen, sizes, batch, height, width)
        for variant in ASSIGNER_VARIANTS:
            assigner = MaxIoUAssigner(**variant, max_pair_density=1.0)
            assert_sparse_matches_dense(assigner, anchors, grid, targets, valid)
        assert_reductions_match_dense(anchors, grid, targets, valid)


def assert_reductions_match_dense(anchors, grid, targets, valid) -> None:
    """:func:`anchor_max` and :func:`gt_max` against ``max`` of the dense ``[B, M, A]`` IoUs (padded GTs and
    invalid anchors at -1), values bit for bit and first-index ties."""
    if targets.mask.shape[1] == 0:
        return
    pairs = candidate_pairs(grid, anchors, targets.boxes, targets.mask, valid, 1e-6)
    real = targets.mask[:, :, None] & valid[:, None, :]
    overlaps = torch.where(real, bbox_overlaps(targets.boxes, anchors[None]), -1.0)
    best, best_anchor = gt_max(pairs, valid)
    dense_best, dense_anchor = overlaps.max(dim=2)
    assert torch.equal(best.view(torch.int32)[targets.mask], dense_best.view(torch.int32)[targets.mask])
    assert torch.equal(best_anchor[targets.mask], dense_anchor[targets.mask])
    first_gt = targets.mask.to(torch.uint8).argmax(dim=1)
    top, top_gt = anchor_max(pairs, first_gt)
    dense_top, dense_gt = overlaps.max(dim=1)
    counted = valid & targets.mask.any(dim=1, keepdim=True)
    assert torch.equal(top.view(torch.int32)[counted], dense_top.view(torch.int32)[counted])
    assert torch.equal(top_gt[counted], dense_gt[counted])


def test_sparse_on_the_per_image_transcription_batches():
    anchors, sizes, grid = small_grid(256, 192)
    pads = [(256, 192), (224, 160), (256, 128)]
    valid = valid_flags(sizes, STRIDES, pads)
    for seed, counts in enumerate([[1, 8, 0], [50, 3, 17], [2, 0, 33], [12, 12, 12]]):
        gen = torch.Generator().manual_seed(seed)
        boxes = [random_gt_boxes(gen, n, h, w, integer=seed % 2 == 1) for n, (h, w) in zip(counts, pads, strict=False)]
        labels = [torch.randint(0, 80, (n,), generator=gen) for n in counts]
        assigner = MaxIoUAssigner(max_pair_density=1.0)  # small images: many boxes cover much of the grid
        sparse, _ = assert_sparse_matches_dense(assigner, anchors, grid, pad_targets(boxes, labels), valid)
        assert torch.equal(sparse.gt_inds, reference_gt_inds(anchors, boxes, valid))


def test_sparse_ties_and_gts_touching_no_valid_anchor():
    anchors, sizes, grid = small_grid()
    level0 = anchors[:320]
    boxes = torch.stack(
        [
            level0[45],
            level0[45],  # a GT equal to an anchor, twice: IoU 1, a tie between GTs
            torch.tensor([28.0, 28.0, 36.0, 36.0]),  # centred between anchors: equal IoUs with several
            torch.tensor([5000.0, 5000.0, 5020.0, 5030.0]),  # far outside: touches no anchor, best IoU 0
            torch.tensor([10.0, 10.0, 10.0, 40.0]),  # zero width: IoU 0 everywhere
            torch.tensor([130.0, 100.0, 150.0, 120.0]),  # in image 2 over invalid anchors only
        ]
    )
    valid = valid_flags(sizes, STRIDES, [(128, 160), (96, 160)])
    valid[1] &= bbox_overlaps(boxes[5:], anchors)[0] == 0
    valid[1, :3] = False  # without gt_max_assign_all a best-IoU-0 GT takes the first valid anchor, not 0
    targets = pad_targets([boxes, boxes[2:]], [torch.arange(6), torch.arange(4)])
    for variant in ASSIGNER_VARIANTS:
        assigner = MaxIoUAssigner(**variant, max_pair_density=1.0)
        sparse, _ = assert_sparse_matches_dense(assigner, anchors, grid, targets, valid)
        if variant == {}:
            # image 1: GT 4 (zero width, best IoU 0) takes every valid anchor, GT 5 then its best ones
            assert set(sparse.gt_inds[0][valid[0]].tolist()) == {5, 6}
            # image 2: its GT 3 touches no valid anchor (best IoU 0), is the last, and takes them all
            assert bool((sparse.gt_inds[1][valid[1]] == 4).all()) and bool((~valid[1]).any())


def test_sparse_without_any_gt_or_valid_anchor():
    anchors, _sizes, grid = small_grid()
    assigner = MaxIoUAssigner(max_pair_density=1.0)
    empty = pad_targets([torch.zeros(0, 4), torch.zeros(0, 4)], [torch.zeros(0, dtype=torch.long)] * 2)
    valid = torch.ones(2, 428, dtype=torch.bool)
    assert_bit_identical(assigner(anchors, empty, valid, grid), assigner(anchors, empty, valid))
    padding_only = PaddedTargets(
        torch.full((2, 3, 4), float("nan")), torch.full((2, 3), -1), torch.zeros(2, 3, dtype=torch.bool)
    )
    assert_sparse_matches_dense(assigner, anchors, grid, padding_only, valid)
    boxes = pad_targets([torch.tensor([[0.0, 0.0, 50.0, 50.0]])], [torch.tensor([3])])
    assert_sparse_matches_dense(assigner, anchors, grid, boxes, torch.zeros(1, 428, dtype=torch.bool))


def test_a_negative_zero_right_edge_makes_a_negative_zero_iou():
    """Why a GT with a -0.0 right or bottom edge goes dense: IoU -0.0 with an anchor it only touches."""
    gt = torch.tensor([[-5.0, 0.0, -0.0, 10.0]])
    anchor = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    assert torch.signbit(bbox_overlaps(gt, anchor)).item()
    assert not torch.signbit(bbox_overlaps(gt.abs() * torch.tensor([-1.0, 1, 1, 1]), anchor)).item()


@pytest.mark.parametrize("odd", [float("nan"), float("inf"), -float("inf"), "x1", "y1", 3e38])
def test_odd_gt_coordinates_fall_back_to_dense(odd):
    anchors, _sizes, grid = small_grid()
    boxes = torch.tensor([[10.0, 10.0, 60.0, 70.0], [-0.5, 0.0, 30.0, 30.0]])
    if isinstance(odd, str):  # a -0.0 right or bottom edge, touching the anchors' +0.0 edges
        boxes[1] = torch.tensor([-20.0, -20.0, 0.0, 0.0])
        boxes[1, 2 if odd == "x1" else 3] = -0.0
    elif odd == 3e38:  # finite coordinates, but 6e38 * 30 overflows: a non-finite area
        boxes[1] = torch.tensor([-3e38, 0.0, 3e38, 30.0])
    else:
        boxes[1, 0] = odd
    targets = pad_targets([boxes], [torch.tensor([1, 2])])
    valid = torch.ones(1, 428, dtype=torch.bool)
    assert candidate_pairs(grid, anchors, targets.boxes, targets.mask, valid, 1e-6) is None
    assert_sparse_matches_dense(MaxIoUAssigner(), anchors, grid, targets, valid, expect_pairs=False)


def test_dense_pairs_fall_back_by_density():
    anchors, _sizes, grid = small_grid()
    whole = torch.tensor([[-1000.0, -1000.0, 1000.0, 1000.0]] * 3)  # every anchor overlaps each
    targets = pad_targets([whole], [torch.arange(3)])
    valid = torch.ones(1, 428, dtype=torch.bool)
    pairs = candidate_pairs(grid, anchors, targets.boxes, targets.mask, valid, 1e-6, max_density=1.0)
    assert pairs is not None and pairs.iou.numel() == 3 * 428
    assert candidate_pairs(grid, anchors, targets.boxes, targets.mask, valid, 1e-6, max_density=0.99) is None
    assert_sparse_matches_dense(MaxIoUAssigner(), anchors, grid, targets, valid, expect_pairs=False)
    with pytest.raises(PaadetError):
        MaxIoUAssigner()(anchors[:400], targets, valid[:, :400], grid)
    with pytest.raises(PaadetError):
        MaxIoUAssigner(max_pair_density=-1.0)


def test_sparse_assignment_takes_one_host_sync_whatever_the_boxes():
    anchors, sizes, grid = small_grid(256, 192)
    valid = valid_flags(sizes, STRIDES, [(256, 192), (224, 160)])
    gen = torch.Generator().manual_seed(3)
    assigner = MaxIoUAssigner()
    syncs = {}
    for num in (1, 8, 40):
        targets = pad_targets(
            [random_gt_boxes(gen, num, 256, 192), random_gt_boxes(gen, num, 224, 160)],
            [torch.zeros(num, dtype=torch.long)] * 2,
        )
        syncs[num] = count_device_work(lambda targets=targets: assigner(anchors, targets, valid, grid)).syncs
        assert count_device_work(lambda targets=targets: assigner(anchors, targets, valid)).syncs == 0
    assert syncs == {1: 1, 8: 1, 40: 1}
