"""The trainer: mmdetection's epoch-based loop for PAA (SGD, warm-up and steps, frozen stem), resumable bit for bit.

Per iteration: the batch's forward pass in training mode, :class:`~paadet.train.loss.PAALoss`, a
finiteness check, backward, one optimiser step; a row in ``metrics.jsonl``. Per epoch: ``epoch_N.pth``,
``latest.pth`` (the same file, hard-linked) and, with a validation set, paadet's COCO evaluation and
``best.pth``. ``latest.pth`` is also written every ``save_interval_iters`` iterations or
``save_interval_s`` seconds, when ``max_iters`` stops the run, and on Ctrl-C (the first Ctrl-C stops
after the current iteration and saves; a second one aborts at once).

A resumed run (``resume=True``) reloads ``latest.pth``: weights, the optimiser's state (SGD momentum or AdamW
moments), the position in the epoch (the batch order and flips are functions of the seed and the epoch, see
:func:`paadet.train.data.build_train_loader`) and the RNG states, and sets each iteration's lr from
``(iteration, epoch)`` alone; on the CPU, with the same thread count, it ends with the same weights as
an uninterrupted run, bit for bit.

Under ``torchrun`` (``WORLD_SIZE`` > 1) the network is trained as PyTorch DDP, each process on its
shard of the epoch, rank 0 alone writing outputs: see :mod:`paadet.train.distributed`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ..coco import ClassList
from ..fileio import check_output_dir
from ..model import PAANet
from .checkpointer import (BEST_NAME, LATEST_NAME, TrainState, capture_rng, epoch_name, link_or_copy,
                           make_checkpoint, read_checkpoint, restore_rng, save_checkpoint)
from .config import TrainConfig, TrainingError
from .data import CocoTrainDataset, TrainBatch, build_train_loader
from .distributed import DistEnv, Distributed, NullMetrics, die_for_test, dump_weights_for_test, kill_point_for_test, start_distributed
from .init import build_train_model, trainable_parameters
from .loss import PAALoss
from .metrics import METRICS_NAME, MetricsLog
from .optim import build_optimizer
from .plots import PLOT_NAME, plot_metrics
from .schedule import LRSchedule, set_lr

__all__ = ["TrainSummary", "train"]

_AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _stderr(message: str) -> None:
    tqdm.write(message, file=sys.stderr)


@dataclass
class TrainSummary:
    """What a run did.

    Attributes:
        output_dir: its folder.
        iterations: iterations completed in all (a resumed run counts the earlier ones).
        epochs: epochs completed in all.
        run_iterations: iterations this call ran.
        images: images trained on in this call.
        skipped: unreadable images skipped in this call, and their names.
        seconds: wall time of this call's iterations (validation excluded).
        last_losses: the last iteration's ``loss``, ``loss_cls``, ``loss_bbox``, ``loss_iou``.
        best_ap, best_epoch: the best validation AP and its epoch (None without validation).
        checkpoint: ``latest.pth`` (None if nothing was saved).
        plot: the PNG (None: matplotlib missing, or no iteration).
        stopped: ``finished`` (every epoch), ``max_iters`` or ``nothing to do``.
        init_note: how the weights were initialised, when it is worth saying (re-initialised ``atss_cls``).
        rank, world_size: this process's rank and the processes training together (DDP; 1: one process).
            Under DDP ``images`` counts every rank's, ``skipped`` this rank's.
    """

    output_dir: Path
    iterations: int
    epochs: int
    run_iterations: int = 0
    images: int = 0
    skipped: int = 0
    skipped_files: list[str] = field(default_factory=list)
    seconds: float = 0.0
    last_losses: dict[str, float] = field(default_factory=dict)
    best_ap: float | None = None
    best_epoch: int | None = None
    checkpoint: Path | None = None
    plot: Path | None = None
    stopped: str = "finished"
    init_note: str | None = None
    rank: int = 0
    world_size: int = 1

    @property
    def seconds_per_iter(self) -> float | None:
        return self.seconds / self.run_iterations if self.run_iterations else None

    def line(self) -> str:
        """One line with the figures."""
        parts = [f"{self.stopped}: {self.iterations} iterations, {self.epochs} epochs"
                 + (f" on {self.world_size} processes" if self.world_size > 1 else "")]
        if self.run_iterations:
            parts.append(f"this run {self.run_iterations} iterations on {self.images} images in {self.seconds:.1f} s "
                         f"({self.seconds_per_iter:.3f} s/iter)")
        if self.last_losses:
            parts.append("last loss {loss:.4f} (cls {loss_cls:.4f}, bbox {loss_bbox:.4f}, iou {loss_iou:.4f})".format(**self.last_losses))
        if self.best_ap is not None:
            parts.append(f"best val AP {self.best_ap:.4f} (epoch {self.best_epoch})")
        parts.append(f"{self.skipped} unreadable images skipped")
        if self.checkpoint is not None:
            parts.append(f"checkpoint {self.checkpoint}")
        if self.plot is not None:
            parts.append(f"plot {self.plot}")
        return "; ".join(parts)


@contextlib.contextmanager
def _torch_settings(threads: int, deterministic: bool) -> Iterator[None]:
    """Set torch's CPU threads and deterministic algorithms for the run; restore them afterwards."""
    previous = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(), \
        torch.is_deterministic_algorithms_warn_only_enabled()
    torch.set_num_threads(threads)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.set_num_threads(previous[0])
        torch.use_deterministic_algorithms(previous[1], warn_only=previous[2])


class _StopFlag:
    """Ctrl-C during training: the first one asks the loop to stop after the current iteration (and save);
    the second raises ``KeyboardInterrupt`` at once. Installed only in the main thread.

    ``deferred`` (DDP): the first Ctrl-C only sets ``pending``; ``requested`` is set when the ranks
    have agreed on it (so that every rank stops after the same iteration). A repeat within 2 s counts
    as the same Ctrl-C: torchrun forwards the terminal's to workers that got it already."""

    def __init__(self, log: Callable[[str], None], deferred: bool = False) -> None:
        self.requested = self.pending = False
        self.deferred, self._first = deferred, 0.0
        self.log = log
        self._previous: Any = None

    def __enter__(self) -> "_StopFlag":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        now = time.monotonic()
        if self.requested or self.pending:
            if self.deferred and now - self._first < 2.0:
                return
            raise KeyboardInterrupt
        self.pending, self._first = True, now
        self.requested = not self.deferred
        self.log("interrupt: stopping after this iteration to save latest.pth (Ctrl-C again to abort without saving)")

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


class _Trainer:
    """One run's objects and its loop (see :func:`train`)."""

    def __init__(self, config: TrainConfig, settings: dict[str, Any], net: PAANet, classes: ClassList, dataset: CocoTrainDataset,
                 optimizer: torch.optim.Optimizer, state: TrainState, init_info: dict[str, Any],
                 device: torch.device, metrics: MetricsLog | NullMetrics, val_set: Any, log: Callable[[str], None],
                 dist: Distributed | None = None) -> None:
        self.config, self.net, self.classes, self.dataset = config, net, classes, dataset
        self.dist = dist or Distributed(DistEnv(), device, None)
        self.model = self.dist.wrap(net)  # what the forward pass calls: DDP under torchrun, else ``net``
        self.kill_at = kill_point_for_test()
        self.optimizer, self.state, self.init_info, self.device = optimizer, state, init_info, device
        self.metrics, self.val_set, self.log = metrics, val_set, log
        self.out = config.output_path
        self.schedule = LRSchedule(config.lr, config.warmup_iters, config.warmup_ratio, config.lr_steps)
        self.loss_fn = PAALoss()
        # fp16 needs a gradient scaler (its small gradients underflow); bfloat16 has float32's range
        self.scaler = torch.amp.GradScaler(device.type, enabled=config.amp == "fp16")
        self.settings = settings
        self.summary = TrainSummary(self.out, state.iteration, state.epoch, best_ap=state.best_ap, best_epoch=state.best_epoch,
                                    rank=self.dist.rank, world_size=self.dist.world_size)
        self.last_save = time.monotonic()
        self.saved: Path | None = self.out / LATEST_NAME if (self.out / LATEST_NAME).is_file() else None

    # ---------------------------------------------------------------------------------- checkpoints
    def _check_weights(self) -> None:
        """Refuse to save non-finite weights (a step that diverged): the last good checkpoint stays.

        Each tensor's sum is checked (a NaN or inf anywhere makes it non-finite; about 5x cheaper than
        ``isfinite`` on every element, and only a tensor of absurd weights could overflow it)."""
        with torch.no_grad():
            flags = torch.isfinite(torch.stack([p.sum() for p in self.net.parameters()])).cpu()
        if not bool(flags.all()):
            names = [n for (n, _), ok in zip(self.net.named_parameters(), flags.tolist()) if not ok]
            kept = f"the last good checkpoint is {self.saved}" if self.saved is not None else "no checkpoint was written"
            raise TrainingError(
                f"after iteration {self.state.iteration} (epoch {self.state.epoch + 1}): the optimiser step made "
                f"{len(names)} weight tensors non-finite ({', '.join(names[:3])}); not saved, {kept}; try a lower --lr")

    def checkpoint(self) -> dict[str, Any]:
        """The full checkpoint: weights and meta, and the optimizer, schedule and RNG states to resume."""
        return make_checkpoint(
            self.net.state_dict(), classes_meta=self.classes.to_meta(), state=self.state, settings=self.settings,
            init=self.init_info, optimizer=self.optimizer.state_dict(),
            scheduler={"schedule": self.schedule.state_dict(), "iteration": self.state.iteration, "epoch": self.state.epoch},
            rng=capture_rng(), scaler=self.scaler.state_dict() if self.scaler.is_enabled() else None,
        )

    def save_latest(self) -> Path:
        if not self.dist.is_main:  # rank 0 alone writes
            return self.out / LATEST_NAME
        self._check_weights()
        self.metrics.sync()
        path = save_checkpoint(self.out / LATEST_NAME, self.checkpoint())
        self.last_save, self.saved = time.monotonic(), path
        return path

    def _save_due(self) -> bool:
        if not self.dist.is_main:
            return False
        every = self.config.save_interval_iters
        if every is not None and self.state.iteration % every == 0:
            return True
        return time.monotonic() - self.last_save >= self.config.save_interval_s

    # ---------------------------------------------------------------------------------- loop
    def run(self) -> TrainSummary:
        config, state = self.config, self.state
        if self._done():
            self.summary.stopped = "nothing to do"
            self.log(f"nothing to do: the run in {self.out} is at {state.epoch} epochs, {state.iteration} iterations")
            return self._finish()
        with _StopFlag(self.log, deferred=self.dist.active) as stop:
            while state.epoch < config.epochs:
                reached_max = self._run_epoch(stop)
                if stop.requested:
                    path = self.save_latest()
                    self.dist.barrier()  # no rank exits (making torchrun stop rank 0) before the save is done
                    self.log(f"interrupted: saved {path} at iteration {state.iteration} (epoch {state.epoch + 1}, "
                             f"batch {state.batch_in_epoch}); continue with --resume (same --output-dir)")
                    raise KeyboardInterrupt
                if reached_max:
                    self.summary.stopped = "max_iters"
                    break
        return self._finish()

    def _done(self) -> bool:
        max_iters = self.config.max_iters
        return self.state.epoch >= self.config.epochs or (max_iters is not None and self.state.iteration >= max_iters)

    def _run_epoch(self, stop: _StopFlag) -> bool:
        """Run the rest of the current epoch; returns whether ``max_iters`` stopped it."""
        config, state = self.config, self.state
        epoch = state.epoch
        loader = build_train_loader(
            self.dataset, batch_size=config.batch_size, shuffle=config.shuffle, seed=config.seed, epoch=epoch,
            workers=config.workers, rank=self.dist.rank, world_size=self.dist.world_size,
            start_batch=state.batch_in_epoch, loader=config.loader)
        bar = tqdm(total=loader.total_batches, initial=state.batch_in_epoch, desc=f"epoch {epoch + 1}/{config.epochs}",
                   unit="it", disable=not (config.progress and self.dist.is_main), dynamic_ncols=True, file=sys.stderr)
        reached_max = False
        self.net.train()
        tick = time.perf_counter()
        batches = iter(loader)
        try:
            for batch in batches:
                fetched = time.perf_counter()
                state.batch_in_epoch += 1
                self._note_skipped(batch)
                row = self._step(batch, epoch, stop) if len(batch) > 0 or self.dist.active else None
                if row is not None:
                    now = time.perf_counter()
                    row.update(time=now - tick, data_time=fetched - tick)
                    self.metrics.append(row)
                    self.summary.seconds += now - tick
                    bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}", refresh=False)
                bar.update(1)
                last_batch = state.batch_in_epoch == loader.total_batches
                reached_max = config.max_iters is not None and state.iteration >= config.max_iters
                if stop.requested or (reached_max and not last_batch):
                    break
                if not last_batch and row is not None and self._save_due():
                    self.save_latest()
                tick = time.perf_counter()  # a row's time: waiting for its batch and its step, not the saves
        finally:
            close = getattr(batches, "close", None)
            if close is not None:  # stop the loading threads of an epoch left early
                close()
            bar.close()
        if state.batch_in_epoch == loader.total_batches and not stop.requested:
            self._end_epoch()
        elif reached_max:
            path = self.save_latest()
            self.log(f"stopped at --max-iters {config.max_iters}: saved {path}")
        return reached_max

    def _note_skipped(self, batch: TrainBatch) -> None:
        for name, reason in batch.skipped:
            self.state.skipped_images += 1
            self.summary.skipped += 1
            self.summary.skipped_files.append(name)
            self.log(f"warning: skipped unreadable image {name}: {reason}")

    def _step(self, batch: TrainBatch, epoch: int, stop: _StopFlag) -> dict[str, Any] | None:
        """One optimiser step on ``batch``; returns its metrics row (timings added by the caller), or None when
        (under DDP) some rank's batch held no readable image and every rank skips the step."""
        state = self.state
        if self.dist.active and not self._agree_batch(batch, epoch, stop):
            return None
        lr = self.schedule.lr_at(state.iteration, epoch)
        set_lr(self.optimizer, lr)
        device = self.device
        layout = torch.channels_last if self.config.channels_last else torch.preserve_format
        images = batch.images.to(device, non_blocking=True, memory_format=layout)
        gt_boxes = [b.to(device, non_blocking=True) for b in batch.gt_boxes]
        gt_labels = [lab.to(device, non_blocking=True) for lab in batch.gt_labels]
        with torch.autocast(device.type, dtype=_AMP_DTYPES.get(self.config.amp, torch.float32),
                            enabled=self.config.amp is not None):
            outputs = self.model(images)
        # the targets, the GMM and the losses in float32 (a no-op without amp)
        cls_logits, box_deltas, iou_logits = ([t.float() for t in level] for level in outputs)
        try:
            out = self.loss_fn(cls_logits, box_deltas, iou_logits, gt_boxes, gt_labels, list(batch.pad_shapes))
        except Exception as exc:  # the targets' maths refuses non-finite network outputs: say which batch
            outputs = (*cls_logits, *box_deltas, *iou_logits)
            if all(bool(torch.isfinite(t).all()) for t in outputs):
                raise
            raise self._not_finite(batch, epoch, lr, "the network's outputs are not finite") from exc
        parts = torch.stack([out.loss.detach(), out.loss_cls.detach(), out.loss_bbox.detach(), out.loss_iou.detach()])
        num_pos = out.num_pos.detach().cpu()
        loss, loss_cls, loss_bbox, loss_iou = (float(v) for v in parts.double().cpu())
        num_pos_total, images_total = int(num_pos.sum()), len(batch)
        if self.dist.active:
            (loss, loss_cls, loss_bbox, loss_iou), num_pos_total, images_total = self._agree_losses(
                (loss, loss_cls, loss_bbox, loss_iou), num_pos_total, batch, epoch, lr)
        elif not all(math.isfinite(v) for v in (loss, loss_cls, loss_bbox, loss_iou)):
            raise self._not_finite(batch, epoch, lr, f"the loss is not finite (loss {loss}, loss_cls {loss_cls}, "
                                                     f"loss_bbox {loss_bbox}, loss_iou {loss_iou})")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(out.loss).backward()
        self.scaler.step(self.optimizer)  # without fp16: a plain step
        self.scaler.update()
        state.iteration += 1
        self.summary.run_iterations += 1
        self.summary.images += images_total
        if self.kill_at == (self.dist.rank, state.iteration):
            die_for_test()
        self.summary.last_losses = {"loss": loss, "loss_cls": loss_cls, "loss_bbox": loss_bbox, "loss_iou": loss_iou}
        return {
            "iter": state.iteration, "epoch": epoch + 1, "batch": state.batch_in_epoch, "lr": lr,
            "loss": loss, "loss_cls": loss_cls, "loss_bbox": loss_bbox, "loss_iou": loss_iou,
            "num_pos": num_pos_total, "num_pos_per_image": [int(v) for v in num_pos],
            "num_ill_defined": int(out.num_ill_defined.sum()),
            "files": list(batch.file_names), "skipped": [name for name, _ in batch.skipped],
        }

    def _agree_batch(self, batch: TrainBatch, epoch: int, stop: _StopFlag) -> bool:
        """DDP, before the forward pass (DDP's forward may communicate): whether every rank has a readable
        image (else every rank skips this step, so the gradient reductions stay paired); a pending Ctrl-C
        on any rank becomes ``stop.requested`` on all."""
        all_have_batch, any_stop = self.dist.agree_batch(len(batch) > 0, stop.pending)
        stop.requested = stop.requested or any_stop
        if not all_have_batch and self.dist.is_main:
            self.log(f"warning: iteration {self.state.iteration + 1} (epoch {epoch + 1}, batch "
                     f"{self.state.batch_in_epoch}) skipped on every rank: a rank's batch held no readable image")
        return all_have_batch

    def _agree_losses(self, losses: tuple[float, float, float, float], num_pos: int, batch: TrainBatch, epoch: int,
                      lr: float) -> tuple[tuple[float, float, float, float], int, int]:
        """DDP, before the backward pass: the losses averaged over the ranks, the positives and the images
        summed. A non-finite loss on any rank stops every rank before the weights change."""
        agreed = self.dist.agree_losses(losses, num_pos, len(batch))
        if not agreed.finite:
            if not all(math.isfinite(v) for v in losses):
                raise self._not_finite(batch, epoch, lr, "the loss is not finite (loss {}, loss_cls {}, loss_bbox {}, "
                                                         "loss_iou {})".format(*losses))
            raise TrainingError(f"iteration {self.state.iteration + 1} (epoch {epoch + 1}): another rank's loss is not "
                                f"finite; stopped before updating the weights")
        return agreed.losses, agreed.num_pos, agreed.images

    def _not_finite(self, batch: TrainBatch, epoch: int, lr: float, what: str) -> TrainingError:
        kept = f"the last good checkpoint is {self.saved}" if self.saved is not None else "no checkpoint was written yet"
        return TrainingError(
            f"iteration {self.state.iteration + 1} (epoch {epoch + 1}, lr {lr:.3g}): {what} on "
            f"{', '.join(batch.file_names)}; stopped before updating the weights, {kept}; try a lower --lr")

    def _end_epoch(self) -> None:
        """Validation (when due), then ``epoch_N.pth``, ``latest.pth`` and ``best.pth``."""
        config, state = self.config, self.state
        finished = state.epoch + 1
        improved = False
        if self.val_set is not None and self.dist.is_main and (finished % config.val_interval == 0 or finished == config.epochs):
            result = self._validate()
            self.metrics.append({"epoch": finished, "iter": state.iteration, **result.to_row()})
            self.log(f"epoch {finished}: val AP {result.ap:.4f} (AP50 {result.stats['AP50']:.4f}) "
                     f"on {result.images} images in {result.seconds:.1f} s")
            if state.best_ap is None or result.ap > state.best_ap:
                state.best_ap, state.best_epoch, improved = result.ap, finished, True
        state.epoch, state.batch_in_epoch = finished, 0
        self.summary.epochs = finished
        if self.dist.is_main:  # rank 0 alone validates and writes; the others wait here
            self._check_weights()
            self.metrics.sync()
            path = save_checkpoint(self.out / epoch_name(finished), self.checkpoint())
            link_or_copy(path, self.out / LATEST_NAME)
            self.last_save, self.saved = time.monotonic(), self.out / LATEST_NAME
            if improved:
                link_or_copy(path, self.out / BEST_NAME)
        self.dist.barrier()

    def _validate(self) -> Any:
        from .validation import validate

        try:
            return validate(self.net, self.val_set, device=self.device, scale=self.config.scale,
                            batch_size=self.config.batch_size,
                            workers=self.config.workers, progress=self.config.progress, log=self.log)
        finally:
            self.net.train()

    def _finish(self) -> TrainSummary:
        summary, state = self.summary, self.state
        self.metrics.close()
        summary.iterations, summary.epochs = state.iteration, state.epoch
        summary.best_ap, summary.best_epoch = state.best_ap, state.best_epoch
        summary.checkpoint = self.out / LATEST_NAME if (self.out / LATEST_NAME).is_file() else None
        if self.metrics.rows:
            summary.plot = plot_metrics(self.metrics.rows, self.out / PLOT_NAME)
            if summary.plot is None:
                self.log(f"no {PLOT_NAME}: matplotlib is not installed (pip install 'paadet[train]')")
        return summary


def _resume_checkpoint(config: TrainConfig, latest: Path) -> dict[str, Any]:
    if not latest.is_file():
        raise TrainingError(f"{latest}: nothing to resume, --output-dir holds no {LATEST_NAME}")
    ckpt = read_checkpoint(latest)
    meta = ckpt["meta"]
    for key in ("optimizer", "rng"):
        if key not in ckpt:
            raise TrainingError(f"{latest}: holds no {key} state, so the run cannot be resumed from it")
    mismatches = config.resume_mismatches(meta.get("settings", {}))
    if mismatches:
        raise TrainingError(f"{latest}: --resume needs the run's own settings, these differ: {'; '.join(mismatches)}")
    return ckpt


def _datasets(config: TrainConfig, log: Callable[[str], None],
              with_validation: bool = True) -> tuple[CocoTrainDataset, ClassList, Any]:
    """The training set, its classes (the annotation file's categories, in its order) and the validation set
    (None without one, or when not ``with_validation``: DDP ranks other than 0)."""
    dataset = CocoTrainDataset(config.ann_file, config.image_dir, scale=config.scale, flip_prob=config.flip_prob,
                               seed=config.seed)
    for warning in dataset.warnings:
        log(f"warning: {warning}")
    if dataset.dropped:
        log(f"{len(dataset.dropped)} images left out by mmdetection's filter (no annotations, or under 32 px)")
    classes = ClassList(tuple(str(c) for c in dataset.classes), tuple(int(i) for i in dataset.category_ids))
    val_set = None
    if config.val_ann is not None and with_validation:
        from .validation import load_validation_set

        val_set = load_validation_set(config.val_ann, config.val_images)
        val_ids = {int(c["id"]) for c in val_set.coco.dataset["categories"]}
        if val_ids != set(classes.category_ids):
            log(f"warning: {config.val_ann} lists category ids {sorted(val_ids)}, the training set "
                f"{sorted(classes.category_ids)}: categories the model does not predict score AP 0")
    return dataset, classes, val_set


def _network(config: TrainConfig, classes: ClassList, resume_ckpt: dict[str, Any] | None,
             log: Callable[[str], None]) -> tuple[PAANet, dict[str, Any], str | None]:
    """The network to train (from the checkpoint being resumed, or initialised as ``config`` says), how it
    was initialised, and the note about it worth printing (or None)."""
    if resume_ckpt is not None:
        net = PAANet(num_classes=len(classes), trainable=True, frozen_stages=config.frozen_stages,
                     norm_eval=not config.bn_train)
        net.load_state_dict(resume_ckpt["state_dict"], strict=True)
        return net, dict(resume_ckpt["meta"].get("init", {})), None
    net, report = build_train_model(len(classes), config.init, config.init_file, seed=config.seed,
                                    frozen_stages=config.frozen_stages,
                                    norm_eval=not config.bn_train, class_names=classes.names)
    if report.note:
        log(report.note)
    return net, {"mode": report.mode, "source": report.source}, report.note


def train(config: TrainConfig, log: Callable[[str], None] | None = None) -> TrainSummary:
    """Train PAA as ``config`` says; returns the :class:`TrainSummary`.

    Args:
        config: the settings.
        log: where warnings and notes go (default: stderr, above the progress bar).

    Raises:
        TrainingError: inconsistent settings, a folder that already holds a run (without ``resume``), a
            run that cannot be resumed with these settings, or a non-finite loss (the message names the
            iteration and the batch's files; the last good checkpoint is kept).
        DatasetError, CheckpointError, OutputPathError: an unusable dataset, checkpoint or output folder.
        KeyboardInterrupt: Ctrl-C, after ``latest.pth`` was saved.

    Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) each process joins the process group and
    trains its shard as DDP (:mod:`paadet.train.distributed`); ``config.world_size`` is set from it.
    """
    log = log or _stderr
    config.validate()
    dist = start_distributed(config.device, config.dist_timeout_s)
    try:
        return _train(dataclasses.replace(config, world_size=dist.world_size), dist, dist.rank_log(log))
    finally:
        dist.close()


def _train(config: TrainConfig, dist: Distributed, log: Callable[[str], None]) -> TrainSummary:
    """:func:`train` once the process group (if any) is up."""
    out = check_output_dir(config.output_dir, "--output-dir")
    latest = out / LATEST_NAME
    if not config.resume and latest.exists():
        raise TrainingError(f"{out} already holds a training run ({LATEST_NAME}); continue it with --resume "
                            f"or choose another --output-dir")
    resume_ckpt = _resume_checkpoint(config, latest) if config.resume else None
    chosen_here = config.channels_last is None and resume_ckpt is None
    config = config.resolved(resume_ckpt["meta"].get("settings", {}) if resume_ckpt is not None else None)
    if chosen_here and config.channels_last:
        log("channels-last memory format: the default with --amp bf16 on a CPU (--no-channels-last for NCHW)")
    device = dist.device
    dataset, classes, val_set = _datasets(config, log, with_validation=dist.is_main)
    state, threads, settings = TrainState(), config.threads, config.settings()
    if resume_ckpt is not None:
        meta = resume_ckpt["meta"]
        state = TrainState.from_plain(meta.get("train_state", {}))
        stored = meta.get("dataset_meta", {})
        if stored != classes.to_meta():
            raise TrainingError(f"{latest}: was trained on other classes ({len(stored.get('classes', []))}) than "
                                f"{config.ann_file} lists ({len(classes)})")
        if threads is None:
            threads = state.threads
        elif state.threads is not None and threads != state.threads:
            log(f"warning: {threads} threads where the run used {state.threads}: the weights will differ in the last bits")
        # the run's own start, not this call's (empty) initialisation flags
        settings.update(init=meta["settings"].get("init"), init_file=meta["settings"].get("init_file"))
        log(f"resuming {latest}: {state.iteration} iterations done, continuing epoch {state.epoch + 1} "
            f"after its batch {state.batch_in_epoch}")
    state.threads = threads or torch.get_num_threads()
    with _torch_settings(state.threads, config.deterministic):
        net, init_info, init_note = _network(config, classes, resume_ckpt, log)
        net.classes = classes
        net.to(device)
        if config.channels_last:
            net.to(memory_format=torch.channels_last)
        optimizer = build_optimizer(config.optimizer, trainable_parameters(net), lr=config.lr,
                                    momentum=config.momentum, weight_decay=config.weight_decay)
        if resume_ckpt is not None:
            optimizer.load_state_dict(resume_ckpt["optimizer"])
            restore_rng(resume_ckpt["rng"])
        metrics = MetricsLog(out / METRICS_NAME, keep_upto=(state.iteration, state.epoch) if resume_ckpt else None) \
            if dist.is_main else NullMetrics()
        trainer = _Trainer(config, settings, net, classes, dataset, optimizer, state, init_info, device, metrics,
                           val_set, log, dist)
        if resume_ckpt is not None and "scaler" in resume_ckpt:
            trainer.scaler.load_state_dict(resume_ckpt["scaler"])
        try:
            summary = trainer.run()
        finally:
            metrics.close()
        dump_weights_for_test(dist.rank, net)
        summary.init_note = init_note
        return summary
