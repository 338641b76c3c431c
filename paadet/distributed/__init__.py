"""The old import path of :mod:`paadet.batch` (``paadet batch``'s library), kept so that existing code runs:
``from paadet.distributed import run_batch`` is ``from paadet.batch import run_batch``. ``ModelSpec`` is
:class:`paadet.DetectorSpec`."""

from __future__ import annotations

from paadet.batch import *  # noqa: F403 (re-exports the package's public names)
from paadet.batch import __all__ as _batch_all
from paadet.runtime.spec import DetectorSpec as ModelSpec

__all__ = [*_batch_all, "ModelSpec"]
