"""Training PAA: mmdetection 3.3's recipe and targets, batched.

The Python API is :func:`train` with one :class:`TrainConfig`; it returns a :class:`TrainSummary`::

    from paadet.train import TrainConfig, train
    summary = train(TrainConfig(ann_file="ann.json", image_dir="images", output_dir="out",
                                init="checkpoint", init_file="paa_r50_fpn_1x_coco.pth", lr=0.0025, batch_size=4))

The names are imported lazily, so importing one piece (``paadet.train.gmm``) loads only that piece.
"""

from __future__ import annotations

import importlib

__all__ = ["TrainConfig", "TrainHook", "TrainSummary", "TrainingError", "TrainingTerminated", "train"]

_WHERE = {
    "TrainConfig": "config",
    "TrainingError": "config",
    "TrainingTerminated": "signals",
    "TrainHook": "hooks",
    "TrainSummary": "summary",
    "train": "setup",
}


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f"paadet.train.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'paadet.train' has no attribute {name!r}")
