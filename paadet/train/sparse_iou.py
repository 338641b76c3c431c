"""The IoUs of ground truths with grid anchors, computed only where they can be non-zero.

The anchors of all levels (``[A, 4]`` xyxy, P3 first, row-major within a level, as
:class:`paadet.model.anchors.AnchorGenerator` makes them) form a grid per level: the anchor of column
``x`` and row ``y`` has the x-edges of column ``x`` and the y-edges of row ``y``, both non-decreasing
with the index (:class:`AnchorGrid` checks it once). The anchors whose right edge is past a GT's left
edge and whose left edge is before its right edge, and so in y, then form one window of columns and
rows per level, found by binary search on those edges (:func:`torch.searchsorted`: comparisons only,
exact). They include every anchor with a positive intersection (for a GT of positive width and
height, exactly those); every other anchor has IoU exactly ``+0`` with the GT, which the reductions
take as their starting value.

:func:`candidate_pairs` lists the (GT, anchor) pairs of the windows of a padded batch as flat 1-D
tensors (one host sync, for their number, whatever the number of images, boxes or anchors) and
computes their IoUs with :func:`pair_iou`, :func:`paadet.boxes.bbox_overlaps` operation for
operation, hence the same bits. The reductions (:func:`anchor_max`, :func:`gt_max`,
:func:`last_matching_gt`) give what ``max`` and the equality tests of the dense ``[B, M, A]`` tensor
give, ties included: float32 IoUs ``>= 0`` order as their int32 bits do, so an IoU and a tie-breaking
index packed into one int64 reduce with a single ``scatter_reduce(amax)``.

Outside the windows the dense IoU is ``overlap / union`` with ``overlap = w * h`` and one of ``w``,
``h`` = ``clamp(min(right edges) - max(left edges), min=0)`` of a difference ``<= 0``: ``+0``, unless that
difference is ``-0.0 - (+0.0)``, which needs a right (or bottom) edge of ``-0.0``; the union is positive
(clamped at ``eps``) or ``inf``, never NaN while the coordinates and areas are finite. So the pairs are
not used (``None`` is returned, the caller goes dense) for a real GT with a non-finite coordinate or
area or a ``-0.0`` right or bottom edge, a grid with such anchors (:attr:`AnchorGrid.exact`), dtypes
other than float32, or more pairs than ``max_density`` times the dense tensor's size (the dense path
is then as fast and needs less memory).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from paadet.errors import PaadetError

LOW_BITS = 32  # an int64 key is (IoU bits << 32) | tie-break index
LOW_MASK = (1 << LOW_BITS) - 1
INT32_MAX = (1 << 31) - 1  # the pairs' window arithmetic is int32


def _is_negative_zero(values: Tensor) -> Tensor:
    """Where ``values`` hold ``-0.0`` (same shape, bool)."""
    return (values == 0) & torch.signbit(values)


@dataclass(frozen=True, eq=False)
class AnchorGrid:
    """The per-level grid of the concatenated anchors, for :func:`candidate_pairs`.

    Attributes:
        feat_sizes: ``(H, W)`` of each level.
        col_x0, col_x1: ``[L, W_max]`` left and right edge of each level's columns (``+inf`` past ``W``).
        row_y0, row_y1: ``[L, H_max]`` top and bottom edge of each level's rows (``+inf`` past ``H``).
        col_edges: ``[2, L * W_max]`` (x0, x1) of the columns, levels one after the other.
        row_edges: ``[2, L * H_max]`` (y0, y1) of the rows.
        level_start: ``[L]`` int64 index of each level's first anchor in ``[A]``.
        level_width: ``[L]`` int64 ``W`` of each level.
        num_anchors: ``A``.
        exact: every coordinate and area finite, no right or bottom edge ``-0.0`` (else the sparse
            path is not used).
    """

    feat_sizes: tuple[tuple[int, int], ...]
    col_x0: Tensor
    col_x1: Tensor
    row_y0: Tensor
    row_y1: Tensor
    col_edges: Tensor
    row_edges: Tensor
    level_start: Tensor
    level_width: Tensor
    num_anchors: int
    exact: bool

    @classmethod
    def from_anchors(cls, anchors: Tensor, feat_sizes: list[tuple[int, int]]) -> AnchorGrid:
        """The grid of ``anchors [A, 4]`` (xyxy, levels of ``feat_sizes`` concatenated, row-major).

        Checks (a few host syncs, once per grid: cache the result) that every level is a grid with
        non-decreasing column and row edges; raises :class:`PaadetError` if not.
        """
        sizes = tuple((int(h), int(w)) for h, w in feat_sizes)
        if anchors.dim() != 2 or anchors.shape[1] != 4 or anchors.shape[0] != sum(h * w for h, w in sizes):
            raise PaadetError(
                f"anchors of shape {list(anchors.shape)} are not [sum(H * W) = "
                f"{sum(h * w for h, w in sizes)}, 4] for the feature sizes {list(sizes)}"
            )
        if not sizes or min(min(size) for size in sizes) < 1:
            raise PaadetError(f"feature sizes must be positive, got {list(sizes)}")
        width_max, height_max = max(w for _, w in sizes), max(h for h, _ in sizes)
        inf = float("inf")
        cols = anchors.new_full((len(sizes), 2, width_max), inf)
        rows = anchors.new_full((len(sizes), 2, height_max), inf)
        start = 0
        for level, (height, width) in enumerate(sizes):
            grid = anchors[start : start + height * width].reshape(height, width, 4)
            _check_level(grid, level)
            cols[level, :, :width] = grid[0, :, 0::2].T
            rows[level, :, :height] = grid[:, 0, 1::2].T
            start += height * width
        areas = (anchors[:, 2] - anchors[:, 0]) * (anchors[:, 3] - anchors[:, 1])
        exact = bool(
            torch.isfinite(anchors).all() & ~_is_negative_zero(anchors[:, 2:]).any() & torch.isfinite(areas).all()
        )
        level_sizes = torch.tensor([h * w for h, w in sizes], dtype=torch.long, device=anchors.device)
        return cls(
            sizes,
            cols[:, 0].contiguous(),
            cols[:, 1].contiguous(),
            rows[:, 0].contiguous(),
            rows[:, 1].contiguous(),
            cols.transpose(0, 1).reshape(2, -1).contiguous(),
            rows.transpose(0, 1).reshape(2, -1).contiguous(),
            level_sizes.cumsum(0) - level_sizes,
            torch.tensor([w for _, w in sizes], dtype=torch.long, device=anchors.device),
            int(anchors.shape[0]),
            exact,
        )


def _check_level(grid: Tensor, level: int) -> None:
    """Raise unless ``grid [H, W, 4]`` has x-edges that depend on the column only, y-edges on the row
    only, both non-decreasing."""
    x_edges, y_edges = grid[0, :, 0::2], grid[:, 0, 1::2]
    same_x = torch.equal(grid[..., 0::2], x_edges[None].expand_as(grid[..., 0::2]))
    same_y = torch.equal(grid[..., 1::2], y_edges[:, None].expand_as(grid[..., 1::2]))
    if not (same_x and same_y):
        raise PaadetError(f"level {level}: the anchors are not a grid (x-edges per column, y-edges per row)")
    increasing = bool((x_edges[1:] >= x_edges[:-1]).all() & (y_edges[1:] >= y_edges[:-1]).all())
    if not increasing:
        raise PaadetError(f"level {level}: the anchors' column or row edges decrease")


@dataclass
class PairOverlaps:
    """The IoUs of the (GT, anchor) pairs of a batch that may overlap, ``P`` pairs in no useful order.

    Attributes:
        gt: ``[P]`` int64 flat GT index ``b * M + i``.
        anchor: ``[P]`` int64 flat anchor index ``b * A + a``.
        iou: ``[P]`` float32 IoU (exactly the dense value), ``-1`` where the anchor is not valid.
        batch, num_gts, num_anchors: ``B``, ``M``, ``A``.
    """

    gt: Tensor
    anchor: Tensor
    iou: Tensor
    batch: int
    num_gts: int
    num_anchors: int


def _windows(grid: AnchorGrid, boxes: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """First column, column count, first row, row count ``[L, N]`` of each box's window at each level, for
    ``boxes [N, 4]`` (xyxy): the columns with ``x1 > box x0`` and ``x0 < box x1``, the rows likewise."""
    levels = grid.col_x0.shape[0]

    def search(edges: Tensor, values: Tensor, right: bool) -> Tensor:
        return torch.searchsorted(edges, values[None].expand(levels, -1).contiguous(), right=right)

    x_lo = search(grid.col_x1, boxes[:, 0], True)  # the first column whose right edge passes box x0
    x_hi = search(grid.col_x0, boxes[:, 2], False)  # the columns whose left edge is before box x1
    y_lo = search(grid.row_y1, boxes[:, 1], True)
    y_hi = search(grid.row_y0, boxes[:, 3], False)
    return x_lo, (x_hi - x_lo).clamp(min=0), y_lo, (y_hi - y_lo).clamp(min=0)


def _segment_table(
    grid: AnchorGrid, x_lo: Tensor, nx: Tensor, y_lo: Tensor, counts: Tensor, num_gts: int, num_anchors: int
) -> Tensor:
    """``[7, L * N]`` int32, per (level, flat GT) window: its first pair's index in the pair list, its
    first anchor ``b * A + a``, the level's width, the window's column count, its first column and row
    in :attr:`AnchorGrid.col_edges` / :attr:`AnchorGrid.row_edges`, the flat GT index."""
    levels, num = nx.shape
    device = nx.device
    gt_ids = torch.arange(num, device=device)[None].expand(levels, num)
    level = torch.arange(levels, device=device)[:, None]
    width = grid.level_width[:, None].expand(levels, num)
    first = grid.level_start[:, None] + y_lo * width + x_lo + (gt_ids // num_gts) * num_anchors
    col_base = level * grid.col_x0.shape[1] + x_lo
    row_base = level * grid.row_y0.shape[1] + y_lo
    rows = [first, width, nx, col_base, row_base, gt_ids]
    return torch.stack([counts.cumsum(0) - counts] + [r.reshape(-1) for r in rows]).to(torch.int32)


def _take(table: Tensor, index: Tensor) -> list[Tensor]:
    """``[row[index] for row in table]`` for ``table [K, S]``: K contiguous ``[P]`` tensors."""
    return [row.index_select(0, index) for row in table]


def pair_iou(boxes: Sequence[Tensor], anchors: Sequence[Tensor], eps: float) -> Tensor:
    """IoU of ``P`` aligned pairs, each box given as its four ``[P]`` coordinates (x0, y0, x1, y1): ``[P]``.

    :func:`paadet.boxes.bbox_overlaps` operation for operation, each axis on its own contiguous
    tensor, so the same bits (IEEE operations are correctly rounded, whatever the layout).
    """
    area1 = (boxes[2] - boxes[0]) * (boxes[3] - boxes[1])
    area2 = (anchors[2] - anchors[0]) * (anchors[3] - anchors[1])
    width = (torch.minimum(boxes[2], anchors[2]) - torch.maximum(boxes[0], anchors[0])).clamp(min=0)
    height = (torch.minimum(boxes[3], anchors[3]) - torch.maximum(boxes[1], anchors[1])).clamp(min=0)
    overlap = width * height
    union = area1 + area2 - overlap
    union = torch.maximum(union, union.new_tensor(eps))
    return overlap / union


def _unusable(boxes: Tensor, gt_mask: Tensor) -> Tensor:
    """0-dim bool: some real GT of ``boxes [B, M, 4]`` has a non-finite coordinate or area, or a ``-0.0``
    right or bottom edge (the one way a non-overlapping pair's dense IoU is ``-0.0``: see the module
    docstring)."""
    area = (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])
    odd = ~torch.isfinite(boxes).all(-1) | _is_negative_zero(boxes[..., 2:]).any(-1) | ~torch.isfinite(area)
    return (odd & gt_mask).any()


def candidate_pairs(
    grid: AnchorGrid,
    anchors: Tensor,
    boxes: Tensor,
    gt_mask: Tensor,
    anchor_valid: Tensor,
    eps: float,
    max_density: float = 1.0,
) -> PairOverlaps | None:
    """The (real GT, anchor) pairs of a batch's windows, with their IoUs.

    A GT's windows hold the anchors whose right edge is past the GT's left edge and left edge before
    its right edge, and so in y: every anchor with a positive intersection (for a GT of positive width
    and height, exactly those), so every non-zero IoU.

    Args:
        grid: the anchors' grid (:meth:`AnchorGrid.from_anchors`); the pairs' anchor coordinates are
            read from it (the same values).
        anchors: ``[A, 4]`` xyxy float32, those of the grid.
        boxes: ``[B, M, 4]`` xyxy float32 padded GTs; gt_mask: ``[B, M]`` bool, the real ones.
        anchor_valid: ``[B, A]`` bool.
        eps: the union clamp of the IoU.
        max_density: use the pairs only if ``P <= max_density * B * M * A``.

    Returns:
        the pairs, or None when the dense computation must be used (see the module docstring).
        One host sync.
    """
    batch, num_gts = gt_mask.shape
    num_anchors = anchors.shape[0]
    if num_anchors != grid.num_anchors:
        raise PaadetError(f"{num_anchors} anchors for a grid of {grid.num_anchors}")
    if (
        not grid.exact
        or anchors.dtype != torch.float32
        or boxes.dtype != torch.float32
        or batch * max(num_gts, num_anchors) > INT32_MAX
    ):
        return None
    flat_boxes = boxes.reshape(-1, 4)
    x_lo, nx, y_lo, ny = _windows(grid, flat_boxes)
    counts = torch.where(gt_mask.reshape(1, -1), nx * ny, 0).reshape(-1)  # [L * N] pairs of each window
    num_pairs = int(torch.where(_unusable(boxes, gt_mask), -1, counts.sum()))  # the host sync
    if num_pairs < 0 or num_pairs > max_density * batch * num_gts * num_anchors or num_pairs > INT32_MAX:
        return None
    segment = torch.repeat_interleave(counts, output_size=num_pairs)
    table = _segment_table(grid, x_lo, nx, y_lo, counts, num_gts, num_anchors)
    start, first, width, cols, col_base, row_base, gt = _take(table, segment)
    local = torch.arange(num_pairs, dtype=torch.int32, device=boxes.device) - start
    row = torch.div(local, cols, rounding_mode="trunc")  # the pair's row and column in its window
    col = local - row * cols
    anchor = (first + row * width + col).long()
    x0, x1 = _take(grid.col_edges, col_base + col)
    y0, y1 = _take(grid.row_edges, row_base + row)
    gt = gt.long()
    iou = pair_iou(_take(flat_boxes.T.contiguous(), gt), (x0, y0, x1, y1), eps)
    iou = torch.where(anchor_valid.reshape(-1).index_select(0, anchor), iou, -1.0)
    return PairOverlaps(gt, anchor, iou, batch, num_gts, num_anchors)


def _keys(iou: Tensor, low: Tensor) -> Tensor:
    """int64 ``bits(iou) * 2**32 + low`` of float32 ``iou`` and ``0 <= low < 2**32``: ordered as
    ``(iou, low)`` where ``iou >= 0`` (non-negative floats order as their bits), negative where ``iou < 0``."""
    return iou.view(torch.int32).to(torch.int64) * (1 << LOW_BITS) + low


def _key_iou(keys: Tensor) -> Tensor:
    """The float32 IoU of :func:`_keys` (the shift floors, so negative keys decode too)."""
    return (keys >> LOW_BITS).to(torch.int32).view(torch.float32)


def anchor_max(pairs: PairOverlaps, first_gt: Tensor) -> tuple[Tensor, Tensor]:
    """Each anchor's max IoU over the image's real GTs and the first GT reaching it: ``[B, A]`` each.

    Args:
        first_gt: ``[B]`` int64 the image's first real GT (its IoU-0 argmax; any value without GT).

    Valid anchors of images with a GT get the dense ``overlaps.max(dim=1)`` (ties: the first GT);
    the others get 0 and ``first_gt`` (the caller masks them).
    """
    batch, num_gts, num_anchors = pairs.batch, pairs.num_gts, pairs.num_anchors
    last_gt = batch * num_gts - 1  # low bits: last_gt - gt, the first GT wins the amax
    image_gt = torch.arange(batch, device=first_gt.device) * num_gts + first_gt
    init = (last_gt - image_gt)[:, None].expand(batch, num_anchors).reshape(-1)
    keys = init.scatter_reduce(0, pairs.anchor, _keys(pairs.iou, last_gt - pairs.gt), reduce="amax")
    image_base = torch.arange(batch, device=first_gt.device)[:, None] * num_gts
    argmax = (last_gt - (keys & LOW_MASK)).reshape(batch, num_anchors) - image_base
    return _key_iou(keys).reshape(batch, num_anchors), argmax


def gt_max(pairs: PairOverlaps, anchor_valid: Tensor) -> tuple[Tensor, Tensor]:
    """Each GT's max IoU over the image's valid anchors and the first anchor reaching it: ``[B, M]`` each.

    The dense ``overlaps.max(dim=2)`` with invalid anchors at -1: 0 and the image's first valid anchor
    for a GT that strictly overlaps no valid anchor, -1 and anchor 0 in an image without valid anchor.
    """
    batch, num_gts, num_anchors = pairs.batch, pairs.num_gts, pairs.num_anchors
    device = anchor_valid.device
    last_anchor = batch * num_anchors - 1  # low bits: last_anchor - anchor, the first anchor wins
    image_base = torch.arange(batch, device=device) * num_anchors
    first_valid = anchor_valid.to(torch.uint8).argmax(dim=1)
    empty_iou = anchor_valid.any(dim=1).to(torch.float32) - 1  # 0, or -1 without valid anchor
    init = _keys(empty_iou, last_anchor - image_base - first_valid)
    init = init[:, None].expand(batch, num_gts).reshape(-1)
    keys = init.scatter_reduce(0, pairs.gt, _keys(pairs.iou, last_anchor - pairs.anchor), reduce="amax")
    argmax = (last_anchor - (keys & LOW_MASK)).reshape(batch, num_gts) - image_base[:, None]
    return _key_iou(keys).reshape(batch, num_gts), argmax


def last_matching_gt(pairs: PairOverlaps, best: Tensor, zero_ok: Tensor) -> Tensor:
    """mmdetection's low-quality match with ``gt_max_assign_all``: ``[B, A]`` int64, ``i + 1`` of the last
    GT ``i`` whose IoU with the anchor equals ``best[b, i]``, 0 if none.

    Args:
        best: ``[B, M]`` each GT's best IoU where it takes part and is positive, else a value no IoU
            reaches (e.g. 2).
        zero_ok: ``[B, M]`` bool, the GTs that take part with a best IoU of 0: each has IoU 0 with every
            valid anchor of its image, so it matches them all.
    """
    batch, num_gts, num_anchors = pairs.batch, pairs.num_gts, pairs.num_anchors
    image_base = torch.arange(batch, device=best.device)[:, None] * num_gts
    flat_order = image_base + torch.arange(1, num_gts + 1, device=best.device)  # flat GT index + 1
    matched = torch.where(pairs.iou == best.reshape(-1).index_select(0, pairs.gt), pairs.gt + 1, 0)
    init = torch.where(zero_ok, flat_order, 0).amax(dim=1)[:, None].expand(batch, num_anchors).reshape(-1)
    last = init.scatter_reduce(0, pairs.anchor, matched, reduce="amax").reshape(batch, num_anchors)
    return torch.where(last > 0, last - image_base, 0)
