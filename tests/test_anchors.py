"""Anchors: hand-computed values, row-major order and feature sizes that match the real network."""

from __future__ import annotations

import pytest
import torch

from paadet.model import STRIDES, AnchorGenerator, PAANet, feature_sizes


def test_stride8_level_2x3_by_hand():
    # side = 8 * stride = 64, centre offset 0: cell (x, y) -> [8x - 32, 8y - 32, 8x + 32, 8y + 32]
    anchors = AnchorGenerator().level_anchors((2, 3), 8)
    expected = torch.tensor(
        [
            [-32.0, -32.0, 32.0, 32.0],  # (x=0, y=0)
            [-24.0, -32.0, 40.0, 32.0],  # (x=1, y=0)
            [-16.0, -32.0, 48.0, 32.0],  # (x=2, y=0)
            [-32.0, -24.0, 32.0, 40.0],  # (x=0, y=1)
            [-24.0, -24.0, 40.0, 40.0],  # (x=1, y=1)
            [-16.0, -24.0, 48.0, 40.0],  # (x=2, y=1)
        ]
    )
    assert anchors.dtype == torch.float32
    assert torch.equal(anchors, expected)


def test_stride128_level_by_hand():
    # side 1024: cell (1, 0) -> [128 - 512, -512, 128 + 512, 512]
    anchors = AnchorGenerator().level_anchors((1, 2), 128)
    assert torch.equal(anchors, torch.tensor([[-512.0, -512.0, 512.0, 512.0], [-384.0, -512.0, 640.0, 512.0]]))


def test_all_levels_sizes_sides_and_row_major_order():
    sizes = [(5, 7), (3, 4), (2, 2), (1, 1), (1, 1)]
    levels = AnchorGenerator()(sizes)
    assert len(levels) == 5
    for (h, w), stride, anchors in zip(sizes, STRIDES, levels, strict=False):
        assert anchors.shape == (h * w, 4)
        grid = anchors.reshape(h, w, 4)  # y outer, x inner
        centres = (grid[..., :2] + grid[..., 2:]) / 2
        ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        assert torch.equal(centres[..., 0], xs.float() * stride)
        assert torch.equal(centres[..., 1], ys.float() * stride)
        assert torch.all(grid[..., 2:] - grid[..., :2] == 8 * stride)
    # index y * W + x of the stride-16 level with W = 4: cell (x=3, y=2) has centre (48, 32), side 128
    assert torch.equal(levels[1][2 * 4 + 3], torch.tensor([48.0 - 64, 32.0 - 64, 48.0 + 64, 32.0 + 64]))


def test_dtype_argument():
    anchors = AnchorGenerator().level_anchors((2, 2), 16, dtype=torch.float64)
    assert anchors.dtype == torch.float64
    assert anchors[3].tolist() == [-48.0, -48.0, 80.0, 80.0]


def test_wrong_number_of_levels_is_rejected():
    with pytest.raises(ValueError):
        AnchorGenerator()([(2, 2)] * 4)


def test_feature_sizes_800x1344():
    assert feature_sizes(800, 1344) == [(100, 168), (50, 84), (25, 42), (13, 21), (7, 11)]


@pytest.mark.parametrize(
    "height,width,expected",
    [
        (96, 160, [(12, 20), (6, 10), (3, 5), (2, 3), (1, 2)]),
        # ceil at every stride-2 step: 100 -> 50 -> 25 -> 13 (P3) -> 7 -> 4 -> 2 -> 1,
        # 150 -> 75 -> 38 -> 19 (P3) -> 10 -> 5 -> 3 -> 2
        (100, 150, [(13, 19), (7, 10), (4, 5), (2, 3), (1, 2)]),
    ],
)
def test_feature_sizes_match_network_outputs(height, width, expected):
    assert feature_sizes(height, width) == expected
    torch.manual_seed(0)
    model = PAANet()
    with torch.no_grad():
        cls_logits, box_deltas, iou_logits = model(torch.randn(1, 3, height, width))
    for outputs in (cls_logits, box_deltas, iou_logits):
        assert [tuple(t.shape[-2:]) for t in outputs] == expected
