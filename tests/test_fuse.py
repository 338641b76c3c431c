"""BatchNorm folding: same function up to float rounding, no BatchNorm left, every ResNet pair folded."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from paadet.model import PAANet
from paadet.model.fuse import fold_batchnorm
from paadet.model.seeded import seeded_state_dict


def test_folded_network_matches_and_has_no_batchnorm():
    net = PAANet()
    net.load_state_dict(seeded_state_dict(0))
    net.eval()
    folded = fold_batchnorm(net)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in net.modules()) == 53  # the original is untouched
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    convs_with_bias = [m for m in folded.backbone.modules() if isinstance(m, nn.Conv2d) and m.bias is not None]
    assert len(convs_with_bias) == 53
    x = torch.randn(1, 3, 96, 128, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ref, got = net(x), folded(x)
    for ref_maps, got_maps in zip(ref, got, strict=False):
        for r, g in zip(ref_maps, got_maps, strict=False):
            scale = float(r.abs().max())
            torch.testing.assert_close(g, r, rtol=0, atol=1e-4 * max(scale, 1.0))


def test_folding_a_hand_made_pair():
    """conv (weight 2, no bias) -> BN (mean 1, var 4, gamma 3, beta 0.5): y = 3 * (2x - 1) / sqrt(4 + eps) + 0.5."""
    block = nn.Module()
    block.conv1 = nn.Conv2d(1, 1, 1, bias=False)
    block.bn1 = nn.BatchNorm2d(1)
    with torch.no_grad():
        block.conv1.weight.fill_(2.0)
        block.bn1.running_mean.fill_(1.0)
        block.bn1.running_var.fill_(4.0)
        block.bn1.weight.fill_(3.0)
        block.bn1.bias.fill_(0.5)
    folded = fold_batchnorm(block)
    assert isinstance(folded.bn1, nn.Identity)
    x = torch.tensor([0.0, 1.0, 2.5]).reshape(3, 1, 1, 1)
    expected = 3 * (2 * x - 1) / (4 + 1e-5) ** 0.5 + 0.5
    torch.testing.assert_close(folded.bn1(folded.conv1(x)), expected)


def test_batchnorm_without_statistics_is_refused():
    block = nn.Module()
    block.conv1 = nn.Conv2d(1, 1, 1, bias=False)
    block.bn1 = nn.BatchNorm2d(1, track_running_stats=False)
    with pytest.raises(ValueError, match="bn1"):
        fold_batchnorm(block)
