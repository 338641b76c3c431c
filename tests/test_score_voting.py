"""PAA score voting against a per-detection Python loop following the formula of the spec."""

from __future__ import annotations

import math

import torch

from paadet.postprocess import Candidates, PostprocessConfig, multiclass_nms

VOTING = PostprocessConfig(score_voting=True)
NO_VOTING = PostprocessConfig(score_voting=False)


def iou_eps(a: list[float], b: list[float], eps: float = 1e-6) -> float:
    """mmdetection's ``bbox_overlaps`` for one pair, float64: union clamped below at ``eps``, no +1."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / max(union, eps)


def reference_vote(
    det_box: list[float], label: int, boxes: torch.Tensor, scores: torch.Tensor, score_thr: float
) -> list[float]:
    """One detection: weighted mean of the same-class candidates (score > thr) with IoU > 0.01."""
    valid = (scores[:, label] > score_thr).tolist()  # float32 comparison, as mmdetection
    num = [0.0] * 4
    den = 0.0
    for a, box in enumerate(boxes.double().tolist()):
        if not valid[a]:
            continue
        u = iou_eps(det_box, box)
        if u > 0.01:
            w = math.exp(-((1 - u) ** 2) / 0.025) * float(scores[a, label])
            num = [n + w * x for n, x in zip(num, box, strict=False)]
            den += w
    return [n / den for n in num]


def random_candidates(batch: int, anchors: int, classes: int, seed: int) -> Candidates:
    """Boxes in a few clusters so that each detection has many voting partners."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.rand(batch, 5, 2, generator=gen) * 200 + 40
    which = torch.randint(0, 5, (batch, anchors), generator=gen)
    ctr = centres.gather(1, which[..., None].expand(-1, -1, 2)) + torch.randn(batch, anchors, 2, generator=gen) * 8
    size = torch.rand(batch, anchors, 2, generator=gen) * 40 + 20
    boxes = torch.cat([ctr - size / 2, ctr + size / 2], dim=-1)
    scores = torch.rand(batch, anchors, classes, generator=gen) ** 2
    return Candidates(boxes, scores)


def test_voting_matches_reference_loop():
    cand = random_candidates(batch=2, anchors=200, classes=3, seed=0)
    plain = multiclass_nms(cand, NO_VOTING)
    voted = multiclass_nms(cand, VOTING)
    # voting changes boxes only: same detections, same scores, same order
    assert torch.equal(voted.num_dets, plain.num_dets)
    assert torch.equal(voted.labels, plain.labels)
    assert torch.equal(voted.scores, plain.scores)
    moved = 0.0
    for i in range(2):
        n = int(plain.num_dets[i])
        assert n > 20
        expected = torch.tensor(
            [
                reference_vote(
                    plain.boxes[i, j].double().tolist(),
                    int(plain.labels[i, j]),
                    cand.boxes[i],
                    cand.nms_scores[i],
                    0.05,
                )
                for j in range(n)
            ],
            dtype=torch.float64,
        )
        torch.testing.assert_close(voted.boxes[i, :n].double(), expected, rtol=0, atol=2e-4)
        assert torch.all(voted.boxes[i, n:] == 0)
        moved = max(moved, float((expected - plain.boxes[i, :n].double()).abs().max()))
    assert moved > 1.0  # voting does move boxes on this input


def test_voting_with_truncation_to_max_per_img():
    config = PostprocessConfig(score_voting=True, max_per_img=15)
    cand = random_candidates(batch=1, anchors=200, classes=3, seed=1)
    plain = multiclass_nms(cand, PostprocessConfig(score_voting=False, max_per_img=15))
    voted = multiclass_nms(cand, config)
    assert int(voted.num_dets[0]) == 15
    # voting uses all candidates of the class, not only the 15 kept detections
    expected = torch.tensor(
        [
            reference_vote(
                plain.boxes[0, j].double().tolist(), int(plain.labels[0, j]), cand.boxes[0], cand.nms_scores[0], 0.05
            )
            for j in range(15)
        ],
        dtype=torch.float64,
    )
    torch.testing.assert_close(voted.boxes[0].double(), expected, rtol=0, atol=2e-4)


def test_hand_computed_two_boxes():
    # A = [0, 0, 10, 10] (0.9) and B = [0, 0, 10, 20] (0.4), class 0: IoU 0.5, both survive NMS.
    # Voting for A: w_A = e^0 * 0.9, w_B = e^(-(1 - 0.5)^2 / 0.025) * 0.4 = 0.4 e^-10.
    # Voting for B: w_A = 0.9 e^-10, w_B = 0.4.
    # B's box in class 1 (0.7) and D = [0, 0, 10, 30] (class 0, score 0.04 <= 0.05, IoU 1/3 with A) do not vote.
    boxes = torch.tensor(
        [[[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 20.0], [0.0, 0.0, 10.0, 30.0]]], dtype=torch.float64
    )
    scores = torch.tensor([[[0.9, 0.0], [0.4, 0.7], [0.04, 0.0]]], dtype=torch.float64)
    dets = multiclass_nms(Candidates(boxes, scores), VOTING)
    assert dets.num_dets.tolist() == [3]
    assert dets.labels[0, :3].tolist() == [0, 1, 0]
    assert dets.scores[0, :3].tolist() == [0.9, 0.7, 0.4]
    e = math.exp(-10)
    y2_a = (0.9 * 10 + 0.4 * e * 20) / (0.9 + 0.4 * e)
    y2_b = (0.9 * e * 10 + 0.4 * 20) / (0.9 * e + 0.4)
    torch.testing.assert_close(
        dets.boxes[0, 0], torch.tensor([0.0, 0.0, 10.0, y2_a], dtype=torch.float64), rtol=0, atol=1e-12
    )
    torch.testing.assert_close(
        dets.boxes[0, 2], torch.tensor([0.0, 0.0, 10.0, y2_b], dtype=torch.float64), rtol=0, atol=1e-12
    )
    # class 1 has a single candidate: its box is unchanged
    assert dets.boxes[0, 1].tolist() == [0.0, 0.0, 10.0, 20.0]


def test_batch_of_three_equals_each_image_alone():
    cand = random_candidates(batch=3, anchors=150, classes=4, seed=2)
    batched = multiclass_nms(cand, VOTING)
    for i in range(3):
        alone = multiclass_nms(Candidates(cand.boxes[i : i + 1], cand.nms_scores[i : i + 1]), VOTING)
        assert torch.equal(batched.num_dets[i : i + 1], alone.num_dets)
        assert torch.equal(batched.labels[i : i + 1], alone.labels)
        assert torch.equal(batched.scores[i : i + 1], alone.scores)
        torch.testing.assert_close(batched.boxes[i : i + 1], alone.boxes, rtol=1e-6, atol=1e-5)
