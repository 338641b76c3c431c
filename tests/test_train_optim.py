"""paadet.train.optim: the optimiser choice, one step of each checked by hand."""

from __future__ import annotations

import pytest
import torch

from paadet.train import TrainConfig, TrainingError
from paadet.train.optim import OPTIMIZERS, build_optimizer


def one_step(name: str, **kwargs) -> float:
    """A single weight 1.0 with gradient 0.5, one step; returns the new weight."""
    w = torch.nn.Parameter(torch.tensor([1.0], dtype=torch.float64))
    opt = build_optimizer(name, [w], **kwargs)
    w.grad = torch.tensor([0.5], dtype=torch.float64)
    opt.step()
    return float(w.detach())


def test_sgd_step_by_hand():
    # SGD with L2 decay: w - lr * (g + wd * w) = 1 - 0.1 * (0.5 + 0.01) (the first step's momentum buffer is g)
    assert one_step("sgd", lr=0.1, momentum=0.9, weight_decay=0.01) == pytest.approx(0.949, abs=1e-12)


def test_adamw_step_by_hand():
    # AdamW: decoupled decay w * (1 - lr * wd), then the bias-corrected first step lr * g / (|g| + eps)
    expected = 1.0 * (1 - 0.1 * 0.01) - 0.1 * 0.5 / (0.5 + 1e-8)
    assert one_step("adamw", lr=0.1, weight_decay=0.01) == pytest.approx(expected, abs=1e-12)
    # momentum is SGD's only: AdamW ignores it
    assert one_step("adamw", lr=0.1, momentum=0.0, weight_decay=0.01) == pytest.approx(expected, abs=1e-12)


def test_adamw_is_fused_on_the_cpu_and_steps_as_the_loop_does():
    """The fused AdamW (one kernel per tensor) against torch's per-tensor loop: the same update, float32 rounding."""
    torch.manual_seed(0)
    start = [torch.randn(64, 32), torch.randn(32), torch.randn(8, 3, 3, 3)]
    weights = {}
    for fused in (True, False):
        params = [torch.nn.Parameter(t.clone()) for t in start]
        opt = (
            build_optimizer("adamw", params, lr=0.01, weight_decay=0.05)
            if fused
            else torch.optim.AdamW(params, lr=0.01, weight_decay=0.05, foreach=False)
        )
        assert opt.defaults["fused"] is (True if fused else None)
        gen = torch.Generator().manual_seed(1)
        for _ in range(5):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
        weights[fused] = [p.detach() for p in params]
    for a, b, s in zip(weights[True], weights[False], start, strict=False):
        assert not torch.equal(a, s)  # moved
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_unknown_optimizer():
    assert OPTIMIZERS == ("sgd", "adamw")
    with pytest.raises(ValueError, match="unknown optimizer 'adam'"):
        build_optimizer("adam", [torch.nn.Parameter(torch.ones(1))], lr=0.1)
    with pytest.raises(TrainingError, match="unknown optimizer 'lamb'; choose one of sgd, adamw"):
        TrainConfig(ann_file="a.json", image_dir="i", output_dir="o", init="scratch", optimizer="lamb")
