"""PAA's anchor score and the batched reassignment, against a plain per-image, per-GT, per-level
transcription of mmdetection 3.3's ``PAAHead.get_pos_loss`` / ``paa_reassign`` / ``gmm_separation_scheme``
with scikit-learn's GaussianMixture (as mmdetection calls it), on random inputs: several seeds, 1-50 GTs,
GTs with 0 or 1 candidates, and exact ties."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import GaussianMixture

from paadet.errors import PaadetError
from paadet.model.box_coder import DeltaXYWHBoxCoder
from paadet.train.reassign import (
    candidate_table,
    paa_anchor_scores,
    paa_reassign,
    rank_in_runs,
    sigmoid_focal_loss,
    sigmoid_focal_row_sums,
)

# ---------------------------------------------------------------- plain transcriptions of mmdetection 3.3


def mmdet_focal(pred: torch.Tensor, label: torch.Tensor, gamma: float = 2.0, alpha: float = 0.25) -> torch.Tensor:
    """FocalLoss on the CPU path with reduction 'none' and weight 1: one_hot, then ``py_sigmoid_focal_loss``."""
    num_classes = pred.size(1)
    target = F.one_hot(label, num_classes=num_classes + 1)[:, :num_classes]
    pred_sigmoid = pred.sigmoid()
    target = target.type_as(pred)
    pt = (1 - pred_sigmoid) * target + pred_sigmoid * (1 - target)
    focal_weight = (alpha * target + (1 - alpha) * (1 - target)) * pt.pow(gamma)
    loss = F.binary_cross_entropy_with_logits(pred, target, reduction="none") * focal_weight
    return loss * torch.ones(pred.shape[0], 1)


def mmdet_giou(b1: torch.Tensor, b2: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``bbox_overlaps(mode='giou', is_aligned=True)``, line by line."""
    area1 = (b1[..., 2] - b1[..., 0]) * (b1[..., 3] - b1[..., 1])
    area2 = (b2[..., 2] - b2[..., 0]) * (b2[..., 3] - b2[..., 1])
    lt = torch.max(b1[..., :2], b2[..., :2])
    rb = torch.min(b1[..., 2:], b2[..., 2:])
    wh = (rb - lt).clamp(min=0)
    overlap = wh[..., 0] * wh[..., 1]
    union = area1 + area2 - overlap
    enclosed_lt = torch.min(b1[..., :2], b2[..., :2])
    enclosed_rb = torch.max(b1[..., 2:], b2[..., 2:])
    eps_t = union.new_tensor([eps])
    union = torch.max(union, eps_t)
    ious = overlap / union
    enclose_wh = (enclosed_rb - enclosed_lt).clamp(min=0)
    enclose_area = torch.max(enclose_wh[..., 0] * enclose_wh[..., 1], eps_t)
    return ious - (enclose_area - union) / enclose_area


def mmdet_pos_loss(cls_score, label, anchors, bbox_pred, bbox_target) -> torch.Tensor:
    """``PAAHead.get_pos_loss`` for one image's pre-assigned positives."""
    if not len(label):
        return cls_score.new_zeros(0)
    decoded = DeltaXYWHBoxCoder().decode(anchors, bbox_pred)
    loss_cls = 1.0 * mmdet_focal(cls_score, label)
    weight = torch.ones(len(label), 4).mean(-1)
    loss_bbox = 1.3 * ((1 - mmdet_giou(decoded, bbox_target)) * weight)
    return loss_bbox + loss_cls.sum(-1)


def mmdet_gmm_positives(pos_inds_gmm: torch.Tensor, pos_loss_gmm: torch.Tensor) -> torch.Tensor:
    """The GMM part of ``paa_reassign`` plus ``gmm_separation_scheme`` for one GT's sorted candidates."""
    x = pos_loss_gmm.view(-1, 1).cpu().numpy()
    min_loss, max_loss = x.min(), x.max()
    means_init = np.array([min_loss, max_loss]).reshape(2, 1)
    weights_init = np.array([0.5, 0.5])
    precisions_init = np.array([1.0, 1.0]).reshape(2, 1, 1).reshape(2, 1)  # diag
    gmm = GaussianMixture(
        2, weights_init=weights_init, means_init=means_init, precisions_init=precisions_init, covariance_type="diag"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        gmm.fit(x)
    assignment = torch.from_numpy(gmm.predict(x))
    scores = torch.from_numpy(gmm.score_samples(x))
    fgs = assignment == 0
    if fgs.nonzero().numel():
        _, pos_thr_ind = scores[fgs].topk(1)
        return pos_inds_gmm[fgs][: pos_thr_ind + 1]
    return pos_inds_gmm.new_tensor([], dtype=torch.long)


def mmdet_paa_reassign(pos_losses, pos_inds, pos_gt_inds, num_level_anchors, topk: int = 9) -> torch.Tensor:
    """``paa_reassign`` for one image: the anchor indices that stay positive (loop over GTs and levels)."""
    if not len(pos_inds):
        return pos_inds.new_zeros(0)
    num_gt = int(pos_gt_inds.max()) + 1
    interval = np.cumsum([0, *list(num_level_anchors)])
    level_masks = [(pos_inds >= interval[i]) & (pos_inds < interval[i + 1]) for i in range(len(num_level_anchors))]
    after = [pos_inds.new_tensor([])]
    for gt_ind in range(num_gt):
        inds_gmm, loss_gmm = [], []
        gt_mask = pos_gt_inds == gt_ind
        for level_mask in level_masks:
            level_gt_mask = level_mask & gt_mask
            value, topk_inds = pos_losses[level_gt_mask].topk(min(int(level_gt_mask.sum()), topk), largest=False)
            inds_gmm.append(pos_inds[level_gt_mask][topk_inds])
            loss_gmm.append(value)
        inds_gmm = torch.cat(inds_gmm)
        loss_gmm = torch.cat(loss_gmm)
        if len(inds_gmm) < 2:
            continue
        loss_gmm, sort_inds = loss_gmm.sort()
        after.append(mmdet_gmm_positives(inds_gmm[sort_inds], loss_gmm))
    return torch.cat(after).long()


# ---------------------------------------------------------------- random candidate sets

LEVELS = (400, 100, 40, 12, 4)  # anchors per level of the made-up images


def random_positives(gen: torch.Generator, num_gts: list[int], ties: bool = False):
    """Pre-assigned positives of a batch of len(num_gts) images, in image-major ascending anchor order.

    Each GT gets a random number of candidates per level (often 0; some GTs end with 0 or 1 in all);
    scores come from two clusters, or with ``ties`` from three exactly representable values.
    Returns per image (pos_inds, pos_gt_inds, scores) and the batched (scores, gt_rows, levels).
    """
    starts = np.cumsum((0, *LEVELS))
    per_image = []
    m_max = max(num_gts)
    for m in num_gts:
        inds, gts = [], []
        for level, size in enumerate(LEVELS):
            counts = torch.randint(0, 13, (m,), generator=gen) * (torch.rand(m, generator=gen) < 0.6)
            counts[torch.rand(m, generator=gen) < 0.15] = 0
            total = min(int(counts.sum()), size)
            anchors = torch.randperm(size, generator=gen)[:total] + int(starts[level])
            owner = torch.repeat_interleave(torch.arange(m), counts)[:total]
            inds.append(anchors)
            gts.append(owner)
        inds, gts = torch.cat(inds), torch.cat(gts)
        order = inds.argsort()
        inds, gts = inds[order], gts[order]
        if ties:
            # no value half-way between two others: at such a point the two fitted components can tie to
            # the last bit, and predict() then follows rounding (scikit-learn and any port may disagree)
            scores = torch.tensor([1.0, 1.25, 3.0])[torch.randint(0, 3, (len(inds),), generator=gen)]
        else:
            fg = torch.rand(len(inds), generator=gen) < 0.4
            scores = torch.where(
                fg, 0.8 + 0.3 * torch.randn(len(inds), generator=gen), 2.5 + 0.7 * torch.randn(len(inds), generator=gen)
            ).abs()
        per_image.append((inds, gts, scores.float()))
    levels = [torch.bucketize(inds, torch.tensor(starts[1:]), right=True) for inds, _, _ in per_image]
    rows = [gts + i * m_max for i, (_, gts, _) in enumerate(per_image)]
    batched = (torch.cat([s for _, _, s in per_image]), torch.cat(rows), torch.cat(levels))
    return per_image, batched, m_max


def batched_positive_inds(per_image, batched, m_max):
    scores, rows, levels = batched
    result = paa_reassign(scores, rows, levels, len(per_image) * m_max, len(LEVELS))
    out, offset = [], 0
    for inds, _, _ in per_image:
        out.append(inds[result.positive[offset : offset + len(inds)]])
        offset += len(inds)
    return out, result


# ---------------------------------------------------------------- focal loss and the anchor score


def test_sigmoid_focal_loss_hand_computed():
    # logit 0 -> p = 1/2, BCE = ln 2 for either target; pt = 1/2
    # target class: 0.25 * 0.25 * ln 2; other class: 0.75 * 0.25 * ln 2; background (label C): all negative
    loss = sigmoid_focal_loss(torch.zeros(2, 2), torch.tensor([0, 2]))
    ln2 = math.log(2)
    expected = torch.tensor([[0.0625 * ln2, 0.1875 * ln2], [0.1875 * ln2, 0.1875 * ln2]])
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-7)
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(50, 80, generator=gen) * 3
    labels = torch.randint(0, 81, (50,), generator=gen)
    assert torch.equal(sigmoid_focal_loss(logits, labels), mmdet_focal(logits, labels))


def test_anchor_score_hand_computed():
    # a perfect box (GIoU 1) and logits 0 over 2 classes: the score is the focal sum only
    anchors = torch.tensor([[0.0, 0.0, 64.0, 64.0], [0.0, 0.0, 64.0, 64.0]])
    gts = torch.tensor([[0.0, 0.0, 64.0, 64.0], [64.0, 0.0, 128.0, 64.0]])
    score = paa_anchor_scores(torch.zeros(2, 2), torch.tensor([1, 1]), anchors, torch.zeros(2, 4), gts)
    focal = (0.0625 + 0.1875) * math.log(2)
    # second: disjoint neighbours, GIoU = 0 - (8192 - 8192) / 8192 = 0 -> 1.3 * 1
    torch.testing.assert_close(score, torch.tensor([focal, focal + 1.3]), rtol=0, atol=1e-6)
    weighted = paa_anchor_scores(
        torch.zeros(2, 2), torch.tensor([1, 1]), anchors, torch.zeros(2, 4), gts, cls_weight=2.0
    )
    torch.testing.assert_close(weighted, torch.tensor([2 * focal, 2 * focal + 1.3]), rtol=0, atol=1e-6)


def test_anchor_score_matches_get_pos_loss():
    gen = torch.Generator().manual_seed(3)
    num = 300
    anchors = torch.rand(num, 2, generator=gen) * 300
    anchors = torch.cat([anchors, anchors + 64 * 2 ** torch.randint(0, 5, (num, 1), generator=gen)], 1)
    gts = anchors + torch.randn(num, 4, generator=gen) * 20
    gts[:, 2:] = torch.maximum(gts[:, 2:], gts[:, :2] + 2)
    logits = torch.randn(num, 80, generator=gen) * 2 - 4
    deltas = torch.randn(num, 4, generator=gen)
    deltas[:5, 2:] = 40.0  # beyond the clamp
    labels = torch.randint(0, 80, (num,), generator=gen)
    ours = paa_anchor_scores(logits, labels, anchors, deltas, gts)
    assert torch.equal(ours, mmdet_pos_loss(logits, labels, anchors, deltas, gts))


# ---------------------------------------------------------------- the candidate table


def test_rank_in_runs():
    assert rank_in_runs(torch.tensor([3, 3, 5, 7, 7, 7])).tolist() == [0, 1, 0, 0, 1, 2]
    assert rank_in_runs(torch.tensor([4])).tolist() == [0]


def test_candidate_table_by_hand():
    # GT 0: 12 entries on level 0 (keep the 3 smallest with topk=3) and 2 on level 1; GT 1: nothing; GT 2: one
    scores = torch.tensor([9.0, 1.0, 8.0, 2.0, 7.0, 3.0, 6.0, 4.0, 5.0, 0.5, 11.0, 12.0, 2.5, 0.1, 4.5])
    rows = torch.tensor([0] * 14 + [2])
    levels = torch.tensor([0] * 12 + [1, 1] + [0])
    table = candidate_table(scores, rows, levels, num_gts=3, num_levels=2, topk=3)
    assert table.scores.shape == (3, 6)
    # level 0 keeps 0.5, 1, 2; level 1 keeps 2.5, 0.1; then ascending over both levels
    assert torch.equal(table.scores[0, :5], torch.tensor([0.1, 0.5, 1.0, 2.0, 2.5]))
    assert table.mask.tolist() == [[True] * 5 + [False], [False] * 6, [True] + [False] * 5]
    assert table.scores[2, 0].item() == 4.5
    width = 6
    dropped = table.slot == 3 * width
    assert dropped.tolist() == [
        True,
        False,
        True,
        False,
        True,
        True,
        True,
        True,
        True,
        False,
        True,
        True,
        False,
        False,
        False,
    ]
    assert table.slot[13].item() == 0 and table.slot[9].item() == 1 and table.slot[14].item() == 2 * width


def test_candidate_table_breaks_ties_by_input_order():
    # 5 equal scores on one level, topk 3: the first three entries (lowest anchor index) are the candidates,
    # in input order
    table = candidate_table(
        torch.ones(5),
        torch.zeros(5, dtype=torch.long),
        torch.zeros(5, dtype=torch.long),
        num_gts=1,
        num_levels=1,
        topk=3,
    )
    assert table.slot.tolist() == [0, 1, 2, 3, 3]


# ---------------------------------------------------------------- against the plain loop


@pytest.mark.parametrize("seed,num_gts", [(0, [1, 3]), (1, [8, 2]), (2, [50, 17]), (3, [5, 40]), (4, [20, 1])])
def test_matches_mmdetection_loop(seed, num_gts):
    gen = torch.Generator().manual_seed(seed)
    per_image, batched, m_max = random_positives(gen, num_gts)
    ours, result = batched_positive_inds(per_image, batched, m_max)
    checked_gmm = 0
    for i, (inds, gts, scores) in enumerate(per_image):
        ref = mmdet_paa_reassign(scores, inds, gts, LEVELS)
        assert torch.equal(ours[i], ref.sort().values), f"image {i}"
        counts = result.num_candidates[i * m_max : i * m_max + num_gts[i]]
        checked_gmm += int((counts >= 2).sum())
    assert checked_gmm > 0
    # some GTs have 0 or 1 candidates; none of them keeps a positive
    few = result.num_candidates < 2
    assert bool(few.any())
    rows = batched[1]
    assert not bool((result.positive & few[rows]).any())


def test_ties_keep_the_same_values():
    """With exact ties the positive anchors may differ from mmdetection's (which of the tied anchors),
    but per GT the number of positives and their scores are the same."""
    for seed in range(4):
        gen = torch.Generator().manual_seed(100 + seed)
        per_image, batched, m_max = random_positives(gen, [12, 6], ties=True)
        ours, _ = batched_positive_inds(per_image, batched, m_max)
        for i, (inds, gts, scores) in enumerate(per_image):
            ref = mmdet_paa_reassign(scores, inds, gts, LEVELS)
            lookup = dict(zip(inds.tolist(), zip(gts.tolist(), scores.tolist(), strict=False), strict=False))
            for g in range(int(gts.max()) + 1 if len(gts) else 0):
                mine = sorted(lookup[a][1] for a in ours[i].tolist() if lookup[a][0] == g)
                theirs = sorted(lookup[a][1] for a in ref.tolist() if lookup[a][0] == g)
                assert mine == theirs, f"seed {seed} image {i} gt {g}"


def test_all_equal_scores():
    # one GT, 20 candidates of the same score on two levels: the GMM components coincide, every sample is
    # in component 0 and the density ties everywhere; the count follows torch.topk(1) as in mmdetection
    scores = torch.full((20,), 1.5)
    inds = torch.cat([torch.arange(10), torch.arange(400, 410)])
    gts = torch.zeros(20, dtype=torch.long)
    ref = mmdet_paa_reassign(scores, inds, gts, LEVELS)
    levels = torch.bucketize(inds, torch.tensor(np.cumsum(LEVELS)), right=True)
    result = paa_reassign(scores, gts, levels, 1, len(LEVELS))
    assert int(result.positive.sum()) == len(ref)
    assert int(result.num_candidates[0]) == 18  # 9 per level


def test_no_positive_input_and_bad_shapes():
    empty = paa_reassign(torch.zeros(0), torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), 4, 5)
    assert empty.positive.shape == (0,) and empty.num_candidates.tolist() == [0, 0, 0, 0]
    # a GT with exactly one candidate: skipped, nothing positive
    one = paa_reassign(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0, 1, 1]), torch.tensor([0, 0, 2]), 2, 5)
    assert one.positive[0].item() is False
    assert one.num_candidates.tolist() == [1, 2]
    with pytest.raises(PaadetError):
        paa_reassign(torch.zeros(3), torch.zeros(2, dtype=torch.long), torch.zeros(3, dtype=torch.long), 1, 5)


@pytest.mark.parametrize("gamma", [2.0, 1.5])
def test_focal_row_sums_equal_mmdetection_bits(gamma):
    gen = torch.Generator().manual_seed(11)
    for rows, classes in [(1, 3), (37, 80), (1000, 80), (5, 1)]:
        logits = torch.randn(rows, classes, generator=gen) * 6 - 3
        logits[0, 0] = 40.0  # saturated: p == 1 in float32
        labels = torch.randint(0, classes, (rows,), generator=gen)
        expected = mmdet_focal(logits, labels, gamma=gamma).sum(-1)
        assert torch.equal(sigmoid_focal_row_sums(logits, labels, gamma=gamma), expected)
    empty = torch.zeros(0, 80)
    assert sigmoid_focal_row_sums(empty, torch.zeros(0, dtype=torch.long)).shape == (0,)
