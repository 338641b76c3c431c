"""Building a :class:`PAANet` from a checkpoint file, with the class list that travels with it."""

from __future__ import annotations

import os

from paadet.checkpoint import Checkpoint, load_checkpoint, load_weights
from paadet.classes import COCO_CLASSES, ClassList
from paadet.model.paa import PAANet


def load_network(path: str | os.PathLike | Checkpoint) -> PAANet:
    """A PAANet with the checkpoint's weights, sized to its head (80 classes or any other count).

    The network's ``classes`` attribute is the checkpoint's :class:`~paadet.classes.ClassList`
    (``meta.dataset_meta``; COCO's 80 for the official file).

    Raises:
        CheckpointError: an unreadable, unsafe or mismatched checkpoint, or a class list that does not fit.
    """
    checkpoint = path if isinstance(path, Checkpoint) else load_checkpoint(path)
    classes = checkpoint.classes
    net = PAANet(num_classes=len(classes))
    load_weights(net, checkpoint)
    net.classes = classes
    return net


def classes_of(net: PAANet) -> ClassList:
    """The network's class list: the one it was loaded with, else COCO's 80 for 80 outputs, else ``class_i``."""
    classes = getattr(net, "classes", None)
    if isinstance(classes, ClassList):
        return classes
    return ClassList.from_meta({}, net.num_classes) if net.num_classes != len(COCO_CLASSES) else COCO_CLASSES
