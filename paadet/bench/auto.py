"""``paadet bench --backend auto`` on a CPU: time each backend on the benchmark's first image, keep the fastest.

The candidates run the same graph at its own precision (ONNX Runtime, OpenVINO ``f32``): the fp32 export of
the weights, or the user's ``--model``. Reduced precision (OpenVINO ``bf16``, an int8 graph) is never chosen
silently: the user asks for it with ``--precision`` or ``--model``. The probe is one untimed warm-up call and
``rounds`` timed calls of the backend's ``infer`` on the same resized image; the median decides. Its figures go into the
report (``auto``), and the command prints which backend it chose and why.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from paadet.data.images import read_image
from paadet.preprocess import Preset, resize
from paadet.runtime.base import Backend
from paadet.runtime.spec import GRAPH_BACKENDS, OPENVINO

CPU_FP32_CANDIDATES = GRAPH_BACKENDS


def available_cpu_candidates(model: str | None = None) -> list[str]:
    """The installed fp32 CPU backends that can run ``model`` (an OpenVINO IR ``.xml`` only on OpenVINO)."""
    found = []
    for name in CPU_FP32_CANDIDATES:
        if model is not None and model.lower().endswith(".xml") and name != OPENVINO:  # an IR is OpenVINO's alone
            continue
        try:
            __import__(name)
        except ImportError:
            continue
        found.append(name)
    return found


def probe(backends: dict[str, Backend], path: Path, preset: Preset, rounds: int = 2) -> dict[str, float]:
    """Median milliseconds of ``infer`` on ``path`` (resized by ``preset``) for each backend, after a warm-up (the
    probe of :func:`paadet.export.auto.probe`, on the benchmark's own image)."""
    from paadet.export.auto import probe as probe_image

    image, meta = resize(read_image(path), preset)
    return probe_image(backends, image, meta, rounds)


def choose_fastest(
    backends: dict[str, Backend], paths: Sequence[Path], preset: Preset, rounds: int = 2
) -> tuple[str, dict[str, Any]]:
    """The fastest backend's name and the probe's report (``candidates_ms``, ``chosen``, ``rule``)."""
    timings = probe(backends, paths[0], preset, rounds)
    chosen = min(timings, key=timings.get)
    return chosen, {
        "candidates_ms": {k: round(v, 1) for k, v in timings.items()},
        "chosen": chosen,
        "rule": f"fastest backend at the graph's own precision: median of {rounds} calls on {Path(paths[0]).name} "
        "after a warm-up; "
        "reduced precision only when asked",
    }
