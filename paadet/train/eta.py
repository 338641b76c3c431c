"""The training progress bar's time left, from the recent iterations only.

tqdm's own estimate averages its rate over refreshes; the first iterations of a run (oneDNN picking kernels, the
loader's threads starting, a CPU still busy with what ran before) are often several times slower than the rest,
and an estimate that remembers them says 20 minutes for an epoch that takes 6. :class:`RecentEta` takes the
median of the last ``window`` iteration times instead, which follows a change of speed within ``window / 2``
iterations and ignores a single slow one (a save, a validation).
"""

from __future__ import annotations

import collections
import statistics

WINDOW = 20
"""Iterations the estimate looks back at."""


class RecentEta:
    """Seconds left = the median of the last ``window`` iteration times x the iterations left."""

    def __init__(self, window: int = WINDOW) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self._times: collections.deque[float] = collections.deque(maxlen=window)

    def add(self, seconds: float) -> None:
        """One iteration's wall time."""
        self._times.append(float(seconds))

    def seconds_left(self, remaining: int) -> float | None:
        """The estimate for ``remaining`` iterations, or None before the first one is timed."""
        if not self._times:
            return None
        return statistics.median(self._times) * max(remaining, 0)

    def text(self, remaining: int) -> str:
        """``12:34`` (or ``1:02:03``), as tqdm shows time; ``?`` before the first iteration."""
        left = self.seconds_left(remaining)
        if left is None:
            return "?"
        minutes, seconds = divmod(round(left), 60)
        hours, minutes = divmod(minutes, 60)
        return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes:02d}:{seconds:02d}"
