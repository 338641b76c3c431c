"""Tests for paadet.preprocess against hand-computed mmdetection geometry and normalisation."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from paadet.preprocess import (
    MEAN_RGB,
    PRESETS,
    STD_RGB,
    ImageMeta,
    Preset,
    collate,
    get_preset,
    normalize_pad,
    preprocess,
    rescale_size,
    resize,
)


def random_bgr(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A reproducible random BGR uint8 image."""
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


# --- presets --------------------------------------------------------------------------------------


def test_presets() -> None:
    assert get_preset("mmdet") == Preset("mmdet", (1333, 800), size_divisor=32)
    assert get_preset("800") == Preset("800", (800, 800), size_divisor=None, fixed_size=(800, 800))
    assert get_preset(800) is PRESETS["800"]
    custom = Preset("custom", (640, 640), size_divisor=64)
    assert get_preset(custom) is custom


def test_unknown_preset_message() -> None:
    with pytest.raises(ValueError) as exc:
        get_preset("bogus")
    assert str(exc.value) == "unknown preset 'bogus'; choose one of mmdet, 800"


# --- rescale_size ---------------------------------------------------------------------------------

# (height, width) -> (new_h, new_w), worked out by hand with
# f = min(long_max / long, short_max / short), new = int(old * f + 0.5).
MMDET_SIZES = [
    ((480, 640), (800, 1067)),  # f = 800/480 = 1.6667 (short side binds); 640 f = 1066.67
    ((427, 640), (800, 1199)),  # f = 800/427; 640 f = 1199.06
    ((1000, 200), (1333, 267)),  # tall: f = 1333/1000 (long side binds); 200 f = 266.6
    ((200, 1000), (267, 1333)),  # wide: transposed
    ((500, 500), (800, 800)),  # square: f = 1.6
    ((800, 1333), (800, 1333)),  # already at the limit: f = 1
    ((1600, 2666), (800, 1333)),  # f = 0.5 exactly: both bind
    ((1001, 2666), (501, 1333)),  # f = 0.5: 500.5 rounds half up to 501 (Python's round() says 500)
    ((1003, 2666), (502, 1333)),  # f = 0.5: 501.5 -> 502
    ((2666, 1001), (1333, 501)),  # transposed half-way case
    ((2000, 3000), (800, 1200)),  # f = 0.4: downscale
    ((1, 1), (800, 800)),  # tiny images are upscaled
]

PRESET_800_SIZES = [
    ((480, 640), (600, 800)),  # f = 800/640 = 1.25
    ((427, 640), (534, 800)),  # 427 * 1.25 = 533.75
    ((1000, 200), (800, 160)),  # f = 0.8
    ((500, 500), (800, 800)),
    ((1001, 1600), (501, 800)),  # f = 0.5: 500.5 -> 501
    ((1600, 1001), (800, 501)),
    ((2000, 3000), (533, 800)),  # f = 800/3000: 533.33 -> 533
    ((800, 800), (800, 800)),
]


@pytest.mark.parametrize(("size", "expected"), MMDET_SIZES)
def test_rescale_size_mmdet(size: tuple[int, int], expected: tuple[int, int]) -> None:
    assert rescale_size(*size, PRESETS["mmdet"].scale) == expected
    assert rescale_size(*size, (800, 1333)) == expected  # the order of the scale pair does not matter


@pytest.mark.parametrize(("size", "expected"), PRESET_800_SIZES)
def test_rescale_size_800(size: tuple[int, int], expected: tuple[int, int]) -> None:
    assert rescale_size(*size, PRESETS["800"].scale) == expected


def test_rescale_size_never_exceeds_limits() -> None:
    rng = np.random.default_rng(1)
    for height, width in rng.integers(1, 5000, (500, 2)):
        new_h, new_w = rescale_size(int(height), int(width), (1333, 800))
        assert max(new_h, new_w) <= 1333 and min(new_h, new_w) <= 800
        new_h, new_w = rescale_size(int(height), int(width), (800, 800))
        assert max(new_h, new_w) == 800


@pytest.mark.parametrize("size", [(0, 10), (10, 0), (-1, 10)])
def test_rescale_size_rejects_empty(size: tuple[int, int]) -> None:
    with pytest.raises(ValueError, match="positive"):
        rescale_size(*size, (1333, 800))


# --- padded_shape ---------------------------------------------------------------------------------


def test_padded_shape() -> None:
    mmdet, fixed = PRESETS["mmdet"], PRESETS["800"]
    assert mmdet.padded_shape(800, 1067) == (800, 1088)
    assert mmdet.padded_shape(1333, 267) == (1344, 288)
    assert mmdet.padded_shape(800, 1312) == (800, 1312)
    assert mmdet.padded_shape(1, 33) == (32, 64)
    assert fixed.padded_shape(600, 800) == (800, 800)
    assert fixed.padded_shape(800, 800) == (800, 800)
    with pytest.raises(ValueError, match="exceeds"):
        fixed.padded_shape(801, 800)


# --- resize ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("preset", "size", "new_size", "pad"),
    [
        ("mmdet", (48, 64), (800, 1067), (800, 1088)),
        ("800", (48, 64), (600, 800), (800, 800)),
        ("mmdet", (100, 20), (1333, 267), (1344, 288)),
        ("800", (100, 20), (800, 160), (800, 800)),
        ("800", (1001, 1600), (501, 800), (800, 800)),
    ],
)
def test_resize_is_opencv_bilinear(
    preset: str, size: tuple[int, int], new_size: tuple[int, int], pad: tuple[int, int]
) -> None:
    image = random_bgr(*size)
    resized, meta = resize(image, preset)
    new_h, new_w = new_size
    expected = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    assert resized.dtype == np.uint8
    np.testing.assert_array_equal(resized, expected)
    assert meta == ImageMeta(
        ori_shape=size,
        img_shape=new_size,
        scale_factor=(new_w / size[1], new_h / size[0]),
        pad_shape=pad,
    )


def test_resize_scale_factors_differ_per_axis() -> None:
    _, meta = resize(random_bgr(480, 640), "mmdet")
    assert meta.scale_factor == (1067 / 640, 800 / 480)
    assert meta.scale_factor[0] != meta.scale_factor[1]


def test_resize_rejects_non_colour_images() -> None:
    with pytest.raises(ValueError, match=r"\[H, W, 3\]"):
        resize(np.zeros((10, 10), np.uint8), "mmdet")
    with pytest.raises(ValueError, match=r"\[H, W, 3\]"):
        resize(np.zeros((10, 10, 4), np.uint8), "mmdet")


# --- normalize_pad --------------------------------------------------------------------------------


def hand_normalize_pad(bgr: np.ndarray, pad_shape: tuple[int, int]) -> np.ndarray:
    """The reference computation in float64: flip to RGB, standardise per channel, zero-pad bottom/right."""
    rgb = bgr[:, :, ::-1].astype(np.float64)
    chw = ((rgb - np.array(MEAN_RGB)) / np.array(STD_RGB)).transpose(2, 0, 1)
    out = np.zeros((3, *pad_shape))
    out[:, : bgr.shape[0], : bgr.shape[1]] = chw
    return out


def test_mean_std_constants() -> None:
    assert MEAN_RGB == (123.675, 116.28, 103.53)
    assert STD_RGB == (58.395, 57.12, 57.375)


def test_normalize_pad_known_pixel() -> None:
    image = np.zeros((1, 1, 3), np.uint8)
    image[0, 0] = (0, 128, 255)  # BGR: blue 0, green 128, red 255
    out = normalize_pad(image, (1, 1))
    # RGB (255, 128, 0): (255 - 123.675) / 58.395, (128 - 116.28) / 57.12, (0 - 103.53) / 57.375
    torch.testing.assert_close(out[:, 0, 0], torch.tensor([2.2489083, 0.2051821, -1.8044444]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("preset", ["mmdet", "800"])
def test_normalize_pad_matches_hand_computation(preset: str) -> None:
    resized, meta = resize(random_bgr(30, 50, seed=3), preset)
    out = normalize_pad(resized, meta.pad_shape)
    assert out.dtype == torch.float32
    assert tuple(out.shape) == (3, *meta.pad_shape)
    np.testing.assert_allclose(out.numpy(), hand_normalize_pad(resized, meta.pad_shape), rtol=0, atol=1e-5)
    h, w = meta.img_shape
    assert not out[:, h:, :].any() and not out[:, :, w:].any()


def test_normalize_pad_is_bit_exact_in_float32() -> None:
    bgr = random_bgr(7, 9, seed=4)
    out = normalize_pad(bgr, (32, 32))
    rgb = bgr[:, :, ::-1].transpose(2, 0, 1).astype(np.float32)
    mean = np.array(MEAN_RGB, np.float32)[:, None, None]
    std = np.array(STD_RGB, np.float32)[:, None, None]
    np.testing.assert_array_equal(out[:, :7, :9].numpy(), (rgb - mean) / std)


def test_normalize_pad_accepts_tensors() -> None:
    bgr = random_bgr(5, 6, seed=5)
    torch.testing.assert_close(
        normalize_pad(torch.from_numpy(bgr), (32, 32)), normalize_pad(bgr, (32, 32)), rtol=0, atol=0
    )


def test_normalize_pad_refuses_smaller_pad_shape() -> None:
    with pytest.raises(ValueError):
        normalize_pad(random_bgr(40, 40), (32, 32))


# --- preprocess -----------------------------------------------------------------------------------


def test_preprocess_mmdet() -> None:
    image = random_bgr(480, 640, seed=6)
    tensor, meta = preprocess(image)  # mmdet is the default preset
    assert meta == ImageMeta((480, 640), (800, 1067), (1067 / 640, 800 / 480), (800, 1088))
    assert tuple(tensor.shape) == (3, 800, 1088)
    assert not tensor[:, :, 1067:].any()
    resized = cv2.resize(image, (1067, 800), interpolation=cv2.INTER_LINEAR)
    np.testing.assert_allclose(tensor[:, :, :1067].numpy(), hand_normalize_pad(resized, (800, 1067)), rtol=0, atol=1e-5)


def test_preprocess_800() -> None:
    tensor, meta = preprocess(random_bgr(480, 640, seed=7), "800")
    assert meta == ImageMeta((480, 640), (600, 800), (1.25, 1.25), (800, 800))
    assert tuple(tensor.shape) == (3, 800, 800)
    assert not tensor[:, 600:, :].any()
    assert tensor[:, 599, :].any()


def test_preprocess_large_image_800() -> None:
    image = np.full((2000, 3000, 3), 200, np.uint8)
    image[:, :, 0] = 10
    tensor, meta = preprocess(image, "800")
    assert meta.ori_shape == (2000, 3000)
    assert meta.img_shape == (533, 800)
    assert meta.scale_factor == (800 / 3000, 533 / 2000)
    assert meta.pad_shape == (800, 800)
    assert tuple(tensor.shape) == (3, 800, 800)
    expected = torch.tensor([(200 - 123.675) / 58.395, (200 - 116.28) / 57.12, (10 - 103.53) / 57.375])
    torch.testing.assert_close(tensor[:, :533, :].amin(dim=(1, 2)), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(tensor[:, :533, :].amax(dim=(1, 2)), expected, atol=1e-5, rtol=0)
    assert not tensor[:, 533:, :].any()


def test_preprocess_too_thin_image_raises_value_error() -> None:
    # rescale_size(1, 2000, (800, 800)) == (0, 800): int(1 * 0.4 + 0.5) == 0, and cv2.resize asserts.
    with pytest.raises(ValueError):
        preprocess(np.zeros((1, 2000, 3), np.uint8), "800")


# --- collate --------------------------------------------------------------------------------------


def test_collate_stacks_one_size() -> None:
    first, meta1 = preprocess(random_bgr(480, 640, seed=8), "800")
    second, meta2 = preprocess(random_bgr(300, 200, seed=9), "800")
    images, img_shapes, scale_factors = collate([first, second], [meta1, meta2])
    assert tuple(images.shape) == (2, 3, 800, 800)
    assert torch.equal(images[0], first) and torch.equal(images[1], second)
    assert img_shapes.dtype == torch.float32 and scale_factors.dtype == torch.float32
    assert img_shapes.tolist() == [[600.0, 800.0], [800.0, 533.0]]
    expected_scales = torch.tensor([[1.25, 1.25], [533 / 200, 800 / 300]], dtype=torch.float32)
    assert torch.equal(scale_factors, expected_scales)


def test_collate_refuses_mixed_sizes() -> None:
    first, meta1 = preprocess(random_bgr(48, 64, seed=10), "mmdet")  # 800x1088
    second, meta2 = preprocess(random_bgr(64, 48, seed=11), "mmdet")  # 1088x800
    with pytest.raises(ValueError, match="one padded size"):
        collate([first, second], [meta1, meta2])
