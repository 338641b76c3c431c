"""Tests for paadet.data.images: mmcv-identical decoding, error reporting and image listing."""

from __future__ import annotations

import io
import os
import pathlib
import pickle
import re

import cv2
import numpy as np
import pytest
from PIL import Image

from paadet.data import (
    IMAGE_EXTENSIONS,
    ImageReadError,
    ImageSource,
    decode_image,
    list_images,
    read_image,
)

EXIF_ORIENTATION = 0x0112


def quadrants_rgb(height: int = 24, width: int = 40) -> np.ndarray:
    """An RGB image of four flat colour blocks (red, green / blue, white): easy to locate after a rotation."""
    image = np.zeros((height, width, 3), np.uint8)
    h2, w2 = height // 2, width // 2
    image[:h2, :w2] = (255, 0, 0)
    image[:h2, w2:] = (0, 255, 0)
    image[h2:, :w2] = (0, 0, 255)
    image[h2:, w2:] = (255, 255, 255)
    return image


def jpeg_bytes(rgb: np.ndarray, orientation: int | None = None) -> bytes:
    """Encode with PIL at high quality, no chroma subsampling, optionally tagging an EXIF orientation."""
    exif = Image.Exif()
    if orientation is not None:
        exif[EXIF_ORIENTATION] = orientation
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, "JPEG", quality=95, subsampling=0, exif=exif)
    return buffer.getvalue()


def png_bytes(array: np.ndarray, mode: str | None = None) -> bytes:
    """Encode with PIL as PNG."""
    buffer = io.BytesIO()
    (Image.fromarray(array, mode) if mode else Image.fromarray(array)).save(buffer, "PNG")
    return buffer.getvalue()


# --- decoding -------------------------------------------------------------------------------------


def test_jpeg_exif_orientation_is_applied(tmp_path: pathlib.Path) -> None:
    rgb = quadrants_rgb()
    path = tmp_path / "rotated.jpg"
    path.write_bytes(jpeg_bytes(rgb, orientation=6))

    image = read_image(path)

    assert image.dtype == np.uint8
    assert image.shape == (40, 24, 3)  # orientation 6: rotate 90 degrees clockwise for display
    expected_bgr = np.rot90(rgb[:, :, ::-1], k=-1)
    assert np.abs(image.astype(np.int16) - expected_bgr).max() <= 8
    # The stored pixels, rotated by hand, are exactly what decoding returns.
    stored = cv2.imdecode(np.frombuffer(path.read_bytes(), np.uint8), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    assert stored.shape == (24, 40, 3)
    np.testing.assert_array_equal(image, np.rot90(stored, k=-1))
    # Top-left of the displayed image is the stored bottom-left block (blue, BGR (255, 0, 0)).
    np.testing.assert_allclose(image[2, 2], (255, 0, 0), atol=8)


def test_jpeg_without_orientation_keeps_shape() -> None:
    rgb = quadrants_rgb()
    image = decode_image(jpeg_bytes(rgb), "plain.jpg")
    assert image.shape == (24, 40, 3)
    assert np.abs(image.astype(np.int16) - rgb[:, :, ::-1]).max() <= 8


def test_grey_png_gives_three_equal_channels() -> None:
    grey = np.arange(0, 240, 10, dtype=np.uint8).reshape(4, 6)
    image = decode_image(png_bytes(grey, "L"), "grey.png")
    assert image.shape == (4, 6, 3) and image.dtype == np.uint8
    for channel in range(3):
        np.testing.assert_array_equal(image[:, :, channel], grey)


def test_rgba_png_drops_alpha_and_returns_bgr() -> None:
    rgba = np.random.default_rng(0).integers(0, 256, (5, 7, 4), dtype=np.uint8)
    rgba[:, :, 3] = np.arange(35, dtype=np.uint8).reshape(5, 7)  # mostly transparent: must not matter
    image = decode_image(png_bytes(rgba, "RGBA"), "rgba.png")
    assert image.shape == (5, 7, 3)
    np.testing.assert_array_equal(image[:, :, 0], rgba[:, :, 2])  # B
    np.testing.assert_array_equal(image[:, :, 1], rgba[:, :, 1])  # G
    np.testing.assert_array_equal(image[:, :, 2], rgba[:, :, 0])  # R


def test_16bit_png_keeps_the_high_byte(tmp_path: pathlib.Path) -> None:
    # 255 -> 0 and 65280 -> 255 tell "v >> 8" apart from rounding (v * 255 / 65535).
    values = np.array([0, 255, 256, 257, 32767, 32768, 65280, 65407, 65535], dtype=np.uint16)
    bgr16 = np.stack([values, values[::-1], np.roll(values, 3)], axis=-1)[None]  # [1, 9, 3], BGR
    path = tmp_path / "deep.png"
    assert cv2.imwrite(str(path), bgr16)

    image = read_image(path)

    expected = np.empty(bgr16.shape, np.uint8)
    for index, value in np.ndenumerate(bgr16):
        expected[index] = int(value) // 256
    assert expected[0, 1, 0] == 0 and expected[0, 6, 0] == 255
    np.testing.assert_array_equal(image, expected)


def test_16bit_grey_png_from_pil() -> None:
    grey16 = np.array([[0, 255, 256, 65280, 65535, 32768]], dtype=np.uint16)
    image = decode_image(png_bytes(grey16), "grey16.png")
    for channel in range(3):
        np.testing.assert_array_equal(image[:, :, channel], [[0, 0, 1, 255, 255, 128]])


def test_decode_matches_mmcv_recipe() -> None:
    data = jpeg_bytes(quadrants_rgb(), orientation=3)
    reference = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    np.testing.assert_array_equal(decode_image(data, "x.jpg"), reference)


# --- errors ---------------------------------------------------------------------------------------


def assert_one_line_naming(exc: pytest.ExceptionInfo[ImageReadError], name: str, reason: str) -> None:
    """The error message is one line that names the file and contains the reason."""
    message = str(exc.value)
    assert "\n" not in message
    assert name in message
    assert reason in message


def test_corrupt_file(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "corrupt.jpg"
    path.write_bytes(b"this is not an image at all" * 10)
    with pytest.raises(ImageReadError) as exc:
        read_image(path)
    assert_one_line_naming(exc, str(path), "corrupt")


def test_truncated_header(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "cut.png"
    path.write_bytes(png_bytes(np.zeros((8, 8), np.uint8), "L")[:20])
    with pytest.raises(ImageReadError) as exc:
        read_image(path)
    assert_one_line_naming(exc, str(path), "cannot read image")


def test_empty_file(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    with pytest.raises(ImageReadError) as exc:
        read_image(path)
    assert_one_line_naming(exc, str(path), "empty")


def test_empty_bytes() -> None:
    with pytest.raises(ImageReadError, match=r"nothing\.jpg.*empty"):
        decode_image(b"", "nothing.jpg")


def test_missing_file(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "missing.jpg"
    with pytest.raises(ImageReadError) as exc:
        read_image(path)
    assert_one_line_naming(exc, str(path), "no such file")


def test_directory(tmp_path: pathlib.Path) -> None:
    folder = tmp_path / "folder.jpg"
    folder.mkdir()
    with pytest.raises(ImageReadError) as exc:
        read_image(folder)
    assert_one_line_naming(exc, str(folder), "directory")


def test_permission_denied(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Tests may run as root, where chmod 000 does not stop reading: simulate the OS error instead.
    path = tmp_path / "locked.png"
    path.write_bytes(b"\x89PNG")

    def deny(self: pathlib.Path) -> bytes:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(pathlib.Path, "read_bytes", deny)
    with pytest.raises(ImageReadError) as exc:
        read_image(path)
    assert_one_line_naming(exc, str(path), "permission denied")


def test_read_image_accepts_str(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "s.png"
    path.write_bytes(png_bytes(np.full((3, 2), 7, np.uint8), "L"))
    assert read_image(str(path)).shape == (3, 2, 3)


def test_error_survives_pickling() -> None:
    error = ImageReadError("cannot read image a.jpg: the file is empty")
    assert str(pickle.loads(pickle.dumps(error))) == str(error)


# --- listing --------------------------------------------------------------------------------------


@pytest.fixture
def tree(tmp_path: pathlib.Path) -> pathlib.Path:
    """A nested folder with images (mixed-case extensions), non-images and a decoy folder."""
    root = tmp_path / "images"
    for rel in ["b.jpg", "a.PNG", "sub/c.jpeg", "sub/deeper/d.Tif", "sub/e.webp", "z/f.bmp", "z/g.tiff"]:
        file = root / rel
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_bytes(b"x")
    (root / "notes.txt").write_text("not an image")
    (root / "sub" / "labels.json").write_text("{}")
    (root / "sub" / "no_extension").write_bytes(b"x")
    (root / "folder.jpg").mkdir()  # a folder named like an image: searched, not listed
    (root / "folder.jpg" / "h.jpg").write_bytes(b"x")
    return root


def test_extensions() -> None:
    assert {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"} == IMAGE_EXTENSIONS


def test_list_folder_recursive_sorted_relative(tree: pathlib.Path) -> None:
    sources = list_images([tree])
    names = [source.file_name for source in sources]
    assert names == sorted(names)
    assert names == [
        "a.PNG",
        "b.jpg",
        "folder.jpg/h.jpg",
        "sub/c.jpeg",
        "sub/deeper/d.Tif",
        "sub/e.webp",
        "z/f.bmp",
        "z/g.tiff",
    ]
    for source in sources:
        assert isinstance(source, ImageSource)
        assert source.path == tree / source.file_name
        assert source.path.is_file()


def test_list_relative_folder_argument(tree: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tree.parent)
    sources = list_images(["images/sub"])
    assert [s.file_name for s in sources] == ["c.jpeg", "deeper/d.Tif", "e.webp"]
    assert sources[0].path == pathlib.Path("images/sub/c.jpeg")


def test_list_direct_files_keep_their_name(tree: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tree)
    sources = list_images(["notes.txt", pathlib.Path("sub/c.jpeg"), str(tree / "b.jpg")])
    assert [s.file_name for s in sources] == ["notes.txt", os.path.join("sub", "c.jpeg"), str(tree / "b.jpg")]
    assert sources[0].path == pathlib.Path("notes.txt")


def test_list_mix_in_input_order_without_duplicates(tree: pathlib.Path) -> None:
    sources = list_images([tree / "z", tree / "b.jpg", tree, tree / "z" / ".." / "b.jpg", tree / "z"])
    names = [s.file_name for s in sources]
    # z's files first (folder order), then b.jpg as given, then the rest of the tree, each file once.
    assert names == [
        "f.bmp",
        "g.tiff",
        str(tree / "b.jpg"),
        "a.PNG",
        "folder.jpg/h.jpg",
        "sub/c.jpeg",
        "sub/deeper/d.Tif",
        "sub/e.webp",
    ]
    assert len({s.path.resolve() for s in sources}) == len(sources)


def test_list_single_path_and_empty(tree: pathlib.Path) -> None:
    assert list_images(tree / "z") == list_images([tree / "z"])
    assert list_images([]) == []
    empty = tree / "empty"
    empty.mkdir()
    assert list_images([empty]) == []


def test_list_missing_input(tree: pathlib.Path) -> None:
    missing = tree / "nope.jpg"
    with pytest.raises(FileNotFoundError, match=re.escape("nope.jpg")):
        list_images([tree, missing])


def test_listed_images_decode(tmp_path: pathlib.Path) -> None:
    folder = tmp_path / "real"
    folder.mkdir()
    (folder / "one.JPG").write_bytes(jpeg_bytes(quadrants_rgb()))
    (folder / "two.png").write_bytes(png_bytes(np.zeros((3, 5), np.uint8), "L"))
    shapes = [read_image(s.path).shape for s in list_images([folder])]
    assert shapes == [(24, 40, 3), (3, 5, 3)]
