"""Delta-xywh decoding: identity, a hand-computed example, the dw/dh clamp and per-image clipping."""

from __future__ import annotations

import math

import torch

from paadet.model import DeltaXYWHBoxCoder

ANCHOR = torch.tensor([10.0, 20.0, 50.0, 100.0])  # centre (30, 60), size (40, 80)


def test_zero_deltas_give_the_anchor():
    anchors = torch.tensor([[10.0, 20.0, 50.0, 100.0], [-32.0, -32.0, 32.0, 32.0], [0.0, 0.0, 1024.0, 1024.0]])
    boxes = DeltaXYWHBoxCoder().decode(anchors, torch.zeros(3, 4))
    assert torch.equal(boxes, anchors)


def test_hand_computed_example_with_stds():
    # d = (1 * 0.1, -2 * 0.1, 0.5 * 0.2, -1 * 0.2) = (0.1, -0.2, 0.1, -0.2)
    # centre: (30 + 40 * 0.1, 60 + 80 * -0.2) = (34, 44); size: (40 e^0.1, 80 e^-0.2)
    deltas = torch.tensor([[1.0, -2.0, 0.5, -1.0]], dtype=torch.float64)
    boxes = DeltaXYWHBoxCoder().decode(ANCHOR.double()[None], deltas)
    w, h = 40 * math.exp(0.1), 80 * math.exp(-0.2)
    expected = torch.tensor([[34 - w / 2, 44 - h / 2, 34 + w / 2, 44 + h / 2]], dtype=torch.float64)
    torch.testing.assert_close(boxes, expected, rtol=0, atol=1e-12)
    assert abs(w - 44.20683672) < 1e-6 and abs(h - 65.49846024) < 1e-6


def test_huge_deltas_are_clamped_at_ln_1000_over_16():
    coder = DeltaXYWHBoxCoder()
    assert math.isclose(coder.max_ratio, math.log(1000 / 16))
    deltas = torch.tensor([[0.0, 0.0, 1000.0, -1000.0]], dtype=torch.float64)
    boxes = coder.decode(ANCHOR.double()[None], deltas)
    # width = 40 * 1000 / 16 = 2500, height = 80 * 16 / 1000 = 1.28, centre unchanged
    expected = torch.tensor([[30 - 1250, 60 - 0.64, 30 + 1250, 60 + 0.64]], dtype=torch.float64)
    torch.testing.assert_close(boxes, expected, rtol=0, atol=1e-9)


def test_deltas_just_inside_the_clamp_are_not_clamped():
    # dw = 20 * 0.2 = 4.0 < 4.135: width = 40 e^4
    boxes = DeltaXYWHBoxCoder().decode(
        ANCHOR.double()[None], torch.tensor([[0.0, 0.0, 20.0, 0.0]], dtype=torch.float64)
    )
    width = boxes[0, 2] - boxes[0, 0]
    assert math.isclose(float(width), 40 * math.exp(4.0), rel_tol=1e-12)


def test_clipping_per_image_of_a_batch():
    # one anchor per image, broadcast over a batch of 2; a box sticking out on every side
    anchors = torch.tensor([[-10.0, -5.0, 300.0, 400.0]])
    deltas = torch.zeros(2, 1, 4)
    max_shape = torch.tensor([[[100.0, 200.0]], [[500.0, 250.0]]])  # (height, width) per image: [B, 1, 2]
    boxes = DeltaXYWHBoxCoder().decode(anchors, deltas, max_shape=max_shape)
    assert boxes.shape == (2, 1, 4)
    # x to [0, width], y to [0, height]
    assert boxes[0, 0].tolist() == [0.0, 0.0, 200.0, 100.0]
    assert boxes[1, 0].tolist() == [0.0, 0.0, 250.0, 400.0]


def test_clipping_leaves_inside_boxes_alone_and_clamps_each_side():
    anchors = torch.tensor([[[10.0, 20.0, 50.0, 100.0], [-4.0, 30.0, 20.0, 140.0]]])
    max_shape = torch.tensor([[[120.0, 60.0]]])  # height 120, width 60
    boxes = DeltaXYWHBoxCoder().decode(anchors, torch.zeros(1, 2, 4), max_shape=max_shape)
    assert boxes[0].tolist() == [[10.0, 20.0, 50.0, 100.0], [0.0, 30.0, 20.0, 120.0]]


def test_means_are_added_after_scaling():
    coder = DeltaXYWHBoxCoder(means=(0.5, 0.0, 0.0, 0.0), stds=(1.0, 1.0, 1.0, 1.0))
    boxes = coder.decode(ANCHOR[None], torch.zeros(1, 4))
    # dx = 0.5: centre x moves by 0.5 * 40 = 20
    assert boxes[0].tolist() == [30.0, 20.0, 70.0, 100.0]
