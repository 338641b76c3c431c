"""The PyTorch backend: the network and the batched post-processing on CPU or CUDA, FP32 or FP16."""
from __future__ import annotations

from contextlib import nullcontext

import numpy as np
import torch

from ..checkpoint import load_weights
from ..model import PAANet
from ..postprocess import Detections, PAAPostprocess, PostprocessConfig
from ..preprocess import ImageMeta, Preset, get_preset, normalize_pad
from .base import Backend, StageTimer


def resolve_device(device: str | torch.device) -> torch.device:
    """``cpu``, ``cuda`` or ``cuda:N``; a clear error when CUDA is asked for but absent."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} requested but CUDA is not available (torch {torch.__version__})")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {device!r}; use cpu or cuda")
    return dev


class TorchBackend(Backend):
    """PAANet + :class:`PAAPostprocess` in PyTorch.

    Args:
        net: the network (weights loaded).
        preset: pre-processing preset.
        device: where to run.
        fp16: run the network under autocast float16 (convolutions in half precision; GroupNorm and
            the post-processing stay in float32). CUDA only.
        postprocess: post-processing settings.
    """

    name = "torch"

    def __init__(
        self,
        net: PAANet,
        preset: str | Preset = "mmdet",
        device: str | torch.device = "cpu",
        fp16: bool = False,
        postprocess: PostprocessConfig = PostprocessConfig(),
    ) -> None:
        self.device = resolve_device(device)
        if fp16 and self.device.type != "cuda":
            raise ValueError("--fp16 needs a CUDA device; on CPU run in fp32")
        self.preset = get_preset(preset)
        self.fp16 = fp16
        self.net = net.to(self.device).eval()
        self.post = PAAPostprocess(postprocess)

    @classmethod
    def from_checkpoint(cls, path: str, **kwargs) -> "TorchBackend":
        net = PAANet()
        load_weights(net, path)
        return cls(net, **kwargs)

    def _autocast(self):
        if self.fp16:
            return torch.autocast(device_type=self.device.type, dtype=torch.float16)
        return nullcontext()

    @torch.inference_mode()
    def infer(self, images: list[np.ndarray], metas: list[ImageMeta], timer: StageTimer | None = None) -> Detections:
        timer = timer or StageTimer(self.device)
        with timer.stage("preprocess"):
            batch = torch.stack([
                normalize_pad(torch.from_numpy(np.ascontiguousarray(img)).to(self.device, non_blocking=True), m.pad_shape)
                for img, m in zip(images, metas)
            ])
            img_shapes = torch.tensor([m.img_shape for m in metas], dtype=torch.float32, device=self.device)
            scale_factors = torch.tensor([m.scale_factor for m in metas], dtype=torch.float32, device=self.device)
        with timer.stage("network"), self._autocast():
            cls_logits, box_deltas, iou_logits = self.net(batch)
        with timer.stage("postprocess"):
            dets = self.post(cls_logits, box_deltas, iou_logits, img_shapes, scale_factors)
            dets = Detections(*(t.cpu() for t in dets))
        return dets

    def describe(self) -> dict:
        info = super().describe()
        info.update(device=str(self.device), precision="fp16" if self.fp16 else "fp32",
                    score_voting=self.post.config.score_voting)
        if self.device.type == "cuda":
            info["gpu"] = torch.cuda.get_device_name(self.device)
        return info
