"""Training speed on the CPU: PAA's losses alone (targets, GMM reassignment, losses) and a whole training
iteration, paadet against mmdetection 3.3 on the same tensors, in the same process.

Run it in the reference environment, where mmdetection 3.3, scikit-learn and paadet (editable) are
installed together (mmdetection is never a dependency of paadet; see ../shared/wheels/README.md):

    /tmp/mmref/bin/python benchmarks/bench_train.py --threads 2 --json train.json
    python benchmarks/bench_train.py --paadet-only          # any paadet environment, paadet alone

Both parts use a batch of 2 generated images (:func:`paadet.data.synthetic.synthetic_image` with a filled
rectangle painted under each ground-truth box), 800x1333 and 800x1066, padded to the batch shape
800x1344 as mmdetection's data preprocessor pads them (each image keeps its own ``pad_shape``, so the
second has invalid anchors), 80 classes, and the seeded weights of :func:`paadet.model.seeded.train_state_dict`
(mmdetection's classification prior), which both implementations load with ``strict=True``.

``loss`` (part a): the head outputs of one forward pass (no grad) become leaf tensors that require
grad, as in training, and both sides compute the three losses from them: paadet's
:class:`~paadet.train.loss.PAALoss` and mmdetection's ``PAAHead.loss_by_feat`` (anchors, MaxIoUAssigner
targets, PAA scores, scikit-learn GMM per ground truth, losses). No backward. At 1, 8 and 50 boxes per
image; each timed call alternates between the two sides (so a change of machine load hits both); the
figure is the median after ``--warmup``. paadet's operator calls and host syncs of one call are counted by
:func:`paadet.bench.profiling.count_device_work` (mmdetection's too; its scikit-learn work is NumPy, invisible
to the profiler). The losses of the two sides are compared (max relative difference). The
assignment alone is timed too: :meth:`PAALoss.targets` against the first half of ``loss_by_feat``
(anchors, ``get_targets``, ``get_pos_loss``, ``paa_reassign``, mmdetection's own methods called as
``loss_by_feat`` calls them), without the final focal, GIoU and IoU losses over all anchors, which are
the same arithmetic on both sides; the positives after reassignment are compared.

``train`` (part b): one SGD step (lr 0.01, momentum 0.9, weight decay 1e-4 over the parameters that
take gradients) on the same batch: network forward in train mode (``frozen_stages=1``, ``norm_eval``),
losses, backward, step. mmdetection's side is its own model built from
``configs/paa/paa_r50_fpn_1x_coco.py`` (no pretrained backbone; the seeded weights loaded) running what
``SingleStageDetector.loss`` runs (``extract_feat``, ``bbox_head`` forward, ``loss_by_feat``), then
``parse_losses``, ``backward`` and the step; paadet's side is what ``paadet train`` runs per step (the
network, :class:`PAALoss`, the loss values copied to the host, backward, step). Data loading and
preprocessing are left out of both. Each section is timed, so the table says where the time goes;
``--profile N`` also lists the N operators with the most self CPU time of one iteration of each side.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import math
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from paadet.bench.profiling import DeviceWork, count_device_work
from paadet.bench.run import hardware_info, versions
from paadet.data.synthetic import synthetic_image
from paadet.fileio import atomic_write_json
from paadet.model import PAANet
from paadet.model.seeded import train_state_dict
from paadet.preprocess import normalize_pad
from paadet.train import gmm
from paadet.train.init import trainable_parameters
from paadet.train.loss import LossOutput, PAALoss

IMAGE_SHAPES: tuple[tuple[int, int], ...] = ((800, 1333), (800, 1066))
BOX_COUNTS: tuple[int, ...] = (1, 8, 50)
NUM_CLASSES = 80
LOSS_NAMES = ("loss_cls", "loss_bbox", "loss_iou")
SGD_SETTINGS = {"lr": 0.01, "momentum": 0.9, "weight_decay": 1e-4}
# paadet's documented bound on the host syncs of one PAALoss call, whatever the number of images and
# boxes: 3 (the sparse assigner's pair count, nonzero of the pre-assigned and of the final positives)
# + the GMM's iteration checks + 1 in gmm_positives (+ 1 spare for exact score ties).
SYNC_BOUND = 3 + (math.ceil(100 / gmm.SYNC_EVERY) + 1) + 1 + 1

HeadOutputs = tuple[list[Tensor], list[Tensor], list[Tensor]]


def pad32(n: int) -> int:
    """``n`` rounded up to a multiple of 32 (mmdetection's ``size_divisor``)."""
    return -(-n // 32) * 32


@dataclass
class Case:
    """A generated batch: normalised images padded to the batch shape and each image's ground truths."""

    num_boxes: int
    images: Tensor  # [B, 3, H, W] float32
    gt_boxes: list[Tensor]  # per image [M, 4] xyxy float32, network-input pixels
    gt_labels: list[Tensor]  # per image [M] int64
    img_shapes: list[tuple[int, int]]
    pad_shapes: list[tuple[int, int]]


def make_case(
    num_boxes: int,
    image_shapes: tuple[tuple[int, int], ...] = IMAGE_SHAPES,
    num_classes: int = NUM_CLASSES,
    seed: int = 0,
) -> Case:
    """``num_boxes`` random boxes per image (sides log-uniform from 12 px to 60% of the shorter side), each
    painted as a filled rectangle of a random colour onto a :func:`synthetic_image`; seeded."""
    rng = np.random.default_rng(seed * 1000 + num_boxes)
    batch_shape = (max(pad32(h) for h, _ in image_shapes), max(pad32(w) for _, w in image_shapes))
    images, boxes, labels = [], [], []
    for k, (h, w) in enumerate(image_shapes):
        img = synthetic_image(h, w, seed=seed * 100 + k + 1)
        sides = np.exp(rng.uniform(math.log(12), math.log(0.6 * min(h, w)), (num_boxes, 2)))
        x0 = rng.uniform(0, w - sides[:, 0])
        y0 = rng.uniform(0, h - sides[:, 1])
        xyxy = np.stack([x0, y0, x0 + sides[:, 0], y0 + sides[:, 1]], 1).astype(np.float32)
        for bx0, by0, bx1, by1 in xyxy:
            img[int(by0) : math.ceil(by1), int(bx0) : math.ceil(bx1)] = rng.integers(0, 256, 3, dtype=np.uint8)
        images.append(normalize_pad(img, batch_shape))
        boxes.append(torch.from_numpy(xyxy))
        labels.append(torch.from_numpy(rng.integers(0, num_classes, num_boxes)).long())
    return Case(
        num_boxes,
        torch.stack(images),
        boxes,
        labels,
        list(image_shapes),
        [(pad32(h), pad32(w)) for h, w in image_shapes],
    )


def seeded_net(num_classes: int = NUM_CLASSES, seed: int = 0, trainable: bool = False) -> PAANet:
    """paadet's network with :func:`train_state_dict` weights (``trainable``: the recipe's frozen stem and
    ``layer1``, BatchNorm in eval mode, ready for ``train()``)."""
    net = PAANet(num_classes=num_classes, trainable=trainable, frozen_stages=1, norm_eval=True)
    net.load_state_dict(train_state_dict(seed, num_classes=num_classes), strict=True)
    return net


def head_outputs(net: PAANet, case: Case) -> HeadOutputs:
    """The network's outputs for the case's images, as leaf tensors that require grad (as in training)."""
    with torch.no_grad():
        outs = net.eval()(case.images)
    return tuple([t.detach().clone().requires_grad_() for t in level] for level in outs)  # type: ignore[return-value]


def paadet_loss_call(loss_fn: PAALoss, outputs: HeadOutputs, case: Case) -> Callable[[], LossOutput]:
    """The timed paadet call: the three losses of the batch from the head outputs."""
    cls, box, iou = outputs
    return lambda: loss_fn(cls, box, iou, case.gt_boxes, case.gt_labels, case.pad_shapes)


def paadet_assign_call(loss_fn: PAALoss, outputs: HeadOutputs, case: Case) -> Callable[[], Tensor]:
    """paadet's assignment alone (:meth:`PAALoss.targets`: anchors, MaxIoUAssigner, PAA scores, GMM
    reassignment), without the final losses; the call returns ``num_pos`` [B]."""
    cls, box, iou = outputs
    return lambda: loss_fn.targets(cls, box, iou, case.gt_boxes, case.gt_labels, case.pad_shapes).num_pos


def count_paadet_work(loss_fn: PAALoss, outputs: HeadOutputs, case: Case) -> DeviceWork:
    """Operator calls and host syncs of one paadet loss call (after one call that warms the anchor cache)."""
    call = paadet_loss_call(loss_fn, outputs, case)
    call()
    return count_device_work(call)


def syncs_bounded(works: dict[int, DeviceWork], bound: int = SYNC_BOUND) -> bool:
    """True when every count of host syncs stays within ``bound``, a constant that does not depend on
    the number of boxes (paadet's documented bound: :data:`SYNC_BOUND`)."""
    return all(work.syncs <= bound for work in works.values())


def loss_values(losses: Any) -> dict[str, float]:
    """``loss_cls``, ``loss_bbox``, ``loss_iou`` as floats, from a :class:`LossOutput` or mmdetection's dict."""
    get = losses.__getitem__ if isinstance(losses, dict) else lambda k: getattr(losses, k)
    return {k: float(torch.as_tensor(get(k)).detach()) for k in LOSS_NAMES}


def max_rel_diff(a: dict[str, float], b: dict[str, float]) -> float:
    """Max over the three losses of ``|a - b| / |b|``."""
    return max(abs(a[k] - b[k]) / max(abs(b[k]), 1e-12) for k in LOSS_NAMES)


def interleaved_seconds(calls: dict[str, Callable[[], Any]], warmup: int, iters: int) -> dict[str, list[float]]:
    """Wall times (s) of each call, the calls alternating: ``warmup`` untimed rounds, then ``iters`` timed."""
    for _ in range(warmup):
        for call in calls.values():
            call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(iters):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    return times


# ---------------------------------------------------------------- mmdetection's side


def mmdet_available() -> bool:
    """Whether mmdetection (and scikit-learn, which its PAA head needs) can be imported here."""
    return all(importlib.util.find_spec(m) is not None for m in ("mmdet", "mmengine", "sklearn"))


class MMDetPAA:
    """mmdetection 3.3's PAA R50-FPN, built from its own config with the seeded weights (strict)."""

    def __init__(self, num_classes: int = NUM_CLASSES, seed: int = 0) -> None:
        import mmdet
        from mmdet.registry import MODELS
        from mmdet.utils import register_all_modules
        from mmengine.config import Config

        register_all_modules()
        cfg = Config.fromfile(os.path.join(os.path.dirname(mmdet.__file__), ".mim/configs/paa/paa_r50_fpn_1x_coco.py"))
        cfg.model.bbox_head.num_classes = num_classes
        cfg.model.backbone.init_cfg = None
        assert cfg.model.backbone.frozen_stages == 1 and cfg.model.backbone.norm_eval, "the recipe has changed"
        self.model = MODELS.build(cfg.model)
        self.model.load_state_dict(train_state_dict(seed, num_classes=num_classes), strict=True)
        self.head = self.model.bbox_head

    @staticmethod
    def data_samples(case: Case) -> list[Any]:
        """One ``DetDataSample`` per image: the ground truths and the metainfo the data preprocessor sets."""
        from mmdet.structures import DetDataSample
        from mmengine.structures import InstanceData

        batch_shape = tuple(case.images.shape[-2:])
        samples = []
        for boxes, labels, img_shape, pad_shape in zip(
            case.gt_boxes, case.gt_labels, case.img_shapes, case.pad_shapes, strict=False
        ):
            sample = DetDataSample(
                metainfo={
                    "img_shape": img_shape,
                    "pad_shape": pad_shape,
                    "ori_shape": img_shape,
                    "batch_input_shape": batch_shape,
                    "scale_factor": (1.0, 1.0),
                }
            )
            sample.gt_instances = InstanceData(bboxes=boxes.clone(), labels=labels.clone())
            samples.append(sample)
        return samples

    def loss_call(self, outputs: HeadOutputs, case: Case) -> Callable[[], dict]:
        """The timed mmdetection call: ``PAAHead.loss_by_feat`` on the same head outputs."""
        from mmdet.models.utils import unpack_gt_instances

        gts, ignored, metas = unpack_gt_instances(self.data_samples(case))
        cls, box, iou = outputs
        return lambda: self.head.loss_by_feat(cls, box, iou, gts, metas, ignored)

    def assign_call(self, outputs: HeadOutputs, case: Case) -> Callable[[], Tensor]:
        """The first part of ``loss_by_feat``, line for line: anchors, ``get_targets``, ``get_pos_loss`` and
        ``paa_reassign`` (the PAA assignment, without the final losses); the call returns ``num_pos`` [B]."""
        from mmdet.models.utils import levels_to_images, multi_apply, unpack_gt_instances

        head = self.head
        gts, ignored, metas = unpack_gt_instances(self.data_samples(case))
        cls, box, _ = outputs

        def call() -> Tensor:
            anchor_list, valid_flag_list = head.get_anchors([c.size()[-2:] for c in cls], metas, device=cls[0].device)
            labels, labels_weight, bboxes_target, bboxes_weight, pos_inds, pos_gt_index = head.get_targets(
                anchor_list, valid_flag_list, gts, metas, batch_gt_instances_ignore=ignored
            )
            cls_scores = [item.reshape(-1, head.cls_out_channels) for item in levels_to_images(cls)]
            bbox_preds = [item.reshape(-1, 4) for item in levels_to_images(box)]
            (pos_losses_list,) = multi_apply(
                head.get_pos_loss,
                anchor_list,
                cls_scores,
                bbox_preds,
                labels,
                labels_weight,
                bboxes_target,
                bboxes_weight,
                pos_inds,
            )
            with torch.no_grad():
                *_, num_pos = multi_apply(
                    head.paa_reassign,
                    pos_losses_list,
                    labels,
                    labels_weight,
                    bboxes_weight,
                    pos_inds,
                    pos_gt_index,
                    anchor_list,
                )
            return torch.tensor([int(n) for n in num_pos])

        return call


# ---------------------------------------------------------------- part (a): the losses alone


def bench_loss(
    threads: int,
    warmup: int,
    iters: int,
    with_mmdet: bool,
    box_counts: tuple[int, ...] = BOX_COUNTS,
    num_classes: int = NUM_CLASSES,
) -> dict[str, Any]:
    """Part (a): paadet's PAALoss (and mmdetection's loss_by_feat) at each number of boxes per image."""
    net = seeded_net(num_classes)
    mm = MMDetPAA(num_classes) if with_mmdet else None
    loss_fn = PAALoss()
    rows, works = [], {}
    prepared = []
    for n in box_counts:
        case = make_case(n, num_classes=num_classes)
        outputs = head_outputs(net, case)
        calls: dict[str, Callable[[], Any]] = {
            "paadet": paadet_loss_call(loss_fn, outputs, case),
            "paadet_assign": paadet_assign_call(loss_fn, outputs, case),
        }
        if mm is not None:
            calls["mmdet"] = mm.loss_call(outputs, case)
            calls["mmdet_assign"] = mm.assign_call(outputs, case)
        prepared.append((n, case, outputs, calls))
    # every call of every case once before any timing: the first large allocations of a process are slow
    # (the allocator's thresholds adapt), which would otherwise penalise whichever case is timed first
    results_of = [{name: call() for name, call in calls.items()} for *_, calls in prepared]
    for (n, case, outputs, calls), results in zip(prepared, results_of, strict=False):
        times = interleaved_seconds(calls, warmup, iters)
        work = works[n] = count_paadet_work(loss_fn, outputs, case)
        row: dict[str, Any] = {
            "boxes_per_image": n,
            "paadet_ms": 1e3 * statistics.median(times["paadet"]),
            "paadet_ms_all": [1e3 * t for t in times["paadet"]],
            "paadet_work": work.as_dict(),
            "paadet_losses": loss_values(results["paadet"]),
            "num_pos": results["paadet"].num_pos.tolist(),
            "num_ill_defined": results["paadet"].num_ill_defined.tolist(),
            "paadet_assign_ms": 1e3 * statistics.median(times["paadet_assign"]),
        }
        if mm is not None:
            row.update(
                mmdet_ms=1e3 * statistics.median(times["mmdet"]),
                mmdet_ms_all=[1e3 * t for t in times["mmdet"]],
                mmdet_losses=loss_values(results["mmdet"]),
                mmdet_work=count_device_work(calls["mmdet"]).as_dict(),
            )
            row["ratio"] = row["mmdet_ms"] / row["paadet_ms"]
            row["mmdet_assign_ms"] = 1e3 * statistics.median(times["mmdet_assign"])
            row["assign_ratio"] = row["mmdet_assign_ms"] / row["paadet_assign_ms"]
            row["mmdet_num_pos"] = results["mmdet_assign"].tolist()
            row["max_rel_diff"] = max_rel_diff(row["paadet_losses"], row["mmdet_losses"])
        rows.append(row)
        print(
            f"  loss, {n:2d} boxes/image: paadet {row['paadet_ms']:8.1f} ms"
            + (f", mmdet {row['mmdet_ms']:8.1f} ms" if mm is not None else ""),
            file=sys.stderr,
            flush=True,
        )
    return {
        "what": "PAA targets + GMM reassignment + losses from the head outputs (leaf tensors with grad), no "
        "backward; paadet PAALoss vs mmdetection PAAHead.loss_by_feat, calls alternating; assignment only: "
        "PAALoss.targets vs loss_by_feat's anchors, get_targets, get_pos_loss, paa_reassign",
        "batch": len(IMAGE_SHAPES),
        "image_shapes": [list(s) for s in IMAGE_SHAPES],
        "batch_input_shape": list(prepared[0][1].images.shape[-2:]) if prepared else None,
        "num_classes": num_classes,
        "warmup": warmup,
        "iters": iters,
        "threads": threads,
        "sync_bound": SYNC_BOUND,
        "syncs_bounded": syncs_bounded(works),
        "rows": rows,
    }


# ---------------------------------------------------------------- part (b): a whole iteration


class SectionTimer:
    """Wall time per named section of one iteration (s)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        with torch.profiler.record_function(name):
            yield
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


CHANNELS_LAST_SIDE = "paadet channels-last"


def paadet_step(
    case: Case, seed: int = 0, num_classes: int = NUM_CLASSES, channels_last: bool = False
) -> tuple[Callable[[], dict], list]:
    """paadet's training step on ``case``: returns the step (it returns the losses and section times) and a
    list that collects the losses of every call. ``channels_last``: the network's weights and the input
    batch in channels-last memory format (``paadet train --channels-last``)."""
    net = seeded_net(num_classes, seed, trainable=True).train()
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    loss_fn = PAALoss()
    optimizer = torch.optim.SGD(trainable_parameters(net), **SGD_SETTINGS)
    history: list = []

    def step() -> dict:
        timer = SectionTimer()
        with timer("forward"):  # the batch converted in the step, as `paadet train` does
            images = case.images.contiguous(memory_format=torch.channels_last) if channels_last else case.images
            cls, box, iou = net(images)
        with timer("loss"):
            out = loss_fn(cls, box, iou, case.gt_boxes, case.gt_labels, case.pad_shapes)
            parts = (
                torch.stack([out.loss.detach(), out.loss_cls.detach(), out.loss_bbox.detach(), out.loss_iou.detach()])
                .double()
                .cpu()
            )
            out.num_pos.cpu()
        with timer("backward"):
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
        with timer("sgd_step"):
            optimizer.step()
        history.append(dict(zip(LOSS_NAMES, parts[1:].tolist(), strict=False)))
        return timer.seconds

    return step, history


def mmdet_step(case: Case, seed: int = 0, num_classes: int = NUM_CLASSES) -> tuple[Callable[[], dict], list]:
    """mmdetection's training step on ``case`` (``SingleStageDetector.loss``'s calls, ``parse_losses``,
    backward, SGD step); returns the step and the list of losses, as :func:`paadet_step`."""
    from mmdet.models.utils import unpack_gt_instances

    mm = MMDetPAA(num_classes, seed)
    model = mm.model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], **SGD_SETTINGS)
    samples = mm.data_samples(case)
    history: list = []

    def step() -> dict:
        timer = SectionTimer()
        with timer("forward"):
            outs = model.bbox_head(model.extract_feat(case.images))
        with timer("loss"):
            gts, ignored, metas = unpack_gt_instances(samples)
            losses = model.bbox_head.loss_by_feat(*outs, gts, metas, ignored)
            loss, log_vars = model.parse_losses(losses)
        with timer("backward"):
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
        with timer("sgd_step"):
            optimizer.step()
        history.append(loss_values(log_vars))
        return timer.seconds

    return step, history


def top_ops(step: Callable[[], Any], rows: int) -> list[list]:
    """The ``rows`` operators with the most self CPU time in one call of ``step``: [name, ms, calls]."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    averages = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    return [[e.key, e.self_cpu_time_total / 1e3, e.count] for e in averages[:rows]]


def bench_train(
    threads: int,
    warmup: int,
    iters: int,
    with_mmdet: bool,
    boxes: int,
    profile_rows: int,
    num_classes: int = NUM_CLASSES,
    channels_last: bool = False,
) -> dict[str, Any]:
    """Part (b): whole training iterations of both sides, alternating, on the same batch (``channels_last``:
    a third side, paadet with its network in channels-last memory format)."""
    case = make_case(boxes, num_classes=num_classes)
    sides = {"paadet": paadet_step(case, num_classes=num_classes)}
    if channels_last:
        sides[CHANNELS_LAST_SIDE] = paadet_step(case, num_classes=num_classes, channels_last=True)
    if with_mmdet:
        sides["mmdet"] = mmdet_step(case, num_classes=num_classes)
    sections: dict[str, list[dict]] = {name: [] for name in sides}
    totals: dict[str, list[float]] = {name: [] for name in sides}
    for k in range(warmup + iters):
        for name, (step, _) in sides.items():
            start = time.perf_counter()
            seconds = step()
            total = time.perf_counter() - start
            print(
                f"  train iteration {k + 1}/{warmup + iters} ({'warm-up' if k < warmup else 'timed'}), "
                f"{name}: {total:.2f} s",
                file=sys.stderr,
                flush=True,
            )
            if k >= warmup:
                totals[name].append(total)
                sections[name].append(seconds)
    result: dict[str, Any] = {
        "what": "one SGD step: forward (train mode, frozen_stages=1, norm_eval), losses, backward, step; "
        "data loading and preprocessing excluded; sides alternating",
        "batch": len(IMAGE_SHAPES),
        "image_shapes": [list(s) for s in IMAGE_SHAPES],
        "batch_input_shape": list(case.images.shape[-2:]),
        "boxes_per_image": boxes,
        "num_classes": num_classes,
        "sgd": SGD_SETTINGS,
        "warmup": warmup,
        "iters": iters,
        "threads": threads,
    }
    for name, (_step, history) in sides.items():
        result[name] = {
            "s_per_iter": statistics.median(totals[name]),
            "s_all": totals[name],
            "sections_s": {sec: statistics.median(s[sec] for s in sections[name]) for sec in sections[name][0]},
            "first_losses": history[0],
        }
    if channels_last:
        result["channels_last_speedup"] = result["paadet"]["s_per_iter"] / result[CHANNELS_LAST_SIDE]["s_per_iter"]
    if with_mmdet:
        result["ratio"] = result["mmdet"]["s_per_iter"] / result["paadet"]["s_per_iter"]
        result["first_iteration_max_rel_diff"] = max_rel_diff(
            result["paadet"]["first_losses"], result["mmdet"]["first_losses"]
        )
        if channels_last:
            result["ratio_channels_last"] = result["mmdet"]["s_per_iter"] / result[CHANNELS_LAST_SIDE]["s_per_iter"]
            result["channels_last_max_rel_diff"] = max_rel_diff(
                result[CHANNELS_LAST_SIDE]["first_losses"], result["mmdet"]["first_losses"]
            )
    if profile_rows:
        for name, (step, _) in sides.items():
            result[name]["top_ops"] = top_ops(step, profile_rows)
    return result


# ---------------------------------------------------------------- the report


def print_report(result: dict[str, Any]) -> None:
    """The results tables, on stdout."""
    threads, load = result["hardware"]["torch_threads"], result["loadavg_start"]
    print(
        f"torch threads {threads}, load average at start {load[0]:.2f} ({result['hardware']['cpu_cores_usable']} "
        f"usable cores)"
    )
    if "loss" in result:
        part = result["loss"]
        with_mm = "mmdet_ms" in part["rows"][0]
        print(
            f"\n(a) PAA losses alone, batch {part['batch']} "
            f"({' + '.join('x'.join(map(str, s)) for s in part['image_shapes'])}"
            f", padded {part['batch_input_shape'][0]}x{part['batch_input_shape'][1]}), {part['num_classes']} classes; "
            f"median of {part['iters']}"
        )
        print(
            "| boxes/image | paadet ms | mmdet ms | mmdet/paadet | assignment only: paadet ms | mmdet ms | "
            "mmdet/paadet | paadet host syncs | paadet operator calls | mmdet syncs / ops | losses max rel. diff | "
            "positives paadet / mmdet |"
        )
        print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in part["rows"]:
            if with_mm:
                mm = f"{r['mmdet_ms']:.1f} | {r['ratio']:.1f}x"
                mma = f"{r['mmdet_assign_ms']:.1f} | {r['assign_ratio']:.1f}x"
                mmw = f"{r['mmdet_work']['syncs']} / {r['mmdet_work']['ops']} | {r['max_rel_diff']:.1e}"
                pos = f"{sum(r['num_pos'])} / {sum(r['mmdet_num_pos'])}"
            else:
                mm = mma = mmw = "- | -"
                pos = f"{sum(r['num_pos'])} / -"
            print(
                f"| {r['boxes_per_image']} | {r['paadet_ms']:.1f} | {mm} | {r['paadet_assign_ms']:.1f} | {mma} | "
                f"{r['paadet_work']['syncs']} | {r['paadet_work']['ops']} | {mmw} | {pos} |"
            )
        print(f"paadet host syncs within the constant bound {part['sync_bound']}: {part['syncs_bounded']}")
    if "train" in result:
        part = result["train"]
        names = [n for n in ("paadet", CHANNELS_LAST_SIDE, "mmdet") if n in part]
        print(
            f"\n(b) training iteration, batch {part['batch']}, padded {part['batch_input_shape'][0]}x"
            f"{part['batch_input_shape'][1]}, {part['boxes_per_image']} boxes/image; median of {part['iters']} "
            f"after {part['warmup']} warm-up"
        )
        sections = list(part["paadet"]["sections_s"])
        print("| side | s/iter | " + " | ".join(sections) + " |")
        print("|---|---:|" + "---:|" * len(sections))
        for n in names:
            print(
                f"| {n} | {part[n]['s_per_iter']:.2f} | "
                + " | ".join(f"{part[n]['sections_s'][s]:.2f}" for s in sections)
                + " |"
            )
        if "ratio" in part:
            print(
                f"mmdet s/iter / paadet s/iter = {part['ratio']:.2f}; first-iteration losses max rel. diff "
                f"{part['first_iteration_max_rel_diff']:.1e}"
            )
        if "channels_last_speedup" in part:
            print(f"paadet NCHW s/iter / paadet channels-last s/iter = {part['channels_last_speedup']:.2f}")
        if "ratio_channels_last" in part:
            print(
                f"mmdet s/iter / paadet channels-last s/iter = {part['ratio_channels_last']:.2f}; first-iteration "
                f"losses max rel. diff {part['channels_last_max_rel_diff']:.1e}"
            )
        for n in names:
            if "top_ops" in part[n]:
                print(f"\n{n}: operators with the most self CPU time in one iteration")
                for op, ms, calls in part[n]["top_ops"]:
                    print(f"  {op:40s} {ms:9.1f} ms  {calls:6d} calls")


def limit_threads(threads: int) -> contextlib.AbstractContextManager:
    """Set torch's CPU threads; the returned context limits NumPy's and BLAS's threads (scikit-learn's work, on
    mmdetection's side) to as many, where threadpoolctl is installed."""
    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore", module="sklearn")
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(threads)


def run_header(argv: list[str] | None, with_mmdet: bool) -> dict[str, Any]:
    """What a training benchmark's JSON starts with: the command, the load average now, the hardware and the
    versions (mmdetection's and scikit-learn's too when they are timed)."""
    result: dict[str, Any] = {
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]) if argv is None else argv,
        "loadavg_start": list(os.getloadavg()),
        "hardware": hardware_info("cpu"),
        "versions": versions(),
    }
    if with_mmdet:
        import mmdet
        import sklearn

        result["versions"].update(mmdet=mmdet.__version__, sklearn=sklearn.__version__)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("loss", "train", "both"), default="both")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch (and BLAS) CPU threads")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds of part (a)")
    parser.add_argument("--iters", type=int, default=5, help="timed rounds of part (a)")
    parser.add_argument("--train-warmup", type=int, default=1, help="untimed iterations of part (b)")
    parser.add_argument("--train-iters", type=int, default=3, help="timed iterations of part (b)")
    parser.add_argument("--train-boxes", type=int, default=8, help="boxes per image in part (b)")
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="part (b): also list the N operators with the most self CPU time of one iteration",
    )
    parser.add_argument(
        "--channels-last",
        action="store_true",
        help="part (b): also time paadet with its network in channels-last memory format",
    )
    parser.add_argument("--paadet-only", action="store_true", help="time paadet alone (no mmdetection needed)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    if args.threads < 1 or args.iters < 1 or args.train_iters < 1 or args.warmup < 0 or args.train_warmup < 0:
        parser.error("--threads, --iters and --train-iters must be >= 1, --warmup and --train-warmup >= 0")
    with_mmdet = not args.paadet_only
    if with_mmdet and not mmdet_available():
        print(
            f"mmdetection 3.3 (with mmengine and scikit-learn) is not importable by {sys.executable}: run this under "
            f"/tmp/mmref/bin/python, or pass --paadet-only to time paadet alone",
            file=sys.stderr,
        )
        return 2
    result = run_header(argv, with_mmdet)
    with limit_threads(args.threads):
        if args.part in ("loss", "both"):
            result["loss"] = bench_loss(args.threads, args.warmup, args.iters, with_mmdet)
        if args.part in ("train", "both"):
            result["train"] = bench_train(
                args.threads,
                args.train_warmup,
                args.train_iters,
                with_mmdet,
                args.train_boxes,
                args.profile,
                channels_last=args.channels_last,
            )
    result["loadavg_end"] = list(os.getloadavg())
    print_report(result)
    if args.json:
        atomic_write_json(args.json, result, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
