"""count_device_work, and the post-processing's device work: a fixed number of operator calls and
host syncs per batch, whatever the batch size and the number of classes (what makes it fast on a GPU)."""

from __future__ import annotations

import torch
from test_nms import random_candidates

from paadet.bench.profiling import count_device_work
from paadet.postprocess import PostprocessConfig, multiclass_nms


def test_counts_syncs_and_ops():
    x = torch.arange(12.0).reshape(3, 4)

    def fn() -> None:
        y = (x * 2 + 1).sum()
        float(y)  # one sync
        (x > 5).nonzero()  # another
        torch.equal(x, x)  # and a third

    work = count_device_work(fn)
    assert work.syncs == 3
    assert work.sync_ops == {"aten::_local_scalar_dense": 1, "aten::nonzero": 1, "aten::equal": 1}
    assert work.ops >= 4  # mul, add, sum, gt at least
    assert work.kernels is None  # CPU


def test_views_are_not_counted_as_work():
    x = torch.arange(12.0)
    work = count_device_work(lambda: x.view(3, 4).t()[1:3].unsqueeze(0).expand(2, -1, -1))
    assert work.ops == 0 and work.syncs == 0
    # a reshape that must copy is work
    assert count_device_work(lambda: x.view(3, 4).t().reshape(-1)).top_ops == [("aten::copy_", 1)]


def test_postprocess_work_does_not_grow_with_batch_or_classes():
    """One image with 4 classes, 8 images with 4 classes, 8 images with 80 classes: the same few
    syncs and about the same number of operator calls (the old per-bucket NMS made 100+ syncs)."""
    results = {}
    for batch, classes in [(1, 4), (8, 4), (8, 80)]:
        cand = random_candidates(batch=batch, anchors=400, classes=classes, seed=3)
        dets = multiclass_nms(cand, PostprocessConfig())
        assert int(dets.num_dets.min()) > 0
        results[batch, classes] = count_device_work(lambda cand=cand: multiclass_nms(cand, PostprocessConfig()))
    for work in results.values():
        assert work.syncs <= 10, work.sync_ops
        assert work.ops <= 250
    ops = [w.ops for w in results.values()]
    assert max(ops) <= 1.2 * min(ops)
