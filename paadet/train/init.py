"""The network a training run starts from: mmdetection's initialisation, a torchvision backbone, or a PAA checkpoint.

mmdetection 3.3 initialises ``paa_r50_fpn_1x_coco`` as follows (mmengine applies a parent's
``init_cfg`` before its children's, so the last rule listed for a tensor wins):

* head (``ATSSHead`` ``init_cfg``): ``Normal(0, 0.01)`` on every ``Conv2d`` with bias 0, then
  ``atss_cls`` again ``Normal(0, 0.01)`` with bias ``-log((1 - 0.01) / 0.01)`` (about -4.595). The
  GroupNorms keep PyTorch's weight 1, bias 0; the ``Scale`` s are 1.0.
* neck (``FPN`` ``init_cfg``): Xavier uniform (gain 1) on every ``Conv2d``, bias 0.
* backbone from ImageNet (the recipe): torchvision's ``resnet50`` weights (``fc.*`` unused); the R-101 configs
  torchvision's ``resnet101``, the rest unchanged.
* backbone from scratch (``ResNet`` with no ``init_cfg``): Kaiming normal (``fan_out``, ReLU) on every
  ``Conv2d``, BatchNorm weight 1 and bias 0, then ``zero_init_residual``: each bottleneck's ``bn3``
  weight and bias 0.

All random draws come from one CPU generator seeded by the caller, so a seed gives the same network.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from paadet.checkpoint import Checkpoint, CheckpointError, key_mismatch_report, load_checkpoint, load_state_dict
from paadet.classes import ClassList
from paadet.errors import one_line
from paadet.model import PAANet
from paadet.model.build import checkpoint_depth
from paadet.model.resnet import STAGE_BLOCKS, Bottleneck
from paadet.train.config import INIT_MODES

__all__ = [
    "CLS_PRIOR_PROB",
    "InitReport",
    "build_train_model",
    "cls_bias_init",
    "init_backbone_from_scratch",
    "init_cls_branch",
    "init_head",
    "init_neck",
    "load_paa_checkpoint",
    "load_torchvision_backbone",
    "torchvision_backbone_state",
    "trainable_parameters",
]

CLS_PRIOR_PROB = 0.01
"""The prior probability mmdetection's ``bias_init_with_prob`` gives ``atss_cls``."""


def cls_bias_init(prior_prob: float = CLS_PRIOR_PROB) -> float:
    """``-log((1 - p) / p)``: the logit whose sigmoid is ``p`` (mmcv's ``bias_init_with_prob``); -4.5951 for 0.01."""
    return float(-math.log((1 - prior_prob) / prior_prob))


def _normal_conv(conv: nn.Conv2d, generator: torch.Generator, std: float = 0.01, bias: float = 0.0) -> None:
    nn.init.normal_(conv.weight, 0.0, std, generator=generator)
    if conv.bias is not None:
        nn.init.constant_(conv.bias, bias)


@torch.no_grad()
def init_cls_branch(net: PAANet, generator: torch.Generator) -> None:
    """Re-initialise ``bbox_head.atss_cls`` as mmdetection does: weight ``Normal(0, 0.01)``, bias ``-log(99)``."""
    _normal_conv(net.bbox_head.atss_cls, generator, bias=cls_bias_init())


@torch.no_grad()
def init_head(net: PAANet, generator: torch.Generator) -> None:
    """ATSSHead's initialisation: every conv ``Normal(0, 0.01)`` with bias 0 (``atss_cls``: bias ``-log(99)``),
    GroupNorm weight 1 / bias 0, every ``Scale`` 1.0."""
    head = net.bbox_head
    for module in head.modules():
        if isinstance(module, nn.Conv2d):
            _normal_conv(module, generator)
        elif isinstance(module, nn.GroupNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    for scale in head.scales:
        scale.scale.fill_(1.0)
    init_cls_branch(net, generator)


@torch.no_grad()
def init_neck(net: PAANet, generator: torch.Generator) -> None:
    """FPN's initialisation: Xavier uniform (gain 1) on every conv weight, bias 0."""
    for module in net.neck.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.xavier_uniform_(module.weight, gain=1.0, generator=generator)
            if module.bias is not None:
                nn.init.zeros_(module.bias)


@torch.no_grad()
def init_backbone_from_scratch(net: PAANet, generator: torch.Generator) -> None:
    """mmdetection's default ResNet initialisation (no pretrained weights).

    Kaiming normal (``a=0``, ``fan_out``, ReLU) on every conv, BatchNorm weight 1 / bias 0 and
    running statistics reset, then each bottleneck's ``bn3`` weight and bias 0 (``zero_init_residual``).
    """
    backbone = net.backbone
    for module in backbone.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, a=0, mode="fan_out", nonlinearity="relu", generator=generator)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            module.reset_running_stats()
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    for module in backbone.modules():
        if isinstance(module, Bottleneck):
            nn.init.zeros_(module.bn3.weight)
            nn.init.zeros_(module.bn3.bias)


def torchvision_backbone_state(path: str | os.PathLike) -> tuple[dict[str, Tensor], int | None]:
    """torchvision's ImageNet ResNet file (``resnet50-*.pth``, ``resnet101-*.pth``) as backbone keys, and its
    depth (50 or 101 from the number of ``layer3`` blocks, 6 or 23; None for another count).

    Its keys are the backbone's (``conv1.weight``, ``layer1.0.bn1.running_mean``, ...); the classifier
    ``fc.*`` is dropped. A file with a ``backbone.`` prefix on every key (a detector's backbone) is
    accepted too.

    Raises:
        CheckpointError: unreadable file.
    """
    state = load_state_dict(path)
    if all(key.startswith("backbone.") for key in state):
        state = {key[len("backbone.") :]: value for key, value in state.items()}
    state = {key: value for key, value in state.items() if not key.startswith("fc.")}
    blocks = len({key.split(".", 2)[1] for key in state if key.startswith("layer3.")})
    depth = next((d for d, stages in STAGE_BLOCKS.items() if stages[2] == blocks), None)
    return state, depth


def load_torchvision_backbone(net: PAANet, path: str | os.PathLike, state: dict[str, Tensor] | None = None) -> None:
    """Load torchvision's ImageNet ResNet file of ``net``'s depth (``resnet50-*.pth`` or ``resnet101-*.pth``) into
    ``net.backbone``, strictly (``state``: the file as :func:`torchvision_backbone_state` read it already).

    Raises:
        CheckpointError: unreadable file, or keys / shapes that do not match the ResNet.
    """
    if state is None:
        state, _ = torchvision_backbone_state(path)
    report = key_mismatch_report(state, net.backbone.state_dict())
    if report is not None:
        raise CheckpointError(f"{path}: not torchvision's ResNet-{net.depth} weights (--backbone): {report}")
    net.backbone.load_state_dict(state, strict=True)


def load_paa_checkpoint(net: PAANet, path: str | os.PathLike | Checkpoint) -> tuple[int, tuple[str, ...] | None]:
    """Load a PAA checkpoint (a file, or one :func:`~paadet.checkpoint.load_checkpoint` read) into ``net``;
    ``atss_cls`` is skipped when the class counts differ.

    Returns:
        The checkpoint's number of classes (``net.num_classes`` when they agree; when it differs,
        ``atss_cls`` keeps the weights ``net`` already has and the caller initialises them), and the
        class names of its ``meta.dataset_meta`` (COCO's for an 80-class file without any; None when
        it names none).

    Raises:
        CheckpointError: unreadable file, or keys / shapes that do not match a PAA R50-FPN or R101-FPN
            (``net``'s; other than ``atss_cls``'s class count).
    """
    checkpoint = path if isinstance(path, Checkpoint) else load_checkpoint(path)
    path = checkpoint.path
    state = checkpoint.state_dict
    expected = net.state_dict()
    cls_key = "bbox_head.atss_cls.weight"
    if cls_key not in state:
        report = key_mismatch_report(state, expected)
        raise CheckpointError(f"{path}: not a PAA checkpoint (--checkpoint): {report}")
    ckpt_classes = int(state[cls_key].shape[0])
    if ckpt_classes != net.num_classes:
        state = {k: v for k, v in state.items() if not k.startswith("bbox_head.atss_cls.")}
        expected = {k: v for k, v in expected.items() if not k.startswith("bbox_head.atss_cls.")}
    report = key_mismatch_report(state, expected)
    if report is not None:
        raise CheckpointError(f"{path}: checkpoint does not match PAA R{net.depth}-FPN (--checkpoint): {report}")
    try:
        net.load_state_dict(state, strict=ckpt_classes == net.num_classes)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: cannot load into PAANet: {one_line(exc)}") from exc
    try:
        names = ClassList.from_meta(checkpoint.meta, ckpt_classes).names
    except (TypeError, ValueError):
        names = None
    return ckpt_classes, names


@dataclass
class InitReport:
    """How the network was initialised: ``mode`` (checkpoint / backbone / scratch), the file, and a
    note for the log (e.g. that ``atss_cls`` was re-initialised for another class count)."""

    mode: str
    source: str | None
    note: str | None = None


def build_train_model(
    num_classes: int,
    mode: str,
    path: str | os.PathLike | None = None,
    *,
    seed: int = 0,
    frozen_stages: int = 1,
    norm_eval: bool = True,
    class_names: tuple[str, ...] | None = None,
    depth: int | None = None,
) -> tuple[PAANet, InitReport]:
    """A trainable :class:`PAANet` initialised as a training run starts.

    Args:
        num_classes: classes of the dataset.
        mode: ``checkpoint`` (a PAA checkpoint at ``path``; ``atss_cls`` re-initialised when its class
            count differs), ``backbone`` (torchvision's ResNet-50 or ResNet-101 at ``path``, the rest
            initialised as mmdetection does) or ``scratch`` (everything initialised as mmdetection does).
        path: the file for ``checkpoint`` / ``backbone``.
        depth: the ResNet's depth, 50 or 101; None: the file's (from its keys), 50 from scratch. Given, a file
            of another depth is refused.
        seed: seed of the generator every random initialisation draws from.
        frozen_stages, norm_eval: see :class:`PAANet`.
        class_names: the dataset's classes; when a checkpoint has as many under other names, the
            report's note says so (its classifier is kept, as mmdetection's ``load_from`` keeps it).

    Raises:
        ValueError: unknown ``mode`` or a missing ``path``.
        CheckpointError: the file cannot be used, or is of another depth than ``depth``.
    """
    if mode not in INIT_MODES:
        raise ValueError(f"unknown initialisation {mode!r}; choose one of {', '.join(INIT_MODES)}")
    if mode != "scratch" and path is None:
        raise ValueError(f"initialisation {mode!r} needs a file")
    generator = torch.Generator().manual_seed(seed)
    checkpoint, backbone_state = None, None
    if mode == "checkpoint":
        checkpoint = load_checkpoint(path)
        depth = _agreed_depth(depth, checkpoint_depth(checkpoint), path, "a PAA R{}-FPN checkpoint")
    elif mode == "backbone":
        backbone_state, file_depth = torchvision_backbone_state(path)
        depth = _agreed_depth(depth, file_depth, path, "torchvision's ResNet-{} weights")
    net = PAANet(
        num_classes=num_classes, depth=depth or 50, trainable=True, frozen_stages=frozen_stages, norm_eval=norm_eval
    )
    note = None
    if checkpoint is not None:
        ckpt_classes, stored = load_paa_checkpoint(net, checkpoint)
        if ckpt_classes != num_classes:
            init_cls_branch(net, generator)
            note = (
                f"{Path(path).name} has {ckpt_classes} classes, the dataset {num_classes}: bbox_head.atss_cls "
                f"re-initialised (Normal(0, 0.01), bias {cls_bias_init():.3f}); every other weight loaded"
            )
        elif class_names is not None and stored is not None and tuple(stored) != tuple(class_names):
            renamed = [f"{a!r} -> {b!r}" for a, b in zip(stored, class_names, strict=False) if a != b]
            note = (
                f"{Path(path).name} has {ckpt_classes} classes like the dataset, under other names "
                f"({', '.join(renamed[:3])}{', ...' if len(renamed) > 3 else ''}): its classifier is kept, "
                f"label i now means the dataset's i-th category"
            )
    else:
        if mode == "backbone":
            load_torchvision_backbone(net, path, backbone_state)
        else:
            init_backbone_from_scratch(net, generator)
        init_neck(net, generator)
        init_head(net, generator)
    return net, InitReport(mode=mode, source=None if path is None else str(path), note=note)


def _agreed_depth(depth: int | None, file_depth: int | None, path: str | os.PathLike, what: str) -> int | None:
    """The depth to build: the file's, unless ``depth`` is given (then they must agree). None when neither
    is known (a file of no known depth: loading it names what does not match). ``what``: the file's kind, with
    ``{}`` for its depth."""
    if depth is not None and file_depth is not None and depth != file_depth:
        raise CheckpointError(
            f"{path}: {what.format(file_depth)}, but --depth {depth} asks for a ResNet-{depth}; "
            f"give --depth {file_depth} (or leave it out) or a ResNet-{depth} file"
        )
    return file_depth if depth is None else depth


def trainable_parameters(net: nn.Module) -> list[Tensor]:
    """The parameters that take gradients (the frozen stages excluded), in ``named_parameters`` order."""
    return [p for p in net.parameters() if p.requires_grad]
