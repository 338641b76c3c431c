"""Starting a training run: :func:`train` checks the settings, joins the process group (under torchrun), reads
the data and the checkpoint to resume (refusing other settings or other data: the annotation files' sha256 is
recorded in the checkpoint), clears the temporaries an interrupted write left, builds the network and the
optimiser, and runs the :class:`~paadet.train.loop.Trainer` with the caller's hooks."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from paadet.classes import ClassList
from paadet.console import stderr
from paadet.data.coco import DatasetError
from paadet.fileio import OutputWriteError, check_output_dir, sha256_file
from paadet.model import PAANet
from paadet.model.paa import depth_of_state_dict
from paadet.train.checkpointer import LATEST_NAME, TrainState, read_checkpoint, remove_stale_temporaries, restore_rng
from paadet.train.config import TrainConfig, TrainingError
from paadet.train.dataset import CocoTrainDataset
from paadet.train.ddp import Distributed, NullMetrics, start_distributed
from paadet.train.hooks import TrainHook
from paadet.train.init import build_train_model, trainable_parameters
from paadet.train.loop import Trainer
from paadet.train.metrics import METRICS_NAME, MetricsLog
from paadet.train.optim import build_optimizer
from paadet.train.summary import TrainSummary


@contextlib.contextmanager
def _torch_settings(threads: int, deterministic: bool) -> Iterator[None]:
    """Set torch's CPU threads and deterministic algorithms for the run; restore them afterwards."""
    previous = (
        torch.get_num_threads(),
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    torch.set_num_threads(threads)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.set_num_threads(previous[0])
        torch.use_deterministic_algorithms(previous[1], warn_only=previous[2])


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


DATA_HASHES = "data_sha256"
"""The key of ``meta.settings`` that records the sha256 of the training (``ann_file``) and validation
(``val_ann``) annotation files, so that ``--resume`` refuses a file that changed at the same path."""


def _data_hashes(config: TrainConfig) -> dict[str, str | None]:
    """The sha256 of the annotation files (None for a file that is not given or not there: the dataset's own
    checks say so)."""
    hashes: dict[str, str | None] = {}
    for key in ("ann_file", "val_ann"):
        path = getattr(config, key)
        hashes[key] = sha256_file(path) if path is not None and Path(path).is_file() else None
    return hashes


def _check_same_data(
    config: TrainConfig, latest: Path, stored: dict[str, Any], hashes: dict[str, str | None], log: Callable[[str], None]
) -> None:
    """Refuse to resume on annotation files whose content differs from the run's own (the validation file too,
    when both runs validate). A checkpoint from before the hashes were recorded is checked by path only."""
    recorded = stored.get(DATA_HASHES)
    if not isinstance(recorded, dict):
        log(
            f"warning: {latest} records no content hash of its annotation files (written by an older paadet): "
            "only their paths are compared, a file changed in place is not detected"
        )
        return
    for key, what in (("ann_file", "training"), ("val_ann", "validation")):
        old, new = recorded.get(key), hashes.get(key)
        if old is not None and new is not None and old != new:
            raise TrainingError(
                f"{latest}: the {what} data changed since this run started: {getattr(config, key)} is not the "
                f"file it was trained on (sha256 {old[:12]}..., now {new[:12]}...); --resume continues a run on "
                "its own data only, start a new --output-dir to train on this one"
            )


def _check_validation_categories(config: TrainConfig, val_set: Any, classes: ClassList, log: Callable[[str], None]):
    """Refuse a validation set whose categories are none of the training set's (its AP would be 0, as ``paadet
    eval`` refuses it); warn when only some are."""
    val_ids = [int(c["id"]) for c in val_set.coco.dataset["categories"]]
    train_ids = set(classes.category_ids)
    if not any(i in train_ids for i in val_ids):
        raise DatasetError(
            f"{config.val_ann}: none of its category ids ({', '.join(map(str, sorted(val_ids)[:20]))}) is one of "
            f"the training set's ({', '.join(map(str, sorted(train_ids)[:20]))}, from {config.ann_file}): "
            "validation would score AP 0; map the validation categories to the training ids"
        )
    if set(val_ids) != train_ids:
        log(
            f"warning: {config.val_ann} lists category ids {sorted(val_ids)}, the training set "
            f"{sorted(train_ids)}: categories the model does not predict score AP 0"
        )


def _datasets(
    config: TrainConfig, log: Callable[[str], None], with_validation: bool = True
) -> tuple[CocoTrainDataset, ClassList, Any]:
    """The training set, its classes (the annotation file's categories, in its order) and the validation set
    (None without one, or when not ``with_validation``: DDP ranks other than 0, which still check its categories
    so that every rank refuses a mismatch)."""
    dataset = CocoTrainDataset(
        config.ann_file, config.image_dir, scale=config.scale, flip_prob=config.flip_prob, seed=config.seed
    )
    for warning in dataset.warnings:
        log(f"warning: {warning}")
    if dataset.dropped:
        log(f"{len(dataset.dropped)} images left out by mmdetection's filter (no annotations, or under 32 px)")
    classes = ClassList(tuple(str(c) for c in dataset.classes), tuple(int(i) for i in dataset.category_ids))
    val_set = None
    if config.val_ann is not None:
        from paadet.train.validation import load_validation_set

        val_set = load_validation_set(config.val_ann, config.val_images)
        _check_validation_categories(config, val_set, classes, log if with_validation else lambda _: None)
    return dataset, classes, val_set if with_validation else None


def _network(
    config: TrainConfig, classes: ClassList, resume_ckpt: dict[str, Any] | None, log: Callable[[str], None]
) -> tuple[PAANet, dict[str, Any], str | None]:
    """The network to train (from the checkpoint being resumed, at its own depth, or initialised as ``config``
    says), how it was initialised, and the note about it worth printing (or None)."""
    if resume_ckpt is not None:
        depth = depth_of_state_dict(resume_ckpt["state_dict"]) or 50
        if config.depth is not None and config.depth != depth:
            raise TrainingError(
                f"{config.output_path / LATEST_NAME}: the run trains a ResNet-{depth}, not the ResNet-{config.depth} "
                f"of --depth {config.depth}; resume it without --depth (or with --depth {depth})"
            )
        net = PAANet(
            num_classes=len(classes),
            depth=depth,
            trainable=True,
            frozen_stages=config.frozen_stages,
            norm_eval=not config.bn_train,
        )
        net.load_state_dict(resume_ckpt["state_dict"], strict=True)
        return net, dict(resume_ckpt["meta"].get("init", {})), None
    net, report = build_train_model(
        len(classes),
        config.init,
        config.init_file,
        seed=config.seed,
        frozen_stages=config.frozen_stages,
        norm_eval=not config.bn_train,
        class_names=classes.names,
        depth=config.depth,
    )
    if report.note:
        log(report.note)
    return net, {"mode": report.mode, "source": report.source}, report.note


def train(
    config: TrainConfig, log: Callable[[str], None] | None = None, hooks: Iterable[TrainHook] = ()
) -> TrainSummary:
    """Train PAA as ``config`` says; returns the :class:`TrainSummary`.

    Args:
        config: the settings.
        log: where warnings and notes go (default: stderr, above the progress bar).
        hooks: :class:`~paadet.train.hooks.TrainHook` s called at the loop's fixed points (on every rank).

    Raises:
        TrainingError: inconsistent settings, a folder that already holds a run (without ``resume``), a
            run that cannot be resumed with these settings, or a non-finite loss (the message names the
            iteration and the batch's files; the last good checkpoint is kept).
        DatasetError, CheckpointError, OutputPathError: an unusable dataset, checkpoint or output folder.
        KeyboardInterrupt: Ctrl-C, after ``latest.pth`` was saved.
        TrainingTerminated: SIGTERM (a ``KeyboardInterrupt``), after ``latest.pth`` was saved.
        OutputWriteError: an output could not be written (a full disk): at the first failed write, naming the
            file; the last good checkpoint is kept.

    Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) each process joins the process group and
    trains its shard as DDP (:mod:`paadet.train.ddp`); ``config.world_size`` is set from it.
    """
    log = log or stderr
    config.validate()
    dist = start_distributed(config.device, config.dist_timeout_s)
    try:
        return _train(dataclasses.replace(config, world_size=dist.world_size), dist, dist.rank_log(log), hooks)
    finally:
        dist.close()


def _train(
    config: TrainConfig, dist: Distributed, log: Callable[[str], None], hooks: Iterable[TrainHook] = ()
) -> TrainSummary:
    """:func:`train` once the process group (if any) is up."""
    out = check_output_dir(config.output_dir, "--output-dir")
    latest = out / LATEST_NAME
    if not config.resume and latest.exists():
        raise TrainingError(
            f"{out} already holds a training run ({LATEST_NAME}); continue it with --resume "
            f"or choose another --output-dir"
        )
    resume_ckpt = _resume_checkpoint(config, latest) if config.resume else None
    hashes = _data_hashes(config)
    if resume_ckpt is not None:
        _check_same_data(config, latest, resume_ckpt["meta"].get("settings", {}), hashes, log)
    if dist.is_main:
        removed = remove_stale_temporaries(out)
        if removed:
            log(
                f"removed {len(removed)} temporary files ({sum(n for _, n in removed) / 2**20:.1f} MiB) that an "
                f"interrupted write left in {out}: {', '.join(name for name, _ in removed[:3])}"
                + (", ..." if len(removed) > 3 else "")
            )
    chosen_here = config.channels_last is None and resume_ckpt is None
    config = config.resolved(resume_ckpt["meta"].get("settings", {}) if resume_ckpt is not None else None)
    if chosen_here and config.channels_last:
        log("channels-last memory format: the default with --amp bf16 on a CPU (--no-channels-last for NCHW)")
    device = dist.device
    dataset, classes, val_set = _datasets(config, log, with_validation=dist.is_main)
    state, threads, settings = TrainState(), config.threads, config.settings()
    settings[DATA_HASHES] = hashes
    if resume_ckpt is not None:
        meta = resume_ckpt["meta"]
        state = TrainState.from_plain(meta.get("train_state", {}))
        stored = meta.get("dataset_meta", {})
        if stored != classes.to_meta():
            raise TrainingError(
                f"{latest}: was trained on other classes ({len(stored.get('classes', []))}) than "
                f"{config.ann_file} lists ({len(classes)})"
            )
        if threads is None:
            threads = state.threads
        elif state.threads is not None and threads != state.threads:
            log(
                f"warning: {threads} threads where the run used {state.threads}: "
                "the weights will differ in the last bits"
            )
        # the run's own start and recipe, not this call's (empty) initialisation flags
        settings.update(init=meta["settings"].get("init"), init_file=meta["settings"].get("init_file"))
        settings["recipe"] = meta["settings"].get("recipe", settings["recipe"])
        log(
            f"resuming {latest}: {state.iteration} iterations done, continuing epoch {state.epoch + 1} "
            f"after its batch {state.batch_in_epoch}"
        )
    state.threads = threads or torch.get_num_threads()
    with _torch_settings(state.threads, config.deterministic):
        net, init_info, init_note = _network(config, classes, resume_ckpt, log)
        settings["depth"] = net.depth  # the depth built (the file's, when --depth was left out)
        net.classes = classes
        net.to(device)
        if config.channels_last:
            net.to(memory_format=torch.channels_last)
        optimizer = build_optimizer(
            config.optimizer,
            trainable_parameters(net),
            lr=config.lr,
            momentum=config.momentum,
            weight_decay=config.weight_decay,
        )
        if resume_ckpt is not None:
            optimizer.load_state_dict(resume_ckpt["optimizer"])
            restore_rng(resume_ckpt["rng"])
        metrics = (
            MetricsLog(out / METRICS_NAME, keep_upto=(state.iteration, state.epoch) if resume_ckpt else None)
            if dist.is_main
            else NullMetrics()
        )
        trainer = Trainer(
            config,
            settings,
            net,
            classes,
            dataset,
            optimizer,
            state,
            init_info,
            device,
            metrics,
            val_set,
            log,
            dist,
            hooks,
        )
        if resume_ckpt is not None and "scaler" in resume_ckpt:
            trainer.scaler.load_state_dict(resume_ckpt["scaler"])
        try:
            summary = trainer.run()
        except BaseException:
            with contextlib.suppress(OutputWriteError):  # the run's own error is the one to report
                metrics.close()
            raise
        metrics.close()
        summary.init_note = init_note
        return summary
