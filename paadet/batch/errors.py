"""The error of a batch run that cannot start or go on."""

from __future__ import annotations

from paadet.errors import PaadetError


class BatchError(PaadetError, RuntimeError):
    """A batch run that cannot start or go on: output folder in use or made with another model, a cluster
    without the resources one worker needs, workers that do not start, no workers left. One line."""
