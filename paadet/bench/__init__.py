"""``paadet bench``: how fast the detector runs here, ``engine`` (the network alone) and ``e2e`` (files to detections).

:func:`run_benchmark` times a :class:`~paadet.runtime.spec.DetectorSpec` with a :class:`BenchTiming` and returns
the report; :func:`format_report` is its terminal table. The modules: ``settings`` (the options, resolved),
``backends`` (the weights and the backend timed), ``auto`` (``--backend auto``), ``images``, ``timing``,
``system`` (the machine), ``report``, and ``profiling`` (counting a function's device work, for tests and
benchmarks). Names are imported on first use: ``paadet bench --help`` imports no torch.
"""

from __future__ import annotations

import importlib

__all__ = [
    "E2E_STAGES",
    "BenchSettings",
    "BenchTiming",
    "choose_backend",
    "format_report",
    "hardware_info",
    "resolve_settings",
    "run_benchmark",
    "versions",
    "write_generated_images",
]

_WHERE = {
    "BenchSettings": "settings",
    "BenchTiming": "settings",
    "choose_backend": "settings",
    "resolve_settings": "settings",
    "E2E_STAGES": "timing",
    "format_report": "report",
    "hardware_info": "system",
    "versions": "system",
    "run_benchmark": "run",
    "write_generated_images": "images",
}


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f"paadet.bench.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'paadet.bench' has no attribute {name!r}")
