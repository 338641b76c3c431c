"""Building a :class:`PAANet` from a checkpoint file, with the class list that travels with it."""

from __future__ import annotations

import os

from paadet.checkpoint import Checkpoint, CheckpointError, load_checkpoint, load_weights
from paadet.classes import COCO_CLASSES, ClassList
from paadet.model.paa import PAANet, depth_of_state_dict
from paadet.model.resnet import STAGE_BLOCKS


def checkpoint_depth(checkpoint: Checkpoint) -> int:
    """The backbone depth of a PAA checkpoint (50 or 101), read from its keys: ``backbone.layer3`` has 6
    blocks in R-50 and 23 in R-101.

    Raises:
        CheckpointError: a backbone of another depth (the message counts its ``layer3`` blocks).
    """
    depth = depth_of_state_dict(checkpoint.state_dict)
    if depth is not None:
        return depth
    prefix = "backbone.layer3."
    blocks = len({key[len(prefix) :].split(".", 1)[0] for key in checkpoint.state_dict if key.startswith(prefix)})
    if blocks == 0:
        return 50  # no backbone keys at all: the strict load names what is missing
    known = ", ".join(f"R-{depth} has {stages[2]}" for depth, stages in STAGE_BLOCKS.items())
    raise CheckpointError(
        f"{checkpoint.path}: checkpoint does not match PAANet: its backbone.layer3 has {blocks} blocks ({known})"
    )


def load_network(path: str | os.PathLike | Checkpoint) -> PAANet:
    """A PAANet with the checkpoint's weights, sized to its head (80 classes or any other count) and to its
    backbone (R-50 or R-101, from its keys: no flag to give).

    The network's ``classes`` attribute is the checkpoint's :class:`~paadet.classes.ClassList`
    (``meta.dataset_meta``; COCO's 80 for the official file).

    Raises:
        CheckpointError: an unreadable, unsafe or mismatched checkpoint, or a class list that does not fit.
    """
    checkpoint = path if isinstance(path, Checkpoint) else load_checkpoint(path)
    classes = checkpoint.classes
    net = PAANet(num_classes=len(classes), depth=checkpoint_depth(checkpoint))
    load_weights(net, checkpoint)
    net.classes = classes
    return net


def classes_of(net: PAANet) -> ClassList:
    """The network's class list: the one it was loaded with, else COCO's 80 for 80 outputs, else ``class_i``."""
    classes = getattr(net, "classes", None)
    if isinstance(classes, ClassList):
        return classes
    return ClassList.from_meta({}, net.num_classes) if net.num_classes != len(COCO_CLASSES) else COCO_CLASSES
