"""PAALoss against a plain per-image transcription of mmdetection 3.3's ``PAAHead.loss_by_feat`` (the
assigner, PseudoSampler, unmap, get_pos_loss, paa_reassign with scikit-learn, the final losses): same
reassigned labels, same num_pos, losses within 1e-5; the zero-positive graph; gradients to all three
head outputs; host syncs that do not grow with the number of boxes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_assign import STRIDES, mmdet_assign, mmdet_valid_flags, random_gt_boxes
from test_reassign import mmdet_giou, mmdet_paa_reassign, mmdet_pos_loss

import paadet.train.reassign as reassign_module
from paadet.bench.profiling import count_device_work
from paadet.errors import PaadetError
from paadet.model.anchors import AnchorGenerator, feature_sizes
from paadet.model.box_coder import DeltaXYWHBoxCoder
from paadet.train import gmm
from paadet.train.loss import LossOutput, PAALoss, PAALossConfig, flatten_levels

EPS32 = torch.finfo(torch.float32).eps
BATCH_SHAPE = (256, 192)  # padded batch input
PAD_SHAPES = [(256, 192), (224, 160)]  # each image's own pad_shape


# ---------------------------------------------------------------- the transcription


def levels_to_images(mlvl: list[torch.Tensor]) -> list[torch.Tensor]:
    batch, channels = mlvl[0].shape[:2]
    per_image = [[] for _ in range(batch)]
    for t in mlvl:
        t = t.permute(0, 2, 3, 1).reshape(batch, -1, channels).contiguous()
        for i in range(batch):
            per_image[i].append(t[i])
    return [torch.cat(item, 0) for item in per_image]


def mmdet_aligned_iou(b1: torch.Tensor, b2: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    area1 = (b1[..., 2] - b1[..., 0]) * (b1[..., 3] - b1[..., 1])
    area2 = (b2[..., 2] - b2[..., 0]) * (b2[..., 3] - b2[..., 1])
    lt = torch.max(b1[..., :2], b2[..., :2])
    rb = torch.min(b1[..., 2:], b2[..., 2:])
    wh = (rb - lt).clamp(min=0)
    overlap = wh[..., 0] * wh[..., 1]
    union = torch.max(area1 + area2 - overlap, area1.new_tensor([eps]))
    return overlap / union


def mmdet_loss_by_feat(cls_scores, bbox_preds, iou_preds, gt_boxes, gt_labels, pad_shapes):
    """``PAAHead.loss_by_feat`` image by image, GT by GT: (loss dict, reassigned labels [B * A], num_pos per image)."""
    num_classes = cls_scores[0].shape[1]
    feat_sizes = [tuple(c.shape[-2:]) for c in cls_scores]
    level_anchors = AnchorGenerator(STRIDES)(feat_sizes)
    num_level_anchors = [len(a) for a in level_anchors]
    flat_anchors = torch.cat(level_anchors)
    num_anchors = len(flat_anchors)
    cls_imgs = [c.reshape(-1, num_classes) for c in levels_to_images(cls_scores)]
    bbox_imgs = [b.reshape(-1, 4) for b in levels_to_images(bbox_preds)]
    iou_imgs = [b.reshape(-1, 1) for b in levels_to_images(iou_preds)]
    all_labels, all_weights, all_targets, nums = [], [], [], []
    for i in range(len(gt_boxes)):
        valid = mmdet_valid_flags(feat_sizes, pad_shapes[i])
        gt_inds = mmdet_assign(flat_anchors[valid], gt_boxes[i])
        pos = torch.nonzero(gt_inds > 0, as_tuple=False).squeeze(-1).unique()
        neg = torch.nonzero(gt_inds == 0, as_tuple=False).squeeze(-1).unique()
        pos_assigned = gt_inds[pos] - 1
        num_valid = int(valid.sum())
        labels_v = torch.full((num_valid,), num_classes, dtype=torch.long)
        weights_v = torch.zeros(num_valid)
        targets_v = torch.zeros(num_valid, 4)
        if len(pos):
            targets_v[pos] = gt_boxes[i][pos_assigned]
            labels_v[pos] = gt_labels[i][pos_assigned]
            weights_v[pos] = 1.0
        if len(neg):
            weights_v[neg] = 1.0
        labels = torch.full((num_anchors,), num_classes, dtype=torch.long)
        labels[valid] = labels_v
        weights = torch.zeros(num_anchors)
        weights[valid] = weights_v
        targets = torch.zeros(num_anchors, 4)
        targets[valid] = targets_v
        pos_inds = ((labels >= 0) & (labels < num_classes)).nonzero().view(-1)
        pos_loss = mmdet_pos_loss(
            cls_imgs[i][pos_inds], labels[pos_inds], flat_anchors[pos_inds], bbox_imgs[i][pos_inds], targets[pos_inds]
        )
        with torch.no_grad():
            kept = mmdet_paa_reassign(pos_loss, pos_inds, pos_assigned, num_level_anchors)
        demote = (pos_inds.unsqueeze(1) != kept).all(1)
        labels = labels.clone()
        labels[pos_inds[demote]] = num_classes
        all_labels.append(labels)
        all_weights.append(weights)
        all_targets.append(targets)
        nums.append(len(kept))
    num_pos = sum(nums)
    cls_all = torch.cat(cls_imgs)
    bbox_all = torch.cat(bbox_imgs)
    iou_all = torch.cat(iou_imgs)
    labels = torch.cat(all_labels)
    weights = torch.cat(all_weights)
    targets = torch.cat(all_targets)
    anchors = torch.cat([flat_anchors] * len(gt_boxes))
    pos_flat = ((labels >= 0) & (labels < num_classes)).nonzero().reshape(-1)

    onehot = F.one_hot(labels, num_classes=num_classes + 1)[:, :num_classes].type_as(cls_all)
    prob = cls_all.sigmoid()
    pt = (1 - prob) * onehot + prob * (1 - onehot)
    focal_weight = (0.25 * onehot + 0.75 * (1 - onehot)) * pt.pow(2.0)
    focal = F.binary_cross_entropy_with_logits(cls_all, onehot, reduction="none") * focal_weight
    loss_cls = 1.0 * ((focal * weights.view(-1, 1)).sum() / (max(num_pos, len(gt_boxes)) + EPS32))
    if num_pos:
        pred = DeltaXYWHBoxCoder().decode(anchors[pos_flat], bbox_all[pos_flat])
        target = targets[pos_flat]
        iou_target = mmdet_aligned_iou(pred.detach(), target)
        bce = F.binary_cross_entropy_with_logits(iou_all[pos_flat], iou_target.unsqueeze(-1), reduction="none")
        loss_iou = 0.5 * ((bce * torch.ones_like(bce)).sum() / (num_pos + EPS32))
        giou = (1 - mmdet_giou(pred, target)) * iou_target.clamp(min=1e-12)
        loss_bbox = 1.3 * (giou.sum() / (iou_target.sum() + EPS32))
    else:
        loss_iou = iou_all.sum() * 0
        loss_bbox = bbox_all.sum() * 0
    return {"loss_cls": loss_cls, "loss_bbox": loss_bbox, "loss_iou": loss_iou}, labels, nums


# ---------------------------------------------------------------- inputs


def head_outputs(seed: int, batch: int = 2, num_classes: int = 80, shape: tuple[int, int] = BATCH_SHAPE):
    """Random raw head outputs for a padded batch (leaf tensors with grad)."""
    gen = torch.Generator().manual_seed(seed)
    sizes = feature_sizes(*shape)
    cls = [(torch.randn(batch, num_classes, h, w, generator=gen) - 4.0).requires_grad_() for h, w in sizes]
    box = [(torch.randn(batch, 4, h, w, generator=gen) * 0.4).requires_grad_() for h, w in sizes]
    iou = [torch.randn(batch, 1, h, w, generator=gen).requires_grad_() for h, w in sizes]
    return cls, box, iou


def ground_truths(seed: int, counts: list[int], pads=PAD_SHAPES, num_classes: int = 80):
    gen = torch.Generator().manual_seed(seed + 1000)
    boxes = [random_gt_boxes(gen, n, h, w) for n, (h, w) in zip(counts, pads, strict=False)]
    labels = [torch.randint(0, num_classes, (n,), generator=gen) for n in counts]
    return boxes, labels


def assert_losses_close(out: LossOutput, ref: dict) -> None:
    for name in ("loss_cls", "loss_bbox", "loss_iou"):
        torch.testing.assert_close(getattr(out, name), ref[name], rtol=1e-5, atol=1e-7, msg=name)


# ---------------------------------------------------------------- agreement with the transcription


@pytest.mark.parametrize("seed,counts", [(0, [1, 0]), (1, [8, 3]), (2, [50, 12]), (3, [0, 20]), (4, [5, 5])])
def test_matches_mmdetection_transcription(seed, counts):
    cls, box, iou = head_outputs(seed)
    boxes, labels = ground_truths(seed, counts)
    loss = PAALoss()
    out = loss(cls, box, iou, boxes, labels, PAD_SHAPES)
    targets = loss.targets(cls, box, iou, boxes, labels, PAD_SHAPES)
    ref, ref_labels, ref_nums = mmdet_loss_by_feat(cls, box, iou, boxes, labels, PAD_SHAPES)
    assert torch.equal(targets.labels, ref_labels)
    assert out.num_pos.tolist() == ref_nums
    assert out.num_pos.dtype == torch.int64 and out.num_ill_defined.tolist() == [0, 0]
    assert_losses_close(out, ref)
    torch.testing.assert_close(out.loss, ref["loss_cls"] + ref["loss_bbox"] + ref["loss_iou"], rtol=1e-5, atol=1e-7)
    if sum(counts):
        assert int(out.num_pos.sum()) > 0
    # label weights: 1 on each image's valid anchors, 0 outside its pad_shape
    sizes = feature_sizes(*BATCH_SHAPE)
    expected_w = torch.cat([mmdet_valid_flags(sizes, pad) for pad in PAD_SHAPES]).float()
    assert torch.equal(targets.label_weights, expected_w)


def test_batch_of_one_equals_each_image_alone():
    """Per-image normalisers: image i of a batch-of-one run gives the same targets as in the batch."""
    cls, box, iou = head_outputs(7)
    boxes, labels = ground_truths(7, [6, 9])
    loss = PAALoss()
    both = loss.targets(cls, box, iou, boxes, labels, PAD_SHAPES)
    for i in range(2):
        one = loss.targets(
            [c[i : i + 1] for c in cls],
            [b[i : i + 1] for b in box],
            [t[i : i + 1] for t in iou],
            boxes[i : i + 1],
            labels[i : i + 1],
            PAD_SHAPES[i : i + 1],
        )
        num = one.labels.shape[0]
        assert torch.equal(one.labels, both.labels[i * num : (i + 1) * num])
        assert one.num_pos.item() == both.num_pos[i].item()


# ---------------------------------------------------------------- zero positives and gradients


def test_zero_positive_batch_keeps_the_graph():
    cls, box, iou = head_outputs(5)
    empty = [torch.zeros(0, 4), torch.zeros(0, 4)]
    no_labels = [torch.zeros(0, dtype=torch.long)] * 2
    out = PAALoss()(cls, box, iou, empty, no_labels, PAD_SHAPES)
    ref, _, _ = mmdet_loss_by_feat(cls, box, iou, empty, no_labels, PAD_SHAPES)
    assert out.num_pos.tolist() == [0, 0]
    assert out.loss_bbox.item() == 0.0 and out.loss_iou.item() == 0.0
    assert out.loss_bbox.requires_grad and out.loss_iou.requires_grad
    assert_losses_close(out, ref)  # loss_cls normalised by max(0, 2 images)
    out.loss.backward()
    assert all(t.grad is not None for t in cls + box + iou)
    assert all(float(t.grad.abs().sum()) == 0.0 for t in box + iou)


def test_gts_with_a_single_candidate_give_no_positive():
    # a 4x4 box at (-31, -31) lies inside one 64-px anchor only (the P3 anchor at cell (0, 0), IoU 16/4096,
    # below 0.1): the low-quality match pre-assigns that one anchor, PAA skips a GT with a single
    # candidate, and the batch has no positive at all
    cls, box, iou = head_outputs(6)
    boxes = [torch.tensor([[-31.0, -31.0, -27.0, -27.0]]), torch.zeros(0, 4)]
    labels = [torch.tensor([3]), torch.zeros(0, dtype=torch.long)]
    loss = PAALoss()
    targets = loss.targets(cls, box, iou, boxes, labels, PAD_SHAPES)
    assert targets.pre_pos_index.tolist() == [0]
    out = loss(cls, box, iou, boxes, labels, PAD_SHAPES)
    ref, ref_labels, ref_nums = mmdet_loss_by_feat(cls, box, iou, boxes, labels, PAD_SHAPES)
    assert out.num_pos.tolist() == ref_nums == [0, 0]
    assert torch.equal(targets.labels, ref_labels)
    assert int((targets.labels < 80).sum()) == 0
    assert_losses_close(out, ref)


def test_gradients_reach_all_three_head_outputs():
    cls, box, iou = head_outputs(8)
    boxes, labels = ground_truths(8, [7, 4])
    loss = PAALoss()
    out = loss(cls, box, iou, boxes, labels, PAD_SHAPES)
    out.loss.backward()
    targets = loss.targets(cls, box, iou, boxes, labels, PAD_SHAPES)
    for outputs in (cls, box, iou):
        assert sum(float(t.grad.abs().sum()) for t in outputs) > 0
    # box and IoU gradients only at the final positives; no gradient at anchors outside the pad_shape
    positive = torch.zeros(targets.labels.shape[0], dtype=torch.bool)
    positive[targets.pos_index] = True
    for outputs in (box, iou):
        grads = flatten_levels([t.grad for t in outputs]).reshape(positive.shape[0], -1)
        assert bool((grads[~positive] == 0).all()) and bool((grads[positive] != 0).any(dim=1).all())
    cls_grad = flatten_levels([t.grad for t in cls]).reshape(positive.shape[0], -1)
    invalid = targets.label_weights == 0
    assert bool(invalid.any()) and bool((cls_grad[invalid] == 0).all())
    assert bool((cls_grad[~invalid] != 0).any(dim=1).all())


def test_half_precision_outputs_give_float32_losses():
    cls, box, iou = head_outputs(12)
    boxes, labels = ground_truths(12, [4, 6])
    half = [[t.detach().bfloat16().requires_grad_() for t in outputs] for outputs in (cls, box, iou)]
    out = PAALoss()(*half, boxes, labels, PAD_SHAPES)
    ref = PAALoss()(
        [t.float() for t in half[0]],
        [t.float() for t in half[1]],
        [t.float() for t in half[2]],
        boxes,
        labels,
        PAD_SHAPES,
    )
    assert out.loss.dtype == torch.float32
    assert out.num_pos.tolist() == ref.num_pos.tolist()
    torch.testing.assert_close(out.loss, ref.loss, rtol=0, atol=0)
    out.loss.backward()
    assert all(t.grad is not None and t.grad.dtype == torch.bfloat16 for outputs in half for t in outputs)


# ---------------------------------------------------------------- host syncs


def sync_free_gmm(monkeypatch):
    """Stand-ins for the GMM without host syncs: component 0 everywhere, the density peaking at the first
    candidate (one positive per GT). They isolate the syncs of the code around the GMM."""

    def fit(x, mask, **kwargs):
        assign = torch.where(mask, 0, -1)
        density = torch.where(mask, -torch.arange(x.shape[1], dtype=torch.float64)[None, :], -float("inf"))
        return gmm.GMMFit(
            assign,
            density,
            *(torch.zeros(x.shape[0], 2, dtype=torch.float64),) * 3,
            torch.ones(x.shape[0], dtype=torch.long),
            torch.ones(x.shape[0], dtype=torch.bool),
            torch.zeros(x.shape[0], dtype=torch.bool),
        )

    def positives(fit_result, mask):
        return mask & (mask.cumsum(1) == 1) & (mask.sum(1, keepdim=True) >= 2)

    monkeypatch.setattr(reassign_module.gmm, "fit_gmm_1d", fit)
    monkeypatch.setattr(reassign_module.gmm, "gmm_positives", positives)


def count_syncs(num_boxes: int, backward: bool = False) -> tuple[int, LossOutput]:
    cls, box, iou = head_outputs(9)
    boxes, labels = ground_truths(9, [num_boxes, num_boxes])
    loss = PAALoss()
    loss.anchors([tuple(c.shape[-2:]) for c in cls], cls[0].device)  # warm the anchor cache
    result = {}

    def run():
        result["out"] = loss(cls, box, iou, boxes, labels, PAD_SHAPES)
        if backward:
            result["out"].loss.backward()

    return count_device_work(run).syncs, result["out"]


def test_host_syncs_do_not_grow_with_the_number_of_boxes(monkeypatch):
    # with the real GMM: our 3 (the sparse assigner's pair count, nonzero of the pre-assigned and of the
    # final positives) plus the GMM's, which are bounded by its iteration checks, whatever the number of GTs
    real = {n: count_syncs(n)[0] for n in (1, 8, 50)}
    bound = 3 + (-(-100 // gmm.SYNC_EVERY) + 1) + 1
    assert all(3 < s <= bound for s in real.values()), real
    # without the GMM's: exactly 3 at any number of boxes, the backward pass included
    sync_free_gmm(monkeypatch)
    isolated = {n: count_syncs(n, backward=True) for n in (1, 8, 50)}
    assert {n: s for n, (s, _) in isolated.items()} == {1: 3, 8: 3, 50: 3}
    assert int(isolated[50][1].num_pos.sum()) > int(isolated[1][1].num_pos.sum()) > 0


# ---------------------------------------------------------------- settings and checks


def test_defaults_are_mmdetections_config():
    cfg = PAALoss().config
    assert cfg == PAALossConfig()
    assert (cfg.topk, cfg.focal_alpha, cfg.focal_gamma) == (9, 0.25, 2.0)
    assert (cfg.loss_cls_weight, cfg.loss_bbox_weight, cfg.loss_iou_weight) == (1.0, 1.3, 0.5)
    assert cfg.target_stds == (0.1, 0.1, 0.2, 0.2) and cfg.target_means == (0.0, 0.0, 0.0, 0.0)
    assert (cfg.pos_iou_thr, cfg.neg_iou_thr, cfg.min_pos_iou) == (0.1, 0.1, 0.0)
    assert cfg.strides == STRIDES and cfg.octave_base_scale == 8.0
    assert PAALoss(topk=5).config.topk == 5
    assert PAALoss().settings()["loss_bbox_weight"] == 1.3
    with pytest.raises(PaadetError):
        PAALoss(top_k=5)
    with pytest.raises(PaadetError):
        PAALoss(topk=0)


def test_other_settings_change_the_result():
    cls, box, iou = head_outputs(10)
    boxes, labels = ground_truths(10, [10, 10])
    base = PAALoss()(cls, box, iou, boxes, labels, PAD_SHAPES)
    fewer = PAALoss(topk=3)(cls, box, iou, boxes, labels, PAD_SHAPES)
    assert int(fewer.num_pos.sum()) <= int(base.num_pos.sum())
    heavier = PAALoss(loss_iou_weight=1.0)(cls, box, iou, boxes, labels, PAD_SHAPES)
    torch.testing.assert_close(heavier.loss_iou, 2 * base.loss_iou)


def test_bad_inputs_raise():
    cls, box, iou = head_outputs(11, batch=1)
    boxes, labels = ground_truths(11, [2], PAD_SHAPES[:1])
    loss = PAALoss()
    with pytest.raises(PaadetError):
        loss(cls[:4], box, iou, boxes, labels, PAD_SHAPES[:1])
    with pytest.raises(PaadetError):
        loss(cls, box, iou, boxes, labels, PAD_SHAPES)  # two pad shapes for one image
    with pytest.raises(PaadetError):
        loss(cls, [b[:, :2] for b in box], iou, boxes, labels, PAD_SHAPES[:1])
