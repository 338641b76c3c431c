"""A synthetic detection dataset in COCO format: shapes of several classes on cluttered backgrounds.

It exists so that paadet can train a detector that has actually learned something (the stand-in of
``tools/train_standin.py``) without any download, and judge reduced-precision inference by AP on it.

Each image (``size x size`` pixels, JPEG) shows 1 to ``max_objects`` objects of the classes in
:data:`SHAPES` (circle, square, triangle, star, cross, ring, hexagon, heart), each with:

* a size drawn log-uniformly in ``[min_size, max_size]`` pixels (its longer side before rotation),
  so that COCO's small (< 32 px), medium and large objects all occur;
* a random rotation (the circle's and the ring's do not matter), aspect ratio in ``[0.75, 1.33]``;
* a fill: flat colour, stripes, a checkerboard, a gradient or speckled noise, in random colours;
* a position that may overlap the objects drawn before it, as long as each object keeps at least
  ``min_visible`` of its pixels visible (occlusion without hiding anything).

Backgrounds are a colour gradient, blurred noise or stripes, with clutter on top (lines, dots, arcs and
blobs that belong to no class), drawn before the objects. Each box is the tight box of the object's
*visible* pixels (COCO's convention), in pixels, ``[x, y, w, h]``; ``area`` is the visible pixel count.

Everything is a function of ``(seed, split, index)``: each image has its own generator, so the same
arguments give the same files on any machine with the same OpenCV, whatever the order of generation.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np

from paadet.fileio import atomic_write_bytes

__all__ = ["SHAPES", "SyntheticSpec", "generate_split", "render_image"]

SHAPES = ("circle", "square", "triangle", "star", "cross", "ring", "hexagon", "heart")
"""The class names, in category-id order (ids 1..8)."""

_SPLIT_SALT = {"train": 0, "val": 1, "test": 2}


@dataclass(frozen=True)
class SyntheticSpec:
    """What a split looks like.

    Attributes:
        size: image side in pixels (square images).
        min_objects, max_objects: objects per image (uniform).
        min_size, max_size: object size range in pixels (log-uniform).
        min_visible: the fraction of an object's pixels that must stay visible under later objects.
        clutter: clutter items per image (uniform in ``[0, clutter]``).
        jpeg_quality: JPEG quality of the written images.
        classes: how many classes: the first ``classes`` of :data:`SHAPES` (category ids 1..classes).
    """

    size: int = 256
    min_objects: int = 1
    max_objects: int = 6
    min_size: float = 20.0
    max_size: float = 180.0
    min_visible: float = 0.6
    clutter: int = 8
    jpeg_quality: int = 95
    classes: int = len(SHAPES)

    def __post_init__(self) -> None:
        if self.size < 32:
            raise ValueError(f"size must be >= 32, got {self.size}")
        if not 1 <= self.min_objects <= self.max_objects:
            raise ValueError(f"need 1 <= min_objects <= max_objects, got {self.min_objects}, {self.max_objects}")
        if not 4 <= self.min_size <= self.max_size <= self.size:
            raise ValueError(f"need 4 <= min_size <= max_size <= size, got {self.min_size}, {self.max_size}")
        if not 0.0 < self.min_visible <= 1.0:
            raise ValueError(f"min_visible must be in (0, 1], got {self.min_visible}")
        if not 1 <= self.classes <= len(SHAPES):
            raise ValueError(f"classes must be from 1 to {len(SHAPES)}, got {self.classes}")
        if self.clutter < 0:
            raise ValueError(f"clutter must be >= 0, got {self.clutter}")


def _colour(rng: np.random.Generator, dark: bool | None = None) -> tuple[int, int, int]:
    """A saturated random BGR colour (HSV with high saturation)."""
    hue = rng.uniform(0, 180)
    sat = rng.uniform(140, 255)
    val = rng.uniform(60, 130) if dark else rng.uniform(150, 255) if dark is False else rng.uniform(70, 255)
    hsv = np.uint8([[[hue, sat, val]]])
    b, g, r = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[0, 0]
    return int(b), int(g), int(r)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    kind = rng.integers(3)
    if kind == 0:  # a gradient between two colours along a random direction
        c0, c1 = np.array(_colour(rng), np.float32), np.array(_colour(rng), np.float32)
        angle = rng.uniform(0, 2 * math.pi)
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
        t = np.clip((xx * math.cos(angle) + yy * math.sin(angle) + 1.0) / 2.0, 0, 1)[..., None]
        image = c0 * (1 - t) + c1 * t
    elif kind == 1:  # blurred noise in a random tint
        noise = rng.uniform(0, 255, (size // 8 + 1, size // 8 + 1, 3)).astype(np.float32)
        image = cv2.resize(noise, (size, size), interpolation=cv2.INTER_CUBIC)
        image = 0.35 * image + 0.65 * np.array(_colour(rng), np.float32)
    else:  # soft stripes
        c0, c1 = np.array(_colour(rng), np.float32), np.array(_colour(rng), np.float32)
        period = rng.uniform(8, 40)
        angle = rng.uniform(0, math.pi)
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
        t = (0.5 + 0.5 * np.sin((xx * math.cos(angle) + yy * math.sin(angle)) * 2 * math.pi / period))[..., None]
        image = c0 * (1 - t) * 0.6 + c1 * t * 0.6 + 0.4 * 128
    image += rng.normal(0, 6, image.shape).astype(np.float32)
    return np.clip(image, 0, 255).astype(np.uint8)


def _clutter(rng: np.random.Generator, image: np.ndarray, count: int) -> None:
    size = image.shape[0]
    for _ in range(count):
        kind = rng.integers(4)
        colour = _colour(rng)
        if kind == 0:
            p0, p1 = rng.integers(0, size, 2), rng.integers(0, size, 2)
            cv2.line(
                image, (int(p0[0]), int(p0[1])), (int(p1[0]), int(p1[1])), colour, int(rng.integers(1, 4)), cv2.LINE_AA
            )
        elif kind == 1:
            for _ in range(int(rng.integers(3, 15))):
                c = rng.integers(0, size, 2)
                cv2.circle(image, (int(c[0]), int(c[1])), int(rng.integers(1, 3)), colour, -1, cv2.LINE_AA)
        elif kind == 2:
            c = rng.integers(0, size, 2)
            axes = (int(rng.integers(8, size // 3)), int(rng.integers(8, size // 3)))
            start = float(rng.uniform(0, 360))
            cv2.ellipse(
                image,
                (int(c[0]), int(c[1])),
                axes,
                float(rng.uniform(0, 180)),
                start,
                start + float(rng.uniform(40, 200)),
                colour,
                int(rng.integers(1, 4)),
                cv2.LINE_AA,
            )
        else:  # a soft blob: no edges, so it is no shape
            blob = np.zeros(image.shape[:2], np.float32)
            c = rng.integers(0, size, 2)
            cv2.circle(blob, (int(c[0]), int(c[1])), int(rng.integers(6, size // 5)), 1.0, -1)
            blob = cv2.GaussianBlur(blob, (0, 0), float(rng.uniform(4, 10)))[..., None] * 0.7
            image[:] = np.clip(image * (1 - blob) + np.array(colour, np.float32) * blob, 0, 255).astype(np.uint8)


def _polygon(points: np.ndarray, cx: float, cy: float, w: float, h: float, angle: float) -> np.ndarray:
    """Unit-square points (in [-0.5, 0.5]) scaled by ``w x h``, rotated by ``angle`` and moved to the centre."""
    pts = points * np.array([w, h])
    c, s = math.cos(angle), math.sin(angle)
    pts = pts @ np.array([[c, s], [-s, c]])
    return pts + np.array([cx, cy])


def _star(n: int = 5, inner: float = 0.45) -> np.ndarray:
    k = np.arange(2 * n)
    r = np.where(k % 2 == 0, 0.5, 0.5 * inner)
    a = -math.pi / 2 + k * math.pi / n
    return np.stack([r * np.cos(a), r * np.sin(a)], axis=1)


def _regular(n: int) -> np.ndarray:
    a = -math.pi / 2 + np.arange(n) * 2 * math.pi / n
    return 0.5 * np.stack([np.cos(a), np.sin(a)], axis=1)


_CROSS = (
    np.array(
        [[-1, -3], [1, -3], [1, -1], [3, -1], [3, 1], [1, 1], [1, 3], [-1, 3], [-1, 1], [-3, 1], [-3, -1], [-1, -1]],
        np.float64,
    )
    / 6.0
)
_HEART = np.array(
    [
        [
            0.5 * (16 * math.sin(t) ** 3) / 17,
            -0.5 * (13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)) / 17 + 0.03,
        ]
        for t in np.linspace(0, 2 * math.pi, 48, endpoint=False)
    ]
)


def _shape_mask(shape: str, size: int, cx: float, cy: float, w: float, h: float, angle: float) -> np.ndarray:
    """The object's pixels (uint8 0/1) in a ``size x size`` canvas."""
    mask = np.zeros((size, size), np.uint8)
    shift = 4  # sub-pixel precision of cv2's fill functions
    scale = 1 << shift

    def fill(points: np.ndarray) -> None:
        cv2.fillPoly(mask, [np.round(points * scale).astype(np.int32)], 1, cv2.LINE_8, shift)

    if shape in ("circle", "ring"):
        centre = (round(cx * scale), round(cy * scale))
        axes = (round(w / 2 * scale), round(h / 2 * scale))
        cv2.ellipse(mask, centre, axes, math.degrees(angle), 0, 360, 1, -1, cv2.LINE_8, shift)
        if shape == "ring":
            inner = (int(axes[0] * 0.55), int(axes[1] * 0.55))
            cv2.ellipse(mask, centre, inner, math.degrees(angle), 0, 360, 0, -1, cv2.LINE_8, shift)
    elif shape == "square":
        fill(_polygon(np.array([[-0.5, -0.5], [0.5, -0.5], [0.5, 0.5], [-0.5, 0.5]]), cx, cy, w, h, angle))
    elif shape == "triangle":
        fill(_polygon(_regular(3) + np.array([0, 0.1]), cx, cy, w, h, angle))
    elif shape == "star":
        fill(_polygon(_star(), cx, cy, w, h, angle))
    elif shape == "cross":
        fill(_polygon(_CROSS, cx, cy, w, h, angle))
    elif shape == "hexagon":
        fill(_polygon(_regular(6), cx, cy, w, h, angle))
    elif shape == "heart":
        fill(_polygon(_HEART, cx, cy, w, h, angle))
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return mask


def _fill(rng: np.random.Generator, size: int) -> np.ndarray:
    """A ``size x size x 3`` float texture for an object."""
    kind = rng.integers(5)
    c0 = np.array(_colour(rng), np.float32)
    if kind == 0:
        return np.broadcast_to(c0, (size, size, 3)).copy()
    c1 = np.array(_colour(rng), np.float32)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    if kind == 1:  # stripes
        period, angle = rng.uniform(4, 14), rng.uniform(0, math.pi)
        t = ((xx * math.cos(angle) + yy * math.sin(angle)) // (period / 2)) % 2
    elif kind == 2:  # checkerboard
        cell = rng.uniform(3, 10)
        t = (xx // cell + yy // cell) % 2
    elif kind == 3:  # gradient
        angle = rng.uniform(0, 2 * math.pi)
        t = np.clip(((xx - size / 2) * math.cos(angle) + (yy - size / 2) * math.sin(angle)) / size + 0.5, 0, 1)
    else:  # speckles
        t = (rng.uniform(0, 1, (size, size)) > 0.7).astype(np.float32)
    t = t[..., None]
    return c0 * (1 - t) + c1 * t


def render_image(spec: SyntheticSpec, seed: int, split: str, index: int) -> tuple[np.ndarray, list[dict]]:
    """One image (BGR uint8 ``[size, size, 3]``) and its objects: dicts with ``category_id``,
    ``bbox`` ``[x, y, w, h]`` (tight box of the visible pixels) and ``area`` (visible pixels)."""
    if split not in _SPLIT_SALT:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(_SPLIT_SALT)}")
    rng = np.random.default_rng([seed, _SPLIT_SALT[split], index])
    size = spec.size
    image = _background(rng, size)
    _clutter(rng, image, int(rng.integers(0, spec.clutter + 1)))
    owner = np.full((size, size), -1, np.int32)  # which object each pixel shows
    objects: list[tuple[int, int]] = []  # (class index, full pixel count)
    wanted = int(rng.integers(spec.min_objects, spec.max_objects + 1))
    log_lo, log_hi = math.log(spec.min_size), math.log(spec.max_size)
    for _ in range(wanted):
        for _attempt in range(20):
            cls = int(rng.integers(spec.classes))
            extent = math.exp(rng.uniform(log_lo, log_hi))
            aspect = math.exp(rng.uniform(math.log(0.75), math.log(1.33)))
            w, h = extent * min(1.0, aspect), extent * min(1.0, 1.0 / aspect)
            angle = rng.uniform(0, 2 * math.pi)
            margin = extent * 0.3  # objects may be cut by the border a little
            cx = rng.uniform(-margin + extent / 2, size + margin - extent / 2)
            cy = rng.uniform(-margin + extent / 2, size + margin - extent / 2)
            mask = _shape_mask(SHAPES[cls], size, cx, cy, w, h, angle).astype(bool)
            pixels = int(mask.sum())
            if pixels < 0.7 * spec.min_size**2 * 0.25:
                continue  # mostly outside the image
            covered = owner[mask]
            ok = all(
                int(np.count_nonzero(owner == k) - np.count_nonzero(covered == k)) >= spec.min_visible * objects[k][1]
                for k in np.unique(covered[covered >= 0]).tolist()
            )
            if ok:
                break
        else:
            continue
        texture = _fill(rng, size)
        edge = mask.astype(np.float32)
        soft = cv2.GaussianBlur(edge, (3, 3), 0.6)[..., None]  # anti-aliased edges
        image[:] = np.clip(image * (1 - soft) + texture * soft, 0, 255).astype(np.uint8)
        owner[mask] = len(objects)
        objects.append((cls, pixels))
    annotations = []
    for k, (cls, _) in enumerate(objects):
        ys, xs = np.nonzero(owner == k)
        if len(xs) == 0:
            continue
        x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
        annotations.append({"category_id": cls + 1, "bbox": [x0, y0, x1 - x0, y1 - y0], "area": len(xs)})
    image = np.clip(image.astype(np.float32) + rng.normal(0, 3, image.shape), 0, 255).astype(np.uint8)
    return image, annotations


def generate_split(
    out_dir: str | os.PathLike,
    num_images: int,
    *,
    split: str = "train",
    seed: int = 0,
    spec: SyntheticSpec | None = None,
    progress: Callable[[int], None] | None = None,
) -> tuple[Path, Path]:
    """Write ``out_dir/images/*.jpg`` and ``out_dir/annotations.json`` (COCO ``instances``).

    Images are named ``{split}_{index:06d}.jpg``; image ids are ``index + 1``; category ids are
    1..``spec.classes`` in :data:`SHAPES` order. Every file is written atomically, the annotation file last, so
    a folder with an ``annotations.json`` is complete. Returns ``(annotation file, image folder)``.
    """
    spec = spec or SyntheticSpec()
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    out = Path(out_dir)
    image_dir = out / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for index in range(num_images):
        image, objects = render_image(spec, seed, split, index)
        name = f"{split}_{index:06d}.jpg"
        ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, spec.jpeg_quality])
        if not ok:
            raise RuntimeError(f"{image_dir / name}: JPEG encoding failed")
        atomic_write_bytes(image_dir / name, data.tobytes())
        images.append({"id": index + 1, "file_name": name, "height": spec.size, "width": spec.size})
        for obj in objects:
            annotations.append({"id": len(annotations) + 1, "image_id": index + 1, "iscrowd": 0, **obj})
        if progress is not None:
            progress(index + 1)
    coco = {
        "info": {
            "description": f"paadet synthetic shapes, split {split}, seed {seed}",
            "spec": asdict(spec),
            "seed": seed,
            "split": split,
        },
        "images": images,
        "annotations": annotations,
        "categories": [
            {"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(SHAPES[: spec.classes])
        ],
    }
    ann_file = out / "annotations.json"
    atomic_write_bytes(ann_file, json.dumps(coco).encode())
    return ann_file, image_dir


def synthetic_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A reproducible BGR ``uint8`` image ``[height, width, 3]`` with smooth shapes and some noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.zeros((height, width, 3), np.float32)
    for c in range(3):
        fx, fy = rng.uniform(0.005, 0.05, 2)
        px, py = rng.uniform(0, 2 * np.pi, 2)
        img[..., c] = 127 + 60 * np.sin(xx * fx + px) * np.cos(yy * fy + py)
    for _ in range(int(rng.integers(3, 8))):
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        rx, ry = rng.uniform(0.05, 0.3) * width, rng.uniform(0.05, 0.3) * height
        mask = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 < 1
        img[mask] = rng.uniform(0, 255, 3)
    img += rng.normal(0, 8, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)
