"""The training bar's time left follows the recent iterations, not the slow first ones."""

from __future__ import annotations

import pytest

from paadet.train.eta import RecentEta


def test_slow_first_iterations_are_forgotten():
    eta = RecentEta(window=20)
    assert eta.seconds_left(100) is None and eta.text(100) == "?"
    for _ in range(5):
        eta.add(10.0)  # oneDNN choosing kernels, the loader starting
    assert eta.seconds_left(100) == pytest.approx(1000.0)
    for _ in range(11):
        eta.add(1.0)
    # the median of the last 20 (5 slow, 11 fast) is fast: 100 s left, where the mean (3.8 s) would say 380
    assert eta.seconds_left(100) == pytest.approx(100.0)
    assert eta.text(100) == "01:40"
    eta.add(600.0)  # one slow iteration (a save, a validation) does not move it
    assert eta.seconds_left(100) == pytest.approx(100.0)


def test_format_and_window():
    eta = RecentEta(window=2)
    for seconds in (100.0, 2.0, 3.0):
        eta.add(seconds)
    assert eta.seconds_left(2000) == pytest.approx(5000.0)  # median of the last two only
    assert eta.text(2000) == "1:23:20" and eta.text(0) == "00:00"
    with pytest.raises(ValueError, match="window"):
        RecentEta(window=0)
