"""The Detector API: inputs, batching by padded size, batch invariance, errors."""

from __future__ import annotations

import re
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from paadet.data.images import ImageReadError
from paadet.data.pipeline import iter_loaded
from paadet.data.synthetic import synthetic_image
from paadet.detector import Detector
from paadet.model import PAANet
from paadet.model.seeded import seeded_state_dict
from paadet.preprocess import Preset
from paadet.runtime.torch_backend import TorchBackend

# Small inputs keep the network cheap; the batching logic is the same as for the real presets.
SMALL = Preset("small", (256, 160), size_divisor=32)


@pytest.fixture(scope="module")
def net() -> PAANet:
    torch.manual_seed(0)
    model = PAANet()
    model.load_state_dict(seeded_state_dict(0))
    return model


def make_detector(net: PAANet, batch_size: int) -> Detector:
    return Detector(TorchBackend(net, preset=SMALL), batch_size=batch_size, workers=2)


def images() -> list[np.ndarray]:
    # sizes chosen so that several share a padded size and some do not
    sizes = [(120, 160), (100, 160), (160, 120), (120, 160), (90, 200), (160, 160), (60, 250), (119, 161)]
    return [synthetic_image(h, w, seed=i) for i, (h, w) in enumerate(sizes)]


def test_batch_of_8_equals_one_by_one(net: PAANet) -> None:
    imgs = images()
    alone = make_detector(net, 1).predict(imgs)
    batched = make_detector(net, 8).predict(imgs)
    assert len(alone) == len(batched) == 8
    padded = {m.meta.pad_shape for m in iter_loaded(imgs, SMALL, workers=0)}
    assert 1 < len(padded) < 8  # the batch really mixes sizes and shares some
    for a, b in zip(alone, batched, strict=False):
        assert a.ori_shape == b.ori_shape
        assert len(a.scores) == len(b.scores) > 0
        np.testing.assert_array_equal(a.labels, b.labels)
        np.testing.assert_allclose(a.boxes, b.boxes, rtol=0, atol=1e-3)
        np.testing.assert_allclose(a.scores, b.scores, rtol=0, atol=1e-5)


def test_paths_and_arrays_agree(net: PAANet, tmp_path: Path) -> None:
    img = synthetic_image(100, 140, seed=3)
    path = tmp_path / "x.png"
    cv2.imwrite(str(path), img)
    det = make_detector(net, 2)
    from_path, from_str, from_array = det.predict([path, str(path), img])
    assert from_path.file_name == str(path) and from_array.file_name is None
    # the first two run as one batch, the array alone: equal up to float rounding of the convolutions
    for r in (from_str, from_array, det.predict(img)[0]):
        np.testing.assert_array_equal(r.labels, from_path.labels)
        np.testing.assert_allclose(r.boxes, from_path.boxes, rtol=0, atol=1e-3)
        np.testing.assert_allclose(r.scores, from_path.scores, rtol=0, atol=1e-5)


def test_results_are_sorted_and_in_original_pixels(net: PAANet) -> None:
    (r,) = make_detector(net, 1).predict(synthetic_image(90, 200, seed=5))
    assert r.ori_shape == (90, 200)
    assert np.all(np.diff(r.scores) <= 0)
    assert r.boxes[:, [0, 2]].max() <= 200 + 1e-3 and r.boxes[:, [1, 3]].max() <= 90 + 1e-3
    assert r.boxes.min() >= 0
    assert set(r.labels.tolist()) <= set(range(80))
    entry = r.to_coco(image_id=7)[0]
    x1, y1, x2, y2 = r.boxes[0].tolist()
    assert entry["bbox"] == pytest.approx([x1, y1, x2 - x1, y2 - y1])
    assert entry["image_id"] == 7 and 1 <= entry["category_id"] <= 90


def test_unreadable_file_raises_naming_it(net: PAANet, tmp_path: Path) -> None:
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(ImageReadError, match=re.escape("broken.jpg")):
        make_detector(net, 1).predict([bad])


def test_bad_arrays_are_refused(net: PAANet) -> None:
    det = make_detector(net, 1)
    with pytest.raises(ValueError, match="uint8"):
        det.predict(np.zeros((10, 10, 3), np.float32))
    with pytest.raises(ValueError, match=r"\[H, W, 3\]"):
        det.predict(np.zeros((10, 10, 4), np.uint8))


def test_batch_size_must_be_positive(net: PAANet) -> None:
    with pytest.raises(ValueError, match="batch_size"):
        make_detector(net, 0)


def test_fp16_on_cpu_is_refused(net: PAANet) -> None:
    with pytest.raises(ValueError, match="CUDA"):
        TorchBackend(net, preset=SMALL, fp16=True)


class _ConcurrentBackend:
    """A backend that detects one box per image, of the image's size, and records how many of its ``infer``
    calls overlap; with ``concurrency`` 2 the first two calls must meet at a barrier or the test fails."""

    def __init__(self, concurrency: int, fail_at: int | None = None) -> None:
        import threading

        self.preset, self.concurrency, self.fixed_batch, self.fail_at = SMALL, concurrency, None, fail_at
        self._barrier = threading.Barrier(concurrency, timeout=10) if concurrency > 1 else None
        self._lock = threading.Lock()
        self.active = self.max_active = self.calls = 0

    def infer(self, images, metas, timer=None):
        from paadet.detections import Detections

        with self._lock:
            self.calls += 1
            if self.calls == self.fail_at:
                raise RuntimeError(f"call {self.calls} failed")
            first = self.calls <= self.concurrency
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        if self._barrier is not None and first:
            self._barrier.wait()  # BrokenBarrierError after 10 s unless another call runs at the same time
        with self._lock:
            self.active -= 1
        n = len(images)
        boxes = np.zeros((n, 1, 4), np.float32)
        for i, m in enumerate(metas):
            boxes[i, 0, 2:] = m.ori_shape[1], m.ori_shape[0]
        return Detections(boxes, np.ones((n, 1), np.float32), np.zeros((n, 1), np.int64), np.ones(n, np.int64))


@pytest.mark.parametrize("concurrency", [1, 2, 3])
def test_a_concurrent_backend_gets_batches_at_once_and_every_result_its_image(concurrency: int) -> None:
    backend = _ConcurrentBackend(concurrency)
    inputs = images()
    results = Detector(backend, batch_size=1, workers=0).predict(inputs)
    assert backend.calls == len(inputs) and backend.max_active == concurrency
    for image, result in zip(inputs, results, strict=False):
        np.testing.assert_array_equal(result.boxes, [[0, 0, image.shape[1], image.shape[0]]])
        assert result.ori_shape == image.shape[:2]


def test_a_failing_batch_stops_a_concurrent_run_with_its_error_and_no_thread_left() -> None:
    import threading

    with pytest.raises(RuntimeError, match="call 4 failed"):
        Detector(_ConcurrentBackend(2, fail_at=4), batch_size=1, workers=0).predict(images())
    assert not [t for t in threading.enumerate() if t.name.startswith("paadet-infer")]
    # a consumer that stops early: the pool is shut down when the generator is closed
    backend = _ConcurrentBackend(2)
    detector = Detector(backend, batch_size=2, workers=0)
    stream = detector.run(iter_loaded(images(), SMALL, workers=0))
    first = next(stream)
    stream.close()
    assert first[1] is not None and backend.calls <= 4
    assert not [t for t in threading.enumerate() if t.name.startswith("paadet-infer")]
