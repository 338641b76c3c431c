"""The trainer: mmdetection's epoch-based loop for PAA (SGD, warm-up and steps, frozen stem), resumable bit for bit.

Per iteration: the batch's forward pass in training mode, :class:`~paadet.train.loss.PAALoss`, a
finiteness check, backward, one optimiser step; a row in ``metrics.jsonl``. Per epoch: ``epoch_N.pth``,
``latest.pth`` (the same file, hard-linked) and, with a validation set, paadet's COCO evaluation and
``best.pth``. ``latest.pth`` is also written every ``save_interval_iters`` iterations or
``save_interval_s`` seconds, when ``max_iters`` stops the run, and on Ctrl-C or SIGTERM (the run stops after
the current iteration and saves, :mod:`paadet.train.signals`). An epoch in which no iteration could run (every
image unreadable) stops the run without a checkpoint; a write that fails (a full disk) stops it at once,
keeping the last good checkpoint.

A resumed run (``resume=True``) reloads ``latest.pth``: weights, the optimiser's state (SGD momentum or AdamW
moments), the position in the epoch (the batch order and flips are functions of the seed and the epoch, see
:func:`paadet.train.loader.build_train_loader`) and the RNG states, and sets each iteration's lr from
``(iteration, epoch)`` alone; on the CPU, with the same thread count, it ends with the same weights as
an uninterrupted run, bit for bit.

Under ``torchrun`` (``WORLD_SIZE`` > 1) the network is trained as PyTorch DDP, each process on its
shard of the epoch, rank 0 alone writing outputs: see :mod:`paadet.train.ddp`. :mod:`paadet.train.setup` builds a
run's objects and calls :meth:`Trainer.run`; hooks (:mod:`paadet.train.hooks`) run at its fixed points.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from paadet.classes import ClassList
from paadet.fileio import OutputWriteError
from paadet.model import PAANet
from paadet.train.checkpointer import (
    BEST_NAME,
    LATEST_NAME,
    TrainState,
    capture_rng,
    epoch_name,
    link_or_copy,
    make_checkpoint,
    save_checkpoint,
    weights_only,
)
from paadet.train.config import TrainConfig, TrainingError
from paadet.train.dataset import CocoTrainDataset
from paadet.train.ddp import DistEnv, Distributed, NullMetrics
from paadet.train.eta import RecentEta
from paadet.train.hooks import Hooks, TrainHook
from paadet.train.loader import TrainBatch, build_train_loader
from paadet.train.loss import PAALoss
from paadet.train.metrics import MetricsLog
from paadet.train.plots import PLOT_NAME, plot_metrics
from paadet.train.schedule import LRSchedule, set_lr
from paadet.train.signals import StopRequest
from paadet.train.summary import TrainSummary

BAR_FORMAT = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}, {rate_fmt}{postfix}]"
"""The epoch's bar: tqdm's default without its own time left (``left=`` in the postfix is :class:`RecentEta`'s)."""

_AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class Trainer:
    """One run's objects and its loop (built by :func:`paadet.train.train`)."""

    def __init__(
        self,
        config: TrainConfig,
        settings: dict[str, Any],
        net: PAANet,
        classes: ClassList,
        dataset: CocoTrainDataset,
        optimizer: torch.optim.Optimizer,
        state: TrainState,
        init_info: dict[str, Any],
        device: torch.device,
        metrics: MetricsLog | NullMetrics,
        val_set: Any,
        log: Callable[[str], None],
        dist: Distributed | None = None,
        hooks: Iterable[TrainHook] = (),
    ) -> None:
        self.config, self.net, self.classes, self.dataset = config, net, classes, dataset
        self.dist = dist or Distributed(DistEnv(), device, None)
        self.model = self.dist.wrap(net)  # what the forward pass calls: DDP under torchrun, else ``net``
        self.hooks = Hooks(hooks)
        self.optimizer, self.state, self.init_info, self.device = optimizer, state, init_info, device
        self.metrics, self.val_set, self.log = metrics, val_set, log
        self.out = config.output_path
        self.schedule = LRSchedule(config.lr, config.warmup_iters, config.warmup_ratio, config.lr_steps)
        self.loss_fn = PAALoss()
        # fp16 needs a gradient scaler (its small gradients underflow); bfloat16 has float32's range
        self.scaler = torch.amp.GradScaler(device.type, enabled=config.amp == "fp16")
        self.settings = settings
        self.summary = TrainSummary(
            self.out,
            state.iteration,
            state.epoch,
            best_ap=state.best_ap,
            best_epoch=state.best_epoch,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
        )
        self.last_save = time.monotonic()
        self.first_skip: str | None = None  # why the first skipped image of this call could not be read
        self.saved: Path | None = self.out / LATEST_NAME if (self.out / LATEST_NAME).is_file() else None

    # ---------------------------------------------------------------------------------- checkpoints
    def _check_weights(self) -> None:
        """Refuse to save non-finite weights (a step that diverged): the last good checkpoint stays.

        Each tensor's sum is checked (a NaN or inf anywhere makes it non-finite; about 5x cheaper than
        ``isfinite`` on every element, and only a tensor of absurd weights could overflow it)."""
        with torch.no_grad():
            flags = torch.isfinite(torch.stack([p.sum() for p in self.net.parameters()])).cpu()
        if not bool(flags.all()):
            names = [n for (n, _), ok in zip(self.net.named_parameters(), flags.tolist(), strict=False) if not ok]
            raise TrainingError(
                f"after iteration {self.state.iteration} (epoch {self.state.epoch + 1}): the optimiser step made "
                f"{len(names)} weight tensors non-finite ({', '.join(names[:3])}); not saved, {self._kept()}; "
                "try a lower --lr"
            )

    def checkpoint(self) -> dict[str, Any]:
        """The full checkpoint: weights and meta, and the optimizer, schedule and RNG states to resume."""
        return make_checkpoint(
            self.net.state_dict(),
            classes_meta=self.classes.to_meta(),
            state=self.state,
            settings=self.settings,
            init=self.init_info,
            optimizer=self.optimizer.state_dict(),
            scheduler={
                "schedule": self.schedule.state_dict(),
                "iteration": self.state.iteration,
                "epoch": self.state.epoch,
            },
            rng=capture_rng(),
            scaler=self.scaler.state_dict() if self.scaler.is_enabled() else None,
        )

    def _kept(self) -> str:
        return f"the last good checkpoint is {self.saved}" if self.saved is not None else "no checkpoint was written"

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """A failed write (a full disk) stops the run at once, in one line naming the file and the checkpoint kept."""
        try:
            yield
        except OutputWriteError as exc:
            raise OutputWriteError(f"{exc}; stopped after iteration {self.state.iteration}, {self._kept()}") from None

    def _append_row(self, row: dict[str, Any]) -> None:
        with self._writing():
            self.metrics.append(row)

    def save_latest(self) -> Path:
        if not self.dist.is_main:  # rank 0 alone writes
            return self.out / LATEST_NAME
        self._check_weights()
        with self._writing():
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
        """Run the rest of the training (every epoch left, or up to ``max_iters``); returns the summary.

        Raises ``KeyboardInterrupt`` (Ctrl-C) or :class:`~paadet.train.signals.TrainingTerminated` (SIGTERM)
        after saving ``latest.pth``."""
        config, state = self.config, self.state
        self.hooks.before_train(self)
        if self._done():
            self.summary.stopped = "nothing to do"
            self.log(f"nothing to do: the run in {self.out} is at {state.epoch} epochs, {state.iteration} iterations")
            return self._finish()
        with StopRequest(self.log, deferred=self.dist.active) as stop:
            while state.epoch < config.epochs:
                reached_max = self._run_epoch(stop)
                if stop.requested:
                    path = self.save_latest()
                    if self.dist.is_main:
                        self._plot()
                    self.dist.barrier()  # no rank exits (making torchrun stop rank 0) before the save is done
                    self.log(
                        f"{'terminated' if stop.terminated else 'interrupted'}: saved {path} at iteration "
                        f"{state.iteration} (epoch {state.epoch + 1}, batch {state.batch_in_epoch}); continue "
                        "with --resume (same --output-dir)"
                    )
                    raise stop.interruption()
                if reached_max:
                    self.summary.stopped = "max_iters"
                    break
        return self._finish()

    def _done(self) -> bool:
        max_iters = self.config.max_iters
        return self.state.epoch >= self.config.epochs or (max_iters is not None and self.state.iteration >= max_iters)

    def _run_epoch(self, stop: StopRequest) -> bool:
        """Run the rest of the current epoch; returns whether ``max_iters`` stopped it."""
        config, state = self.config, self.state
        epoch = state.epoch
        loader = build_train_loader(
            self.dataset,
            batch_size=config.batch_size,
            shuffle=config.shuffle,
            seed=config.seed,
            epoch=epoch,
            workers=config.workers,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
            start_batch=state.batch_in_epoch,
            loader=config.loader,
        )
        bar = tqdm(
            total=loader.total_batches,
            initial=state.batch_in_epoch,
            desc=f"epoch {epoch + 1}/{config.epochs}",
            unit="it",
            disable=not (config.progress and self.dist.is_main),
            dynamic_ncols=True,
            file=sys.stderr,
            bar_format=BAR_FORMAT,  # tqdm's own time left averages in the slow first iterations: ours is recent
        )
        eta = RecentEta()
        reached_max = False
        start_batch, start_iteration = state.batch_in_epoch, state.iteration
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
                    self._append_row(row)
                    self.summary.seconds += now - tick
                    self.hooks.after_step(self, row)
                    eta.add(row["time"])
                    left = eta.text(loader.total_batches - state.batch_in_epoch)
                    bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}", left=left, refresh=False)
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
            if state.iteration == start_iteration and (start_batch == 0 or state.iteration == 0):
                raise self._nothing_read(epoch)
            self._end_epoch()
        elif reached_max:
            path = self.save_latest()
            self.log(f"stopped at --max-iters {config.max_iters}: saved {path}")
        return reached_max

    def _nothing_read(self, epoch: int) -> TrainingError:
        """An epoch that ran no iteration: every batch held only unreadable images (on some rank, under DDP)."""
        kept = "no checkpoint was written" if self.saved is None else f"{self._kept()}, not replaced"
        if not self.summary.skipped_files:  # DDP: this rank read its images, another rank could not
            why = "every step was skipped because another rank's batches held no readable image"
        else:
            why = (
                f"no batch held a readable image, {self.summary.skipped} images skipped as unreadable (first: "
                f"{self.summary.skipped_files[0]}: {self.first_skip})"
            )
        return TrainingError(f"epoch {epoch + 1} ran no iteration: {why}; {kept}; check --images and the image files")

    def _note_skipped(self, batch: TrainBatch) -> None:
        for name, reason in batch.skipped:
            if self.first_skip is None:
                self.first_skip = reason
            self.state.skipped_images += 1
            self.summary.skipped += 1
            self.summary.skipped_files.append(name)
            self.log(f"warning: skipped unreadable image {name}: {reason}")

    def _step(self, batch: TrainBatch, epoch: int, stop: StopRequest) -> dict[str, Any] | None:
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
        with torch.autocast(
            device.type, dtype=_AMP_DTYPES.get(self.config.amp, torch.float32), enabled=self.config.amp is not None
        ):
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
                (loss, loss_cls, loss_bbox, loss_iou), num_pos_total, batch, epoch, lr
            )
        elif not all(math.isfinite(v) for v in (loss, loss_cls, loss_bbox, loss_iou)):
            raise self._not_finite(
                batch,
                epoch,
                lr,
                f"the loss is not finite (loss {loss}, loss_cls {loss_cls}, "
                f"loss_bbox {loss_bbox}, loss_iou {loss_iou})",
            )
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(out.loss).backward()
        self.scaler.step(self.optimizer)  # without fp16: a plain step
        self.scaler.update()
        state.iteration += 1
        self.summary.run_iterations += 1
        self.summary.images += images_total
        self.summary.last_losses = {"loss": loss, "loss_cls": loss_cls, "loss_bbox": loss_bbox, "loss_iou": loss_iou}
        return {
            "iter": state.iteration,
            "epoch": epoch + 1,
            "batch": state.batch_in_epoch,
            "lr": lr,
            "loss": loss,
            "loss_cls": loss_cls,
            "loss_bbox": loss_bbox,
            "loss_iou": loss_iou,
            "num_pos": num_pos_total,
            "num_pos_per_image": [int(v) for v in num_pos],
            "num_ill_defined": int(out.num_ill_defined.sum()),
            "files": list(batch.file_names),
            "skipped": [name for name, _ in batch.skipped],
        }

    def _agree_batch(self, batch: TrainBatch, epoch: int, stop: StopRequest) -> bool:
        """DDP, before the forward pass (DDP's forward may communicate): whether every rank has a readable
        image (else every rank skips this step, so the gradient reductions stay paired); a pending Ctrl-C or
        SIGTERM on any rank becomes ``stop.requested`` on all."""
        all_have_batch, any_stop, any_term = self.dist.agree_step(len(batch) > 0, stop.pending, stop.terminated)
        stop.agreed(any_stop, any_term)
        if not all_have_batch and self.dist.is_main:
            self.log(
                f"warning: iteration {self.state.iteration + 1} (epoch {epoch + 1}, batch "
                f"{self.state.batch_in_epoch}) skipped on every rank: a rank's batch held no readable image"
            )
        return all_have_batch

    def _agree_losses(
        self, losses: tuple[float, float, float, float], num_pos: int, batch: TrainBatch, epoch: int, lr: float
    ) -> tuple[tuple[float, float, float, float], int, int]:
        """DDP, before the backward pass: the losses averaged over the ranks, the positives and the images
        summed. A non-finite loss on any rank stops every rank before the weights change."""
        agreed = self.dist.agree_losses(losses, num_pos, len(batch))
        if not agreed.finite:
            if not all(math.isfinite(v) for v in losses):
                raise self._not_finite(
                    batch,
                    epoch,
                    lr,
                    "the loss is not finite (loss {}, loss_cls {}, loss_bbox {}, loss_iou {})".format(*losses),
                )
            raise TrainingError(
                f"iteration {self.state.iteration + 1} (epoch {epoch + 1}): another rank's loss is not "
                f"finite; stopped before updating the weights"
            )
        return agreed.losses, agreed.num_pos, agreed.images

    def _not_finite(self, batch: TrainBatch, epoch: int, lr: float, what: str) -> TrainingError:
        return TrainingError(
            f"iteration {self.state.iteration + 1} (epoch {epoch + 1}, lr {lr:.3g}): {what} on "
            f"{', '.join(batch.file_names)}; stopped before updating the weights, {self._kept()}; try a lower --lr"
        )

    def _end_epoch(self) -> None:
        """Validation (when due), then ``epoch_N.pth``, ``latest.pth`` and ``best.pth``."""
        config, state = self.config, self.state
        finished = state.epoch + 1
        improved = False
        if (
            self.val_set is not None
            and self.dist.is_main
            and (finished % config.val_interval == 0 or finished == config.epochs)
        ):
            result = self._validate()
            self._append_row({"epoch": finished, "iter": state.iteration, **result.to_row()})
            self.log(
                f"epoch {finished}: val AP {result.ap:.4f} (AP50 {result.stats['AP50']:.4f}) "
                f"on {result.images} images in {result.seconds:.1f} s"
            )
            if state.best_ap is None or result.ap > state.best_ap:
                state.best_ap, state.best_epoch, improved = result.ap, finished, True
        state.epoch, state.batch_in_epoch = finished, 0
        self.summary.epochs = finished
        if self.dist.is_main:  # rank 0 alone validates and writes; the others wait here
            self._check_weights()
            with self._writing():
                self.metrics.sync()
                full = self.checkpoint()
                # epoch_N.pth (and best.pth): the weights and meta only; latest.pth: all that resume needs
                path = save_checkpoint(self.out / epoch_name(finished), weights_only(full))
                self.saved = save_checkpoint(self.out / LATEST_NAME, full)
                self.last_save = time.monotonic()
                if improved:
                    link_or_copy(path, self.out / BEST_NAME)
            self._plot()
        self.dist.barrier()
        self.hooks.after_epoch(self)

    def _plot(self) -> Path | None:
        """(Re)write ``metrics.png`` from the rows so far: after every epoch, on Ctrl-C / SIGTERM and at the end."""
        if not self.metrics.rows:
            return None
        with self._writing():
            return plot_metrics(self.metrics.rows, self.out / PLOT_NAME)

    def _validate(self) -> Any:
        from paadet.train.validation import validate

        try:
            return validate(
                self.net,
                self.val_set,
                device=self.device,
                scale=self.config.inference_scale,
                batch_size=self.config.batch_size,
                workers=self.config.workers,
                progress=self.config.progress,
                log=self.log,
            )
        finally:
            self.net.train()

    def _finish(self) -> TrainSummary:
        summary, state = self.summary, self.state
        with self._writing():
            self.metrics.close()
        summary.iterations, summary.epochs = state.iteration, state.epoch
        summary.best_ap, summary.best_epoch = state.best_ap, state.best_epoch
        summary.checkpoint = self.out / LATEST_NAME if (self.out / LATEST_NAME).is_file() else None
        if self.metrics.rows and self.dist.is_main:
            summary.plot = self._plot()
            if summary.plot is None:
                self.log(f"no {PLOT_NAME}: matplotlib is not installed (pip install 'paadet[train]')")
        self.hooks.after_train(self, summary)
        return summary
