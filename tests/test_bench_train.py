"""``benchmarks/bench_train.py``'s paadet side on small inputs: its counting of host syncs and operator
calls per batch, which must stay bounded whatever the number of boxes, and its check of that bound, which
must catch a loss that syncs once per box. mmdetection is not needed (nor imported).
"""

from __future__ import annotations

import functools
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from paadet.train.loss import PAALoss

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_train.py"
SHAPES = ((96, 128), (64, 96))  # a batch of 2 small images of different sizes (the second has invalid anchors)
NUM_CLASSES = 3


@functools.cache
def bench():
    """The benchmark script, imported as a module from its file."""
    spec = importlib.util.spec_from_file_location("bench_train", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@functools.cache
def net():
    return bench().seeded_net(NUM_CLASSES)


@functools.cache
def case_and_outputs(num_boxes: int):
    case = bench().make_case(num_boxes, SHAPES, num_classes=NUM_CLASSES)
    return case, bench().head_outputs(net(), case)


def works(loss_fn: PAALoss, box_counts=(1, 8, 50)):
    """The benchmark's counts for one batch at each number of boxes per image, and the positives found."""
    out, positives = {}, {}
    for n in box_counts:
        case, outputs = case_and_outputs(n)
        out[n] = bench().count_paadet_work(loss_fn, outputs, case)
        positives[n] = int(bench().paadet_loss_call(loss_fn, outputs, case)().num_pos.sum())
    return out, positives


def test_host_syncs_per_batch_do_not_grow_with_the_number_of_boxes():
    counted, positives = works(PAALoss())
    assert positives[50] > positives[1] > 0  # the cases really have more positives with more boxes
    # the two gathers of positives at every number of boxes; the rest are the GMM's bounded checks
    assert {n: w.sync_ops.get("aten::nonzero", 0) for n, w in counted.items()} == {1: 2, 8: 2, 50: 2}
    assert all(2 < w.syncs <= bench().SYNC_BOUND for w in counted.values()), {n: w.syncs for n, w in counted.items()}
    assert bench().syncs_bounded(counted)
    assert all(w.ops > 0 and w.kernels is None for w in counted.values())


class SyncPerBox(PAALoss):
    """A loss that reads every box back to the host once: the kind of code the check must catch."""

    def __call__(self, cls_logits, box_deltas, iou_logits, gt_boxes, gt_labels, pad_shapes):
        for boxes in gt_boxes:
            for box in boxes:
                float(box[0])
        return super().__call__(cls_logits, box_deltas, iou_logits, gt_boxes, gt_labels, pad_shapes)


def test_the_check_catches_syncs_that_grow_with_the_boxes():
    counted, _ = works(SyncPerBox(), box_counts=(1, 50))
    assert counted[50].syncs >= 2 * 50 > counted[1].syncs + 2 * 1
    assert counted[50].sync_ops["aten::_local_scalar_dense"] >= 100
    assert not bench().syncs_bounded(counted)


def test_losses_are_compared_by_their_max_relative_difference():
    a = {"loss_cls": 1.0, "loss_bbox": 2.0, "loss_iou": 0.5}
    assert bench().max_rel_diff(a, a) == 0.0
    assert bench().max_rel_diff({**a, "loss_iou": 0.51}, a) == pytest.approx(0.02)


def test_without_mmdetection_it_says_so_in_one_line(capsys, monkeypatch):
    monkeypatch.setattr(bench(), "mmdet_available", lambda: False)
    assert bench().main(["--part", "loss"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--paadet-only" in err[0] and "mmdetection" in err[0]
