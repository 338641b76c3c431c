"""The PyTorch backend: the network and the batched post-processing on CPU or CUDA, FP32 or FP16.

On the CPU the backend runs exactly as the parity tests check it (float32, per-image normalisation
and padding, nothing else). On CUDA it adds a fast path, each part guarded so that it never runs on
the CPU:

* the images of a batch are copied once, as ``uint8``, through a pinned staging buffer, and are
  normalised and padded on the GPU for the whole batch (the same arithmetic as on the CPU);
* FP32 convolutions run in true float32 (TF32 off) unless ``tf32=True``;
* optional: channels-last memory format, ``torch.compile``, CUDA graphs (one per input shape), and
  JPEG decoding plus resizing on the GPU (:meth:`TorchBackend.infer_encoded`, with torchvision).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext

import numpy as np
import torch
import torch.nn.functional as F

from paadet.errors import one_line
from paadet.model import PAANet
from paadet.model.build import classes_of, load_network
from paadet.model.fuse import fold_batchnorm
from paadet.postprocess import Detections, PAAPostprocess, PostprocessConfig
from paadet.preprocess import MEAN_RGB, STD_RGB, ImageMeta, Preset, get_preset, normalize_pad, rescale_size
from paadet.runtime.base import Backend, StageTimer
from paadet.runtime.graph_info import architecture_name
from paadet.runtime.spec import TORCH, torch_option_error

NetOutputs = tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]


def resolve_device(device: str | torch.device) -> torch.device:
    """``cpu``, ``cuda`` or ``cuda:N``; a clear error when CUDA is asked for but absent."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} requested but CUDA is not available (torch {torch.__version__})")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {device!r}; use cpu or cuda")
    return dev


def gpu_decode_available() -> bool:
    """Whether :meth:`TorchBackend.infer_encoded` can run: CUDA and torchvision's ``decode_jpeg`` are present."""
    if not torch.cuda.is_available():
        return False
    try:
        from torchvision.io import decode_jpeg  # noqa: F401
    except ImportError:
        return False
    return True


@contextmanager
def _cudnn_settings(allow_tf32: bool, benchmark: bool) -> Iterator[None]:
    """Set cuDNN's TF32 and benchmark switches for the duration of the block (restored afterwards)."""
    previous = torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark
    torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = allow_tf32, benchmark
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = previous


class _GraphedNetwork:
    """Replays a CUDA graph of the network per input shape; the outputs live in static buffers.

    The outputs of one call are overwritten by the next call with the same shape, so the caller must
    consume them first (:meth:`TorchBackend.infer` post-processes before it returns).
    """

    def __init__(self, forward: Callable[[torch.Tensor], NetOutputs], context: Callable[[], object]) -> None:
        self.forward = forward
        self.context = context
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor, NetOutputs]] = {}

    def __call__(self, batch: torch.Tensor) -> NetOutputs:
        key = (tuple(batch.shape), batch.dtype, batch.is_contiguous(memory_format=torch.channels_last))
        if key not in self.graphs:
            self.graphs[key] = self._capture(batch)
        graph, static_in, static_out = self.graphs[key]
        static_in.copy_(batch)
        graph.replay()
        return static_out

    def _capture(self, batch: torch.Tensor) -> tuple[torch.cuda.CUDAGraph, torch.Tensor, NetOutputs]:
        static_in = batch.clone(memory_format=torch.preserve_format)
        side = torch.cuda.Stream(device=batch.device)
        side.wait_stream(torch.cuda.current_stream(batch.device))
        with torch.cuda.stream(side):  # warm-up on a side stream, as torch.cuda.graph requires
            for _ in range(2):
                with self.context():
                    self.forward(static_in)
        torch.cuda.current_stream(batch.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), self.context():
            static_out = self.forward(static_in)
        return graph, static_in, static_out


def _freeze_for_cpu(net: PAANet, example: torch.Tensor) -> torch.jit.ScriptModule:
    """Trace, freeze and optimise the network for CPU inference (BatchNorm folded, oneDNN kernels).

    TorchScript is in maintenance in recent PyTorch and warns so; it is used here because, unlike
    ``torch.compile`` (about 80 s per input shape here and a C++ compiler needed), one trace of
    about 15 s serves every input size. The traced graph generalises over shapes (checked in tests).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(net, example, strict=False, check_trace=False)
        return torch.jit.optimize_for_inference(torch.jit.freeze(traced))


def detections_to_host(dets: Detections) -> Detections:
    """The detections in host memory with one device-to-host copy (boxes, scores and labels packed into one
    float32 tensor; labels are small integers, exact in float32; ``num_dets`` recomputed from the labels)."""
    packed = torch.cat(
        [dets.boxes.float(), dets.scores.float()[..., None], dets.labels.float()[..., None]], dim=-1
    ).cpu()
    labels = packed[..., 5].to(torch.long)
    return Detections(
        packed[..., :4].to(dets.boxes.dtype), packed[..., 4].to(dets.scores.dtype), labels, (labels >= 0).sum(dim=1)
    )


def resize_pad_decoded(decoded: Sequence[torch.Tensor], preset: Preset) -> tuple[torch.Tensor, list[ImageMeta]]:
    """Decoded ``[3, h, w]`` uint8 RGB images (any device) -> ``[B, 3, H, W]`` float32 resized pixel values,
    zero-padded to the preset's one padded size, and each image's :class:`ImageMeta`.

    Bilinear resizing (``align_corners=False``), rounded and clamped to 0..255 as an 8-bit image
    would be; the images of one source size are resized in one call (the result per image is the
    same as alone).

    Raises:
        ValueError: the images do not share one padded size.
    """
    metas = []
    for img in decoded:
        h, w = int(img.shape[1]), int(img.shape[2])
        new_h, new_w = rescale_size(h, w, preset.scale)
        metas.append(
            ImageMeta(
                ori_shape=(h, w),
                img_shape=(new_h, new_w),
                scale_factor=(new_w / w, new_h / h),
                pad_shape=preset.padded_shape(new_h, new_w),
            )
        )
    pad_shapes = {m.pad_shape for m in metas}
    if len(pad_shapes) != 1:
        raise ValueError(f"a GPU-decoded batch needs one padded size, got {sorted(pad_shapes)}; use the 800 preset")
    pad_h, pad_w = metas[0].pad_shape
    device = decoded[0].device if decoded else torch.device("cpu")
    rgb = torch.zeros((len(decoded), 3, pad_h, pad_w), dtype=torch.float32, device=device)
    by_size: dict[tuple[int, int], list[int]] = {}
    for i, meta in enumerate(metas):
        by_size.setdefault(meta.ori_shape, []).append(i)
    for indices in by_size.values():
        new_h, new_w = metas[indices[0]].img_shape
        group = torch.stack([decoded[i] for i in indices]).float()
        out = F.interpolate(group, size=(new_h, new_w), mode="bilinear", align_corners=False).round_().clamp_(0, 255)
        rgb[torch.tensor(indices, device=device), :, :new_h, :new_w] = out
    return rgb, metas


class TorchBackend(Backend):
    """PAANet + :class:`PAAPostprocess` in PyTorch.

    Args:
        net: the network (weights loaded).
        preset: pre-processing preset.
        device: where to run.
        fp16: run the network under autocast float16 (convolutions in half precision; GroupNorm and
            the post-processing stay in float32). CUDA only.
        bf16: run the network under autocast bfloat16 (on a CPU with AVX512-BF16 or AMX, oneDNN's bfloat16 convolutions;
            the pre- and post-processing stay in float32). CPU or CUDA. Detections change slightly:
            judge them by AP (docs/benchmarks.md).
        postprocess: post-processing settings.
        channels_last: run the network in channels-last memory format. CUDA, or the CPU with ``bf16``, where it
            is always on (oneDNN's bfloat16 convolutions are about 8 % faster in NHWC on this project's CPU).
        compile_mode: ``torch.compile`` the network with this mode (one of :data:`COMPILE_MODES`);
            None (default) runs it eagerly. CUDA only.
        cuda_graphs: capture the network in a CUDA graph per input shape and replay it. CUDA only.
        tf32: let cuDNN use TF32 for FP32 convolutions (faster, about 1e-3 relative error); off by
            default so that FP32 on CUDA matches the CPU. CUDA only.
        cudnn_benchmark: let cuDNN time its convolution algorithms per input shape (first call of each
            shape is slow, later ones faster). CUDA only.
        pin_memory: stage host-to-device copies in pinned memory (CUDA; ignored on the CPU).
        fold_bn: fold the ResNet's BatchNorms into their convolutions (53 kernels and passes over the
            feature maps fewer; float rounding differs from the unfolded network). CUDA only (on a CPU,
            ``optimize`` does this and more).
        fp16_weights: with ``fp16``: store the network in float16 and run it without autocast, so that
            GroupNorm also runs in float16 (float32 accumulation inside the kernel) and no casts run
            between layers. CUDA only.
        optimize: CPU only: trace the network on its first batch, freeze it and let PyTorch optimise it
            for inference (BatchNorm folded into the convolutions, oneDNN kernels). Up to a quarter
            faster on a CPU (2-32% more images/s measured, docs/benchmarks.md) after a one-off ~15 s; logits
            differ from the exact path by ~1e-5, so
            detections agree with mmdetection's to the parity rule rather than bit for bit.
    """

    name = TORCH

    def __init__(
        self,
        net: PAANet,
        preset: str | Preset = "mmdet",
        device: str | torch.device = "cpu",
        fp16: bool = False,
        postprocess: PostprocessConfig = PostprocessConfig(),
        channels_last: bool = False,
        compile_mode: str | None = None,
        cuda_graphs: bool = False,
        tf32: bool = False,
        cudnn_benchmark: bool = False,
        pin_memory: bool = True,
        optimize: bool = False,
        fold_bn: bool = False,
        fp16_weights: bool = False,
        bf16: bool = False,
    ) -> None:
        self.device = resolve_device(device)
        error = torch_option_error(
            self.device.type,
            fp16=fp16,
            bf16=bf16,
            optimize=optimize,
            fp16_weights=fp16_weights,
            compile_mode=compile_mode,
            cuda_only={
                "channels_last": channels_last,
                "compile_mode": compile_mode,
                "cuda_graphs": cuda_graphs,
                "tf32": tf32,
                "cudnn_benchmark": cudnn_benchmark,
                "fold_bn": fold_bn,
                "fp16_weights": fp16_weights,
            },
        )
        if error:
            raise ValueError(error)
        if bf16 and self.device.type == "cpu":
            channels_last = True  # oneDNN's bfloat16 convolutions prefer NHWC: 0.79 vs 0.85 s at 800x800 here
        self.preset = get_preset(preset)
        self.classes = classes_of(net)
        self.fp16 = fp16
        self.bf16 = bf16
        self.channels_last = channels_last
        self.compile_mode = compile_mode
        self.cuda_graphs = cuda_graphs
        self.tf32 = tf32
        self.cudnn_benchmark = cudnn_benchmark
        self.pin_memory = pin_memory and self.device.type == "cuda"
        self.optimize = optimize
        self.fold_bn = fold_bn
        self.fp16_weights = fp16_weights
        if fold_bn:
            net = fold_batchnorm(net)
        self.net = net.to(self.device).eval()
        if fp16_weights:
            self.net = self.net.half()
        if channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        self.post = PAAPostprocess(postprocess)
        forward: Callable[[torch.Tensor], NetOutputs] = self.net
        if compile_mode is not None:
            forward = torch.compile(self.net, mode=compile_mode, dynamic=False)
        self._forward = forward
        self._graphed = _GraphedNetwork(forward, self._network_context) if cuda_graphs else None
        self._mean = torch.tensor(MEAN_RGB, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(STD_RGB, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)

    @classmethod
    def from_checkpoint(cls, path: str, **kwargs) -> TorchBackend:
        return cls(load_network(path), **kwargs)

    def _autocast(self):
        if self.fp16 and not self.fp16_weights:
            return torch.autocast(device_type=self.device.type, dtype=torch.float16, cache_enabled=not self.cuda_graphs)
        if self.bf16:
            return torch.autocast(
                device_type=self.device.type, dtype=torch.bfloat16, cache_enabled=not self.cuda_graphs
            )
        return nullcontext()

    @contextmanager
    def _network_context(self) -> Iterator[None]:
        """Autocast (FP16) and, on CUDA, the cuDNN settings, around one forward pass or graph capture."""
        cudnn = _cudnn_settings(self.tf32, self.cudnn_benchmark) if self.device.type == "cuda" else nullcontext()
        with cudnn, self._autocast():
            yield

    @torch.inference_mode()
    def network(self, batch: torch.Tensor) -> NetOutputs:
        """The network alone on a device-resident, normalised batch ``[B, 3, H, W]`` (what ``engine`` times).

        With ``cuda_graphs`` the outputs are static buffers, overwritten by the next call of the same shape.
        """
        if self.fp16_weights:
            batch = batch.half()
        if self.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        if self._graphed is not None:
            return self._graphed(batch)
        if self.optimize and not isinstance(self._forward, torch.jit.ScriptModule):
            self._forward = _freeze_for_cpu(self.net, batch)
        with self._network_context():
            return self._forward(batch)

    @torch.inference_mode()
    def prepare(
        self, images: Sequence[np.ndarray], metas: Sequence[ImageMeta], timer: StageTimer | None = None
    ) -> torch.Tensor:
        """Resized BGR ``uint8`` images of one padded size -> the normalised, padded batch on the device."""
        timer = timer or StageTimer(self.device)
        if self.device.type != "cuda":
            with timer.stage("preprocess"):
                return torch.stack(
                    [
                        normalize_pad(
                            torch.from_numpy(np.ascontiguousarray(img)).to(self.device, non_blocking=True), m.pad_shape
                        )
                        for img, m in zip(images, metas, strict=False)
                    ]
                )
        pad_h, pad_w = metas[0].pad_shape
        with timer.stage("copy"):
            # the staging buffer's padding is left unwritten: _normalize_pad_batch zeroes it after normalising
            staging = torch.empty((len(images), pad_h, pad_w, 3), dtype=torch.uint8, pin_memory=self.pin_memory)
            host = staging.numpy()
            for i, img in enumerate(images):
                host[i, : img.shape[0], : img.shape[1]] = img
            pixels = staging.to(self.device, non_blocking=self.pin_memory)
        with timer.stage("preprocess"):
            rgb = pixels.permute(0, 3, 1, 2).flip(1)  # BGR -> RGB, [B, 3, H, W] (channels-last strides)
            return self._normalize_pad_batch(rgb, [m.img_shape for m in metas])

    def _normalize_pad_batch(self, rgb: torch.Tensor, img_shapes: Sequence[tuple[int, int]]) -> torch.Tensor:
        """``(x - mean) / std`` in float32 on ``[B, 3, H, W]`` RGB pixels; zeros outside each image's ``img_shape``.

        The arithmetic is :func:`~paadet.preprocess.normalize_pad`'s, so the valid region is identical and
        the padding is exactly zero.
        """
        batch = (rgb.float() - self._mean) / self._std
        _, _, pad_h, pad_w = batch.shape
        heights = torch.tensor([h for h, _ in img_shapes], device=self.device)
        widths = torch.tensor([w for _, w in img_shapes], device=self.device)
        rows = torch.arange(pad_h, device=self.device)[None, :, None] < heights[:, None, None]
        cols = torch.arange(pad_w, device=self.device)[None, None, :] < widths[:, None, None]
        inside = (rows & cols)[:, None]
        batch = torch.where(inside, batch, batch.new_zeros(()))
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        return batch.contiguous(memory_format=memory_format)

    @torch.inference_mode()
    def infer(self, images: list[np.ndarray], metas: list[ImageMeta], timer: StageTimer | None = None) -> Detections:
        timer = timer or StageTimer(self.device)
        batch = self.prepare(images, metas, timer)
        return self._detect(batch, metas, timer)

    def _detect(self, batch: torch.Tensor, metas: Sequence[ImageMeta], timer: StageTimer) -> Detections:
        """Network, post-processing and (on CUDA) the copy of the detections back to the host."""
        img_shapes = torch.tensor([m.img_shape for m in metas], dtype=torch.float32, device=self.device)
        scale_factors = torch.tensor([m.scale_factor for m in metas], dtype=torch.float32, device=self.device)
        with timer.stage("network"):
            cls_logits, box_deltas, iou_logits = self.network(batch)
        if self.device.type != "cuda":
            with timer.stage("postprocess"):
                dets = self.post(cls_logits, box_deltas, iou_logits, img_shapes, scale_factors)
                return Detections(*(t.cpu() for t in dets))
        with timer.stage("postprocess"):
            dets = self.post(cls_logits, box_deltas, iou_logits, img_shapes, scale_factors)
        with timer.stage("copy_back"):
            return detections_to_host(dets)

    @torch.inference_mode()
    def infer_encoded(
        self, encoded: Sequence[bytes], names: Sequence[str] | None = None, timer: StageTimer | None = None
    ) -> tuple[Detections, list[ImageMeta]]:
        """JPEG bytes -> detections, decoding and resizing on the GPU (torchvision's ``decode_jpeg``, nvJPEG).

        All images must reach the same padded size (always true with the ``800`` preset). The GPU
        decoder and bilinear resize round differently from OpenCV's in the last bit of some pixels, so
        detections are close to, not identical with, :meth:`infer`'s on OpenCV-decoded images, and
        nvJPEG does not apply EXIF orientation (OpenCV does): use it for benchmarks and for images
        without an EXIF rotation.

        Raises:
            RuntimeError: not on CUDA, or torchvision is missing.
            ValueError: the images do not share one padded size, or a file is not a decodable JPEG.
        """
        if self.device.type != "cuda" or not gpu_decode_available():
            raise RuntimeError("GPU JPEG decoding needs a CUDA device and torchvision (torchvision.io.decode_jpeg)")
        from torchvision.io import ImageReadMode, decode_jpeg

        timer = timer or StageTimer(self.device)
        names = list(names) if names is not None else [f"image {i}" for i in range(len(encoded))]
        with timer.stage("decode"):
            data = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in encoded]
            try:
                decoded = decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device)
            except RuntimeError as exc:
                raise ValueError(
                    f"GPU JPEG decoding failed for one of {', '.join(names[:3])}...: {one_line(exc)}"
                ) from None
        with timer.stage("preprocess"):
            rgb, metas = resize_pad_decoded(decoded, self.preset)
            batch = self._normalize_pad_batch(rgb, [m.img_shape for m in metas])
        return self._detect(batch, metas, timer), metas

    def describe(self) -> dict:
        info = super().describe()
        info.update(
            architecture=architecture_name(self.net.depth),
            device=str(self.device),
            precision="fp16" if self.fp16 else "bf16" if self.bf16 else "fp32",
            score_voting=self.post.config.score_voting,
        )
        if self.optimize:
            info["optimize"] = "traced, frozen, optimised for inference"
        if self.device.type == "cuda":
            info.update(
                gpu=torch.cuda.get_device_name(self.device),
                channels_last=self.channels_last,
                fold_bn=self.fold_bn,
                fp16_weights=self.fp16_weights,
                compile_mode=self.compile_mode,
                cuda_graphs=self.cuda_graphs,
                tf32=self.tf32,
                cudnn_benchmark=self.cudnn_benchmark,
                pin_memory=self.pin_memory,
            )
        return info
