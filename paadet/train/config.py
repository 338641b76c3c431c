"""The settings of a training run: one :class:`TrainConfig`, with one of mmdetection's PAA recipes as defaults
(:data:`paadet.zoo.RECIPES`: ``1x``, ``1.5x``, ``2x``, ``ms-3x``)."""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from paadet.errors import PaadetError
from paadet.zoo import RECIPES

__all__ = [
    "AMP_MODES",
    "DEPTHS",
    "INIT_MODES",
    "MAX_DIST_TIMEOUT_S",
    "MAX_SCALE",
    "OPTIMIZERS",
    "RESUME_KEYS",
    "Scale",
    "TrainConfig",
    "TrainingError",
    "inference_scale",
]

Scale = tuple[int, int]
"""``(long, short)``: a keep-ratio resize fits the image within ``long`` on its long side and ``short`` on its short
side (mmcv's ``rescale_size`` takes the larger and the smaller number, in either order)."""

DEPTHS = (50, 101)
"""The ResNet depths paadet builds (:data:`paadet.model.resnet.STAGE_BLOCKS`)."""

INIT_MODES = ("checkpoint", "backbone", "scratch")
"""Where the weights come from: a PAA checkpoint, torchvision's ImageNet ResNet-50 or -101, or nothing."""

AMP_MODES = ("bf16", "fp16")
"""Mixed precision: the network's forward pass under autocast in bfloat16 (CPU and CUDA) or float16 (CUDA,
with a gradient scaler); the targets, the assignment and the losses always run in float32."""

OPTIMIZERS = ("sgd", "adamw")
"""``sgd``: momentum SGD with L2 weight decay (mmdetection's PAA recipe). ``adamw``: Adam with decoupled
weight decay (betas 0.9, 0.999), which converges in fewer steps from scratch (:mod:`paadet.train.optim`)."""

MAX_SCALE = 4096
"""The largest side ``--scale`` takes, a chosen bound: an image resized to 4096x4096 already has 16x the pixels of
the recipe's 1333x800, and training memory grows with the pixels (activations, the GMM's candidates);
99999x99999 made OpenCV ask for 30 GB for the resized image alone."""

MAX_DIST_TIMEOUT_S = 30 * 86400.0
"""The longest ``--dist-timeout`` (30 days): longer ones overflow the process group's timeout."""

RESUME_KEYS = (
    "ann_file",
    "image_dir",
    "scale",
    "flip_prob",
    "batch_size",
    "shuffle",
    "seed",
    "optimizer",
    "lr",
    "momentum",
    "weight_decay",
    "lr_steps",
    "warmup_iters",
    "warmup_ratio",
    "bn_train",
    "frozen_stages",
    "amp",
    "channels_last",
    "world_size",
)
"""The settings a resumed run must share with the run it continues (they change the weights it ends with).
``epochs`` and ``max_iters`` may grow; the device, workers, validation and progress bar may change. The
world size (processes under torchrun) changes each process's batches, so it must stay too. ``recipe`` is not one:
what it sets is (``lr_steps``, ``scale``). The depth is the resumed checkpoint's own (a ``depth`` given must agree)."""


class TrainingError(PaadetError):
    """A training run that cannot start or continue (a bad setting, a non-finite loss, a run that does not resume)."""


@dataclass
class TrainConfig:
    """Everything a training run needs; the defaults are mmdetection's ``paa_r50_fpn_1x_coco`` recipe, and
    ``recipe`` gives ``epochs``, ``lr_steps`` and ``scale`` another recipe's values where they are left None.

    Attributes:
        ann_file: COCO ``instances`` annotation file of the training set.
        image_dir: the folder its ``file_name`` entries are relative to.
        output_dir: where ``metrics.jsonl``, the checkpoints and ``metrics.png`` go.
        init: ``checkpoint`` (a PAA checkpoint in ``init_file``; for another class count ``atss_cls`` is
            re-initialised), ``backbone`` (torchvision's ImageNet ResNet-50 or ResNet-101 ``.pth`` in
            ``init_file``) or ``scratch``. Ignored when resuming.
        init_file: the file for ``checkpoint`` / ``backbone``.
        depth: the ResNet's depth, 50 or 101. None: the init file's (a PAA checkpoint's or torchvision's
            backbone's, from its keys), 50 from scratch, the run's own when resuming; given, it must agree with
            the file. The checkpoints record the depth built (``meta.settings.depth``).
        recipe: the mmdetection schedule (:data:`paadet.zoo.RECIPES`) that ``epochs``, ``lr_steps`` and
            ``scale`` default to: ``1x`` (12 epochs, steps 8, 11, 1333x800), ``1.5x`` (18; 12, 16), ``2x``
            (24; 16, 22) or ``ms-3x`` (36; 28, 34; each image's scale drawn in 1333x640..1333x800).
        scale: the keep-ratio training resize: one :data:`Scale` ``(long_max, short_max)`` (mmdetection's
            ``Resize``), or two, the bounds each image's scale is drawn between (``RandomResize``, see
            :func:`paadet.train.dataset.random_resize_scale`). None: the recipe's.
        flip_prob: probability of the horizontal flip.
        batch_size: images per iteration (on this process).
        shuffle: shuffle each epoch (``False``: the annotation file's order).
        seed: seed of the order, the flips and the random initialisation.
        workers: image-loading threads (0: load in the training thread).
        lr: the lr after warm-up, for ``batch_size`` images per iteration. The recipe's 0.01 is for 16
            images per iteration (8 GPUs x 2); scale it linearly: 0.000625 x images per iteration.
        optimizer: ``sgd`` (the recipe's momentum SGD) or ``adamw`` (torch's AdamW, betas 0.9 and 0.999; for
            short from-scratch schedules): see :mod:`paadet.train.optim`.
        momentum: SGD's momentum (AdamW ignores it).
        weight_decay: SGD's L2 penalty or AdamW's decoupled decay, on every trainable parameter.
        epochs: epochs in all (None: the recipe's).
        lr_steps: epochs after which the lr is multiplied by 0.1 (None: the recipe's).
        warmup_iters, warmup_ratio: linear warm-up from ``warmup_ratio * lr`` over that many iterations.
        max_iters: stop after this many iterations in all (None: run every epoch).
        bn_train: train BatchNorm statistics (mmdetection's ``norm_eval=False``; for from-scratch runs).
            Off: every BatchNorm in eval mode, as in the recipe.
        frozen_stages: ResNet stages kept frozen (weights and BatchNorm): 1 (the recipe) freezes the stem and
            ``layer1``; 0 the stem only; -1 nothing (for from-scratch runs).
        amp: None (float32), ``bf16`` (autocast bfloat16, CPU or CUDA; AVX512-BF16 or AMX CPUs) or ``fp16`` (autocast
            float16 with a gradient scaler, CUDA only). The loss and the assignment stay in float32.
        channels_last: the network's weights and input batches in channels-last (NHWC) memory format: the
            same arithmetic with other kernels (oneDNN's NHWC convolutions on a CPU, tensor-core layouts on
            CUDA); values equal float32 rounding, not bit for bit. False: PyTorch's default NCHW. None (the
            default): on for ``amp="bf16"`` on a CPU, where oneDNN's bfloat16 convolutions want NHWC (2.15x a
            bf16 NCHW iteration at scale 1333x800, 800x800 inputs, on a Xeon with AMX, docs/benchmarks.md; the
            inference backend makes the same choice), off otherwise (float32 NCHW keeps mmdetection's numbers);
            a resumed run keeps its own. :meth:`resolved` turns None into True or False.
        device: ``cpu``, ``cuda`` or ``cuda:N``.
        resume: continue the run in ``output_dir`` from its ``latest.pth``.
        val_ann, val_images: a validation set (COCO format), evaluated every ``val_interval`` epochs
            and after the last one; ``best.pth`` is the checkpoint with the best AP.
        val_interval: epochs between validations.
        progress: show a progress bar per epoch.
        threads: torch's intra-op CPU threads (None: torch's default; a resumed run takes the stored one).
            Bit-identical resumes on the CPU need the same thread count.
        deterministic: ``torch.use_deterministic_algorithms(True, warn_only=True)`` during the run, for
            repeatable CUDA runs (slower). The CPU needs none of it for bit-identical resumes: its kernels
            are deterministic for a given thread count once MKL's reproducible mode is on, which importing
            ``paadet`` does (``MKL_CBWR=AUTO,STRICT``, unless set already). The flag also slows CPU inference
            down, so it is off by default.
        save_interval_iters: also write ``latest.pth`` every this many iterations (None: only by time).
        save_interval_s: also write ``latest.pth`` when this many seconds passed since the last write.
        loader: ``threads`` or ``processes`` (see :func:`paadet.train.loader.build_train_loader`).
        world_size: the processes training together (DDP under torchrun, see :mod:`paadet.train.ddp`);
            :func:`~paadet.train.train` sets it from ``WORLD_SIZE``; recorded so that a resume with
            another one is refused.
        dist_timeout_s: the process group's timeout under DDP: the longest a rank waits in a collective
            (a barrier while rank 0 validates included) before the run fails.
    """

    ann_file: str | os.PathLike
    image_dir: str | os.PathLike
    output_dir: str | os.PathLike
    init: str = "checkpoint"
    init_file: str | os.PathLike | None = None
    depth: int | None = None
    recipe: str = "1x"
    scale: Scale | tuple[Scale, Scale] | None = None
    flip_prob: float = 0.5
    batch_size: int = 2
    shuffle: bool = True
    seed: int = 0
    workers: int = 2
    optimizer: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    epochs: int | None = None
    lr_steps: tuple[int, ...] | None = None
    warmup_iters: int = 500
    warmup_ratio: float = 0.001
    max_iters: int | None = None
    bn_train: bool = False
    frozen_stages: int = 1
    amp: str | None = None
    channels_last: bool | None = None
    device: str = "cpu"
    resume: bool = False
    val_ann: str | os.PathLike | None = None
    val_images: str | os.PathLike | None = None
    val_interval: int = 1
    progress: bool = True
    threads: int | None = None
    deterministic: bool = False
    save_interval_iters: int | None = None
    save_interval_s: float = 600.0
    loader: str = "threads"
    world_size: int = 1
    dist_timeout_s: float = 1800.0

    def __post_init__(self) -> None:
        recipe = RECIPES.get(self.recipe)
        if recipe is None:
            raise TrainingError(f"unknown recipe {self.recipe!r}; choose one of {', '.join(RECIPES)}")
        if self.epochs is None:
            self.epochs = recipe.epochs
        if self.lr_steps is None:
            self.lr_steps = recipe.lr_steps
        if self.scale is None:
            self.scale = recipe.train_scales[0] if len(recipe.train_scales) == 1 else recipe.train_scales
        self.scale = _normalise_scale(self.scale)
        self.lr_steps = tuple(int(v) for v in self.lr_steps)
        self.validate()

    @property
    def train_scales(self) -> tuple[Scale, ...]:
        """``scale`` as one or two :data:`Scale` s (two: the range each image's scale is drawn from)."""
        return self.scale if isinstance(self.scale[0], tuple) else (self.scale,)  # type: ignore[return-value]

    @property
    def multi_scale(self) -> bool:
        """Whether each image's scale is drawn from a range (mmdetection's ``RandomResize``)."""
        return len(self.train_scales) > 1

    @property
    def inference_scale(self) -> Scale:
        """The scale validation runs at and the checkpoint records for inference (``meta.preset``): the training
        scale, or the largest of a range (each side's maximum: 1333x800 for 1333x640..1333x800, the test scale of
        mmdetection's ms-3x configs)."""
        return inference_scale(self.scale)

    def validate(self) -> None:
        """Raise :class:`TrainingError` (one line) for inconsistent settings."""

        def need(ok: bool, message: str) -> None:
            if not ok:
                raise TrainingError(message)

        need(self.init in INIT_MODES, f"unknown init {self.init!r}; choose one of {', '.join(INIT_MODES)}")
        if not self.resume:
            need(
                self.init == "scratch" or self.init_file is not None,
                f"init {self.init!r} needs a file (--checkpoint FILE or --backbone FILE)",
            )
        need(self.recipe in RECIPES, f"unknown recipe {self.recipe!r}; choose one of {', '.join(RECIPES)}")
        need(
            self.depth is None or self.depth in DEPTHS,
            f"depth must be one of {', '.join(map(str, DEPTHS))}, got {self.depth}",
        )
        scales = self.train_scales
        need(
            len(scales) in (1, 2) and all(len(s) == 2 and min(s) >= 1 for s in scales),
            f"scale must be two positive sizes, or two such pairs (a range), got {self.scale}",
        )
        for s in scales:
            need(
                max(s) <= MAX_SCALE,
                f"scale {s[0]}x{s[1]} cannot fit: each side must be at most {MAX_SCALE} px",
            )
        finite = [
            f"{name} {getattr(self, name)}"
            for name in ("flip_prob", "lr", "momentum", "weight_decay", "warmup_ratio", "dist_timeout_s")
            if not math.isfinite(getattr(self, name))
        ]
        need(not finite, f"{', '.join(finite)}: must be a finite number")
        need(0.0 <= self.flip_prob <= 1.0, f"flip_prob must be in [0, 1], got {self.flip_prob}")
        need(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        need(self.seed >= 0, f"seed must be >= 0, got {self.seed}")
        need(self.workers >= 0, f"workers must be >= 0, got {self.workers}")
        need(
            self.lr >= 0 and self.momentum >= 0 and self.weight_decay >= 0,
            f"lr, momentum and weight_decay must be >= 0, got {self.lr}, {self.momentum}, {self.weight_decay}",
        )
        need(self.momentum < 1, f"momentum must be below 1 (SGD diverges from 1 on), got {self.momentum}")
        need(
            self.optimizer in OPTIMIZERS, f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}"
        )
        need(self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}")
        need(
            all(s >= 1 for s in self.lr_steps) and list(self.lr_steps) == sorted(self.lr_steps),
            f"lr_steps must be increasing epochs >= 1, got {','.join(map(str, self.lr_steps))}",
        )
        need(self.warmup_iters >= 0, f"warmup_iters must be >= 0, got {self.warmup_iters}")
        need(0.0 <= self.warmup_ratio <= 1.0, f"warmup_ratio must be in [0, 1], got {self.warmup_ratio}")
        need(self.max_iters is None or self.max_iters >= 1, f"max_iters must be >= 1, got {self.max_iters}")
        need(
            (self.val_ann is None) == (self.val_images is None),
            "validation needs both --val-ann FILE and --val-images DIR",
        )
        need(self.val_interval >= 1, f"val_interval must be >= 1, got {self.val_interval}")
        need(-1 <= self.frozen_stages <= 4, f"frozen_stages must be in -1..4, got {self.frozen_stages}")
        need(
            self.amp is None or self.amp in AMP_MODES,
            f"unknown amp {self.amp!r}; choose one of {', '.join(AMP_MODES)} (or none for float32)",
        )
        need(
            self.amp != "fp16" or self.device.startswith("cuda"),
            "--amp fp16 needs a CUDA device (float16 on the CPU is slow and needs no scaler); "
            "on the CPU use --amp bf16",
        )
        need(self.threads is None or self.threads >= 1, f"threads must be >= 1, got {self.threads}")
        need(
            self.save_interval_iters is None or self.save_interval_iters >= 1,
            f"save_interval_iters must be >= 1, got {self.save_interval_iters}",
        )
        need(self.save_interval_s > 0, f"save_interval_s must be > 0, got {self.save_interval_s}")
        need(self.world_size >= 1, f"world_size must be >= 1, got {self.world_size}")
        need(
            0 < self.dist_timeout_s <= MAX_DIST_TIMEOUT_S,
            f"dist_timeout_s must be > 0 and at most {MAX_DIST_TIMEOUT_S:g}, got {self.dist_timeout_s}",
        )
        need(self.loader in ("threads", "processes"), f"loader must be threads or processes, got {self.loader!r}")

    @property
    def output_path(self) -> Path:
        return Path(self.output_dir)

    def settings(self) -> dict[str, Any]:
        """The settings as plain values (paths absolute, tuples as lists), for checkpoints and logs."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if (
                f.name in ("ann_file", "image_dir", "output_dir", "init_file", "val_ann", "val_images")
                and value is not None
            ):
                value = str(Path(value).resolve())
            elif isinstance(value, tuple):
                value = [list(v) if isinstance(v, tuple) else v for v in value]
            out[f.name] = value
        return out

    def resolved(self, stored: dict[str, Any] | None = None) -> TrainConfig:
        """A copy with ``channels_last`` decided: as given; else a resumed run's own (``stored``: its checkpoint's
        settings; runs from before the setting had NCHW); else on for bf16 autocast on a CPU, off otherwise."""
        if self.channels_last is not None:
            return dataclasses.replace(self)
        if stored is not None:
            return dataclasses.replace(self, channels_last=bool(stored.get("channels_last", False)))
        return dataclasses.replace(self, channels_last=self.amp == "bf16" and not self.device.startswith("cuda"))

    def resume_mismatches(self, stored: dict[str, Any]) -> list[str]:
        """``name: stored -> now`` for each of :data:`RESUME_KEYS` that differs from a checkpoint's settings
        (``channels_last`` None counts as the run's own, see :meth:`resolved`)."""
        now = self.resolved(stored).settings()
        defaults = {f.name: f.default for f in dataclasses.fields(self)}  # for checkpoints older than a setting
        defaults["channels_last"] = False  # runs from before the setting were NCHW
        one_x = RECIPES["1x"]  # runs from before the recipes had the 1x values
        defaults.update(scale=list(one_x.train_scales[0]), lr_steps=list(one_x.lr_steps))
        return [
            f"{key} {stored.get(key, defaults[key])!r} -> {now[key]!r}"
            for key in RESUME_KEYS
            if stored.get(key, defaults[key]) != now[key]
        ]


def inference_scale(scale: Any) -> Scale:
    """The inference scale of a training ``scale`` (one pair, or two as a range; lists too, as a checkpoint's
    settings hold them): the pair itself, or each side's maximum over the range
    (:attr:`TrainConfig.inference_scale`)."""
    values = _normalise_scale(scale)
    scales = values if isinstance(values[0], tuple) else (values,)
    return (max(s[0] for s in scales), max(s[1] for s in scales))  # type: ignore[index]


def _normalise_scale(scale: Any) -> Scale | tuple[Scale, Scale]:
    """``(l, s)`` or ``((l, s), (l, s))`` as integers (a list of two pairs, as a checkpoint stores it, too)."""
    values = tuple(scale)
    if values and all(isinstance(v, (tuple, list)) for v in values):
        return tuple(tuple(int(x) for x in v) for v in values)  # type: ignore[return-value]
    return tuple(int(v) for v in values)  # type: ignore[return-value]
