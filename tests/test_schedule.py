"""The lr schedule: mmengine's LinearLR warm-up by iteration and MultiStepLR by epoch, hand-computed."""

from __future__ import annotations

import math

import pytest
import torch

from paadet.train.schedule import LRSchedule, set_lr

RECIPE = LRSchedule()  # lr 0.01, warm-up 500 iterations from 0.001, x0.1 after epochs 8 and 11


@pytest.mark.parametrize(
    ("iteration", "expected"),
    [
        (0, 1e-5),  # 0.01 * 0.001
        (1, 0.01 * (0.001 + 0.999 / 499)),  # 3.002004008e-05
        (250, 0.01 * (0.001 + 0.999 * 250 / 499)),  # 5.01501002e-03
        (498, 0.01 * (0.001 + 0.999 * 498 / 499)),
        (499, 0.01),  # total_iters = end - begin - 1 = 499: full lr at t = 499
        (500, 0.01),
        (7329, 0.01),
    ],
)
def test_warmup_values(iteration, expected):
    assert RECIPE.lr_at(iteration, 0) == pytest.approx(expected, rel=1e-12)


def test_hand_computed_digits():
    assert RECIPE.lr_at(1, 0) == pytest.approx(3.002004008016032e-05, rel=1e-12)
    assert RECIPE.lr_at(250, 0) == pytest.approx(5.015010020040080e-03, rel=1e-12)


@pytest.mark.parametrize(("epoch", "expected"), [(0, 0.01), (7, 0.01), (8, 1e-3), (10, 1e-3), (11, 1e-4)])
def test_steps_by_epoch(epoch, expected):
    """Epochs are 0-based here: the 9th epoch (index 8) runs at 1e-3, the 12th at 1e-4."""
    assert RECIPE.lr_at(100_000, epoch) == pytest.approx(expected, rel=1e-12)


def test_warmup_and_step_multiply():
    """Both schedulers are chainable in mmengine: inside the warm-up, a passed milestone scales it too."""
    assert RECIPE.lr_at(100, 8) == pytest.approx(0.01 * (0.001 + 0.999 * 100 / 499) * 0.1, rel=1e-12)


def test_short_warmups():
    assert LRSchedule(warmup_iters=0).lr_at(0, 0) == 0.01
    one = LRSchedule(warmup_iters=1, warmup_ratio=0.25)
    assert one.lr_at(0, 0) == pytest.approx(0.0025)
    assert one.lr_at(1, 0) == 0.01
    two = LRSchedule(base_lr=1.0, warmup_iters=2, warmup_ratio=0.5)
    assert [two.lr_at(t, 0) for t in range(3)] == [0.5, 1.0, 1.0]


def _mmengine_chain(base_lr, warmup_iters, ratio, milestones, gamma, iters_per_epoch, epochs):
    """mmengine 0.10's LinearLR(by_epoch=False, begin=0, end=W) + MultiStepLR(by_epoch=True), as its
    ParamSchedulerHook steps them: the lr of every iteration, by repeated multiplication."""
    lr = base_lr * ratio  # LinearLR.__init__ calls step(): last_step 0 -> lr * start_factor
    total = warmup_iters - 1
    out = []
    for epoch in range(epochs):
        for i in range(iters_per_epoch):
            out.append(lr)
            step = epoch * iters_per_epoch + i + 1  # LinearLR.step() after the iteration
            if step < warmup_iters:
                lr *= 1.0 + (1.0 - ratio) / (total * ratio + (step - 1) * (1.0 - ratio))
        if (epoch + 1) in milestones:  # MultiStepLR.step() after the epoch
            lr *= gamma ** milestones.count(epoch + 1)
    return out


def test_matches_mmengine_recurrence():
    per_epoch, epochs = 60, 12
    chained = _mmengine_chain(0.01, 500, 0.001, [8, 11], 0.1, per_epoch, epochs)
    closed = [RECIPE.lr_at(t, t // per_epoch) for t in range(per_epoch * epochs)]
    worst = max(abs(a - b) / b for a, b in zip(chained, closed, strict=False))
    assert worst < 1e-12
    assert math.isclose(closed[-1], 1e-4, rel_tol=1e-12)


def test_validation():
    with pytest.raises(ValueError, match="warmup_ratio"):
        LRSchedule(warmup_ratio=1.5)
    with pytest.raises(ValueError, match="milestones"):
        LRSchedule(milestones=(11, 8))
    with pytest.raises(ValueError, match=">= 0"):
        RECIPE.lr_at(-1, 0)


def test_set_lr_and_state():
    params = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))]
    optimizer = torch.optim.SGD([{"params": params[:1]}, {"params": params[1:]}], lr=0.5)
    set_lr(optimizer, 0.125)
    assert [g["lr"] for g in optimizer.param_groups] == [0.125, 0.125]
    assert RECIPE.state_dict() == {
        "base_lr": 0.01,
        "warmup_iters": 500,
        "warmup_ratio": 0.001,
        "milestones": [8, 11],
        "gamma": 0.1,
    }
