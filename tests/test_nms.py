"""Multi-class NMS: the batched fixed-point implementation against a plain greedy loop."""

from __future__ import annotations

import math

import torch

from paadet.postprocess import (
    Candidates,
    PostprocessConfig,
    greedy_nms_first,
    greedy_nms_sorted,
    group_by_class,
    multiclass_nms,
)

NO_VOTING = PostprocessConfig(score_voting=False)


def iou64(a: list[float], b: list[float]) -> float:
    """IoU of two xyxy boxes in float64, no +1."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def reference_nms(boxes: torch.Tensor, scores: torch.Tensor, score_thr: float, iou_thr: float, max_per_img: int):
    """One image, plain Python: ``[(score, anchor, label), ...]`` sorted by score, and the count before truncation.

    The threshold test is done on the float32 tensor, as mmdetection does (``scores > score_thr``).
    """
    valid = (scores > score_thr).tolist()
    box_list = boxes.double().tolist()
    score_list = scores.tolist()
    dets = []
    for c in range(scores.shape[1]):
        cands = sorted(((score_list[a][c], a) for a in range(scores.shape[0]) if valid[a][c]), reverse=True)
        kept: list[tuple[float, int]] = []
        for s, a in cands:
            if all(iou64(box_list[a], box_list[b]) <= iou_thr for _, b in kept):
                kept.append((s, a))
        dets += [(s, a, c) for s, a in kept]
    dets.sort(key=lambda d: -d[0])
    return dets[:max_per_img], len(dets)


def random_candidates(
    batch: int, anchors: int, classes: int, seed: int, empty_images: tuple[int, ...] = ()
) -> Candidates:
    """Boxes in a few tight clusters (long suppression chains), scores with many below 0.05."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.rand(batch, 6, 2, generator=gen) * 200 + 30
    which = torch.randint(0, 6, (batch, anchors), generator=gen)
    ctr = centres.gather(1, which[..., None].expand(-1, -1, 2)) + torch.randn(batch, anchors, 2, generator=gen) * 6
    size = torch.rand(batch, anchors, 2, generator=gen) * 30 + 25
    boxes = torch.cat([ctr - size / 2, ctr + size / 2], dim=-1).clamp(min=0)
    scores = torch.rand(batch, anchors, classes, generator=gen) ** 2
    for i in empty_images:
        scores[i] *= 0.05  # all <= 0.05: no candidates
    return Candidates(boxes, scores)


def assert_well_posed(cand: Candidates, config: PostprocessConfig) -> None:
    """Preconditions that make the float64 reference exact: no score ties among candidates, and no
    same-class IoU within 2e-5 of the threshold (mmcv's float32 IoU on class-offset boxes, coordinates
    below ~2e3 here, differs from the float64 IoU by less than that)."""
    for boxes, scores in zip(cand.boxes, cand.nms_scores, strict=False):
        valid = scores > config.score_thr
        vals = scores[valid]
        assert vals.unique().numel() == vals.numel()
        for c in range(scores.shape[1]):
            b = boxes[valid[:, c]].double()
            lt = torch.maximum(b[:, None, :2], b[None, :, :2])
            rb = torch.minimum(b[:, None, 2:], b[None, :, 2:])
            inter = (rb - lt).clamp(min=0).prod(-1)
            area = (b[:, 2:] - b[:, :2]).prod(-1)
            iou = inter / (area[:, None] + area[None, :] - inter)
            assert not bool(((iou - config.iou_thr).abs() < 2e-5).any())


def check_against_reference(cand: Candidates, config: PostprocessConfig) -> list[int]:
    dets = multiclass_nms(cand, config)
    batch = cand.boxes.shape[0]
    assert dets.boxes.shape == (batch, config.max_per_img, 4)
    assert dets.scores.shape == (batch, config.max_per_img)
    assert dets.labels.shape == (batch, config.max_per_img)
    totals = []
    for i in range(batch):
        ref, total = reference_nms(
            cand.boxes[i], cand.nms_scores[i], config.score_thr, config.iou_thr, config.max_per_img
        )
        totals.append(total)
        n = len(ref)
        assert int(dets.num_dets[i]) == n
        assert dets.labels[i, :n].tolist() == [c for _, _, c in ref]
        assert dets.scores[i, :n].tolist() == [s for s, _, _ in ref]
        assert torch.equal(dets.boxes[i, :n], cand.boxes[i, [a for _, a, _ in ref]].reshape(n, 4))
        assert torch.all(dets.labels[i, n:] == -1)
        assert torch.all(dets.scores[i, n:] == 0)
        assert torch.all(dets.boxes[i, n:] == 0)
    return totals


def test_random_batch_matches_greedy_reference():
    cand = random_candidates(batch=3, anchors=240, classes=4, seed=2, empty_images=(1,))
    cand.nms_scores[2] *= 0.06  # fewer candidates in image 2
    assert_well_posed(cand, NO_VOTING)
    totals = check_against_reference(cand, NO_VOTING)
    assert totals[0] > 100  # truncated to the best 100
    assert totals[1] == 0  # the empty image
    assert 0 < totals[2] < 100  # not truncated


def test_more_kept_than_max_per_img():
    config = PostprocessConfig(score_voting=False, max_per_img=25)
    cand = random_candidates(batch=2, anchors=300, classes=6, seed=2)
    assert_well_posed(cand, config)
    totals = check_against_reference(cand, config)
    assert all(t > 25 for t in totals)


def test_default_max_per_img_100_truncates():
    # boxes on a grid (IoU 0 between neighbours): every candidate survives NMS
    gen = torch.Generator().manual_seed(3)
    xs, ys = torch.meshgrid(torch.arange(12.0), torch.arange(12.0), indexing="xy")
    tl = torch.stack([xs.reshape(-1), ys.reshape(-1)], -1) * 20
    boxes = torch.cat([tl, tl + 15], -1)[None]  # [1, 144, 4]
    scores = 0.06 + 0.9 * torch.rand(1, 144, 2, generator=gen)
    cand = Candidates(boxes, scores)
    assert_well_posed(cand, NO_VOTING)
    totals = check_against_reference(cand, NO_VOTING)
    assert totals == [288]


def test_small_chunks_give_the_same_result():
    cand = random_candidates(batch=2, anchors=150, classes=5, seed=4)
    full = multiclass_nms(cand, NO_VOTING)
    chunked = multiclass_nms(cand, PostprocessConfig(score_voting=False, nms_chunk_elements=1))
    for a, b in zip(full, chunked, strict=False):
        assert torch.equal(a, b)


def test_any_tile_and_sweep_setting_is_exact():
    """Tiles of 1, 2, 7 and 64 candidates need many steps (and suppression across steps); all are exact."""
    cand = random_candidates(batch=3, anchors=240, classes=4, seed=2, empty_images=(1,))
    for tile in (1, 2, 7, 64):
        for max_per_img in (5, 100):
            for sweeps in (1, 3):
                config = PostprocessConfig(
                    score_voting=False, nms_tile=tile, max_per_img=max_per_img, nms_sweeps_per_check=sweeps
                )
                assert_well_posed(cand, config)
                check_against_reference(cand, config)
    voted_short = multiclass_nms(cand, PostprocessConfig(nms_tile=2))
    voted_full = multiclass_nms(cand, PostprocessConfig(nms_tile=10**6))
    for a, b in zip(voted_short, voted_full, strict=False):
        assert torch.equal(a, b)


def test_greedy_nms_first_stops_after_max_keep():
    """Five disjoint boxes in one class: all would be kept; only the first two are returned."""
    x = torch.arange(5, dtype=torch.float32) * 20
    boxes = torch.stack([x, torch.zeros(5), x + 10, torch.full((5,), 10.0)], -1)[None]
    valid = torch.ones(1, 5, dtype=torch.bool)
    labels = torch.zeros(1, 5, dtype=torch.long)
    groups = group_by_class(labels, valid, 1)
    for tile in (1, 2, 5):
        keep = greedy_nms_first(boxes, valid, labels, groups, 0.6, max_keep=2, tile=tile)
        assert keep.tolist() == [[True, True, False, False, False]]


def test_suppression_across_tiles_is_class_aware():
    """A tile of 1: box 0 (class 0) is decided first and must suppress box 2 (class 0, IoU 0.67)
    but not box 1 (class 1, same coordinates as box 2, no class offsets here)."""
    a, b = [0.0, 0.0, 10.0, 10.0], [2.0, 0.0, 12.0, 10.0]
    boxes = torch.tensor([[a, b, b]])
    valid = torch.ones(1, 3, dtype=torch.bool)
    labels = torch.tensor([[0, 1, 0]])
    keep = greedy_nms_first(boxes, valid, labels, group_by_class(labels, valid, 2), 0.6, max_keep=10, tile=1)
    assert keep.tolist() == [[True, True, False]]


def test_group_by_class():
    labels = torch.tensor([[2, 0, 2, 1, 0, 2]])
    valid = torch.tensor([[True, True, True, True, True, False]])
    groups = group_by_class(labels, valid, 3)
    assert groups.counts.tolist() == [[2, 1, 2]]
    assert groups.starts.tolist() == [[0, 2, 3]]
    assert groups.order[0, :5].tolist() == [1, 4, 3, 0, 2]  # class 0, then 1, then 2; list order within
    assert groups.largest == 2


def test_config_from_dict_ignores_unknown_keys():
    config = PostprocessConfig.from_dict({"score_thr": 0.1, "nms_prefix": 256})
    assert config.score_thr == 0.1 and config.nms_tile == PostprocessConfig().nms_tile


def test_batch_equals_each_image_alone():
    cand = random_candidates(batch=3, anchors=200, classes=4, seed=5, empty_images=(2,))
    batched = multiclass_nms(cand, NO_VOTING)
    for i in range(3):
        alone = multiclass_nms(Candidates(cand.boxes[i : i + 1], cand.nms_scores[i : i + 1]), NO_VOTING)
        for a, b in zip(batched, alone, strict=False):
            assert torch.equal(a[i : i + 1], b)


def test_no_candidates_at_all():
    cand = random_candidates(batch=2, anchors=50, classes=3, seed=6, empty_images=(0, 1))
    dets = multiclass_nms(cand, NO_VOTING)
    assert dets.num_dets.tolist() == [0, 0]
    assert torch.all(dets.labels == -1) and torch.all(dets.scores == 0) and torch.all(dets.boxes == 0)
    assert dets.boxes.shape == (2, 100, 4)


def test_score_threshold_is_strict():
    thr = torch.tensor(0.05)  # float32 0.05, as the threshold compares in float32
    boxes = torch.tensor([[[0.0, 0.0, 10.0, 10.0], [100.0, 100.0, 110.0, 110.0]]])
    scores = torch.stack([thr, torch.nextafter(thr, torch.tensor(1.0))]).reshape(1, 2, 1)
    dets = multiclass_nms(Candidates(boxes, scores), NO_VOTING)
    assert dets.num_dets.tolist() == [1]
    assert dets.boxes[0, 0].tolist() == [100.0, 100.0, 110.0, 110.0]


def test_nms_is_class_aware_and_iou_threshold_is_strict():
    # A and B: IoU = 80 / 120 = 0.667 > 0.6; A and C: IoU = 0.6 exactly (60 / 100), not suppressed
    a, b, c = [0.0, 0.0, 10.0, 10.0], [2.0, 0.0, 12.0, 10.0], [0.0, 0.0, 10.0, 6.0]
    assert math.isclose(iou64(a, c), 0.6)
    boxes = torch.tensor([[a, b, c]])
    # class 0: A kept, B suppressed by A, C kept; class 1: only B is a candidate, kept despite class-0 A
    scores = torch.tensor([[[0.9, 0.04], [0.7, 0.8], [0.5, 0.04]]])
    dets = multiclass_nms(Candidates(boxes, scores), NO_VOTING)
    n = int(dets.num_dets[0])
    got = list(zip(dets.scores[0, :n].tolist(), dets.labels[0, :n].tolist(), dets.boxes[0, :n].tolist(), strict=False))
    expected = [(0.9, 0, a), (0.8, 1, b), (0.5, 0, c)]
    assert [(round(s, 6), label, bx) for s, label, bx in got] == [(s, label, bx) for s, label, bx in expected]


def chain_boxes(n: int, step: float = 2.0) -> torch.Tensor:
    """10x10 boxes shifted right by ``step``: neighbours IoU 80/120 = 0.667, next-but-one 60/140 = 0.43."""
    x = torch.arange(n, dtype=torch.float32) * step
    return torch.stack([x, torch.zeros(n), x + 10, torch.full((n,), 10.0)], -1)


def test_greedy_nms_sorted_chain():
    # A suppresses B; B would suppress C but B is gone, so C is kept; C suppresses D
    keep = greedy_nms_sorted(chain_boxes(4)[None], torch.ones(1, 4, dtype=torch.bool), 0.6)
    assert keep.tolist() == [[True, False, True, False]]


def test_greedy_nms_sorted_long_chain_needs_many_sweeps():
    for sweeps_per_check in (1, 2, 4, 7):
        keep = greedy_nms_sorted(chain_boxes(31)[None], torch.ones(1, 31, dtype=torch.bool), 0.6, sweeps_per_check)
        assert keep[0].tolist() == [i % 2 == 0 for i in range(31)]


def test_greedy_nms_sorted_groups_and_padding():
    chain = chain_boxes(4)
    apart = torch.tensor(
        [[0.0, 0.0, 10.0, 10.0], [20.0, 0.0, 30.0, 10.0], [40.0, 0.0, 50.0, 10.0], [60.0, 0.0, 70.0, 10.0]]
    )
    boxes = torch.stack([chain, apart, chain])
    valid = torch.tensor(
        [
            [True, True, True, True],
            [True, True, True, False],  # padding row is never kept
            [False, True, True, True],  # A is padding: it suppresses nothing, so B is kept and suppresses C
        ]
    )
    keep = greedy_nms_sorted(boxes, valid, 0.6)
    assert keep.tolist() == [
        [True, False, True, False],
        [True, True, True, False],
        [False, True, False, True],
    ]


def test_greedy_nms_sorted_identical_boxes_keep_only_the_first():
    boxes = torch.tensor([[5.0, 5.0, 25.0, 30.0]]).expand(5, 4)[None]
    keep = greedy_nms_sorted(boxes, torch.ones(1, 5, dtype=torch.bool), 0.6)
    assert keep.tolist() == [[True, False, False, False, False]]
