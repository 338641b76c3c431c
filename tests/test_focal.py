"""``paadet.train.focal``: the few-pass focal-loss sum equals mmdetection's formula, value and gradient."""

from __future__ import annotations

import math

import pytest
import torch

from paadet.train.focal import focal_loss_sum
from paadet.train.reassign import sigmoid_focal_loss


def reference(logits, labels, weights, alpha=0.25, gamma=2.0):
    return (sigmoid_focal_loss(logits, labels, alpha, gamma) * weights[:, None]).sum()


def test_hand_computed():
    # logit 0: p = 1/2, BCE = ln 2, pt = 1/2; a positive element 0.25 * 0.25 ln 2, a negative 0.75 * 0.25 ln 2
    loss = focal_loss_sum(torch.zeros(2, 2), torch.tensor([0, 2]), torch.tensor([1.0, 2.0]))
    ln2 = math.log(2)
    assert loss.item() == pytest.approx((0.0625 + 0.1875) * ln2 + 2 * 2 * 0.1875 * ln2, rel=1e-6)


@pytest.mark.parametrize("gamma", [2.0, 1.5])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_equals_mmdetection_formula_with_gradients(seed, gamma):
    gen = torch.Generator().manual_seed(seed)
    num_anchors, num_classes = 300, 80
    logits = torch.randn(num_anchors, num_classes, generator=gen, dtype=torch.float64) * 4 - 2
    logits[:5] = torch.tensor([30.0, -30.0, 0.0, 15.0, -15.0], dtype=torch.float64)[:, None]  # saturating logits
    labels = torch.randint(0, num_classes + 1, (num_anchors,), generator=gen)
    labels[:5] = torch.tensor([0, 1, 2, num_classes, 3])
    weights = (torch.rand(num_anchors, generator=gen, dtype=torch.float64) > 0.1).double()
    a = logits.clone().requires_grad_(True)
    b = logits.clone().requires_grad_(True)
    ours = focal_loss_sum(a, labels, weights, 0.25, gamma)
    ref = reference(b, labels, weights, 0.25, gamma)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=0)
    (ours * 3).backward()
    (ref * 3).backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-12)


def test_float32_matches_to_rounding_and_all_background():
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(2000, 80, generator=gen) * 3 - 4
    labels = torch.randint(0, 81, (2000,), generator=gen)
    weights = torch.ones(2000)
    torch.testing.assert_close(
        focal_loss_sum(logits, labels, weights), reference(logits, labels, weights), rtol=1e-5, atol=0
    )
    background = torch.full((2000,), 80)
    x = logits.clone().requires_grad_(True)
    focal_loss_sum(x, background, weights).backward()
    y = logits.clone().requires_grad_(True)
    reference(y, background, weights).backward()
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-5, atol=1e-9)
