"""paadet.cpu: other processes' load read from /proc/stat, and the OpenMP waiting policy the command line chooses
from it before torch loads (passive only on a busy CPU, never over the user's own setting)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from paadet import cpu

SPIN = [sys.executable, "-c", "while True: pass"]
CHOOSE = (
    "import os, sys\n"
    "if len(sys.argv) > 1: import torch\n"
    "from paadet.cpu import choose_openmp_wait_policy\n"
    "print(choose_openmp_wait_policy(0.4), os.environ.get('OMP_WAIT_POLICY'))\n"
)


def test_the_arithmetic_counts_other_processes_on_usable_cores_only(monkeypatch: pytest.MonkeyPatch) -> None:
    stats = iter([{0: (100, 1000), 1: (100, 1000)}, {0: (200, 1100), 1: (150, 1100)}])
    own = iter([2.0, 2.5])
    clock = iter([10.0, 11.0])
    monkeypatch.setattr(cpu, "_read_stat", lambda: next(stats))
    monkeypatch.setattr(cpu, "_own_cpu_seconds", lambda: next(own))
    monkeypatch.setattr(cpu.time, "monotonic", lambda: next(clock))
    monkeypatch.setattr(cpu.time, "sleep", lambda s: None)
    monkeypatch.setattr(cpu, "_usable_cpus", lambda: {0, 1})
    # cpu0 fully busy, cpu1 half: 1.5 cores, of which this process used 0.5 core-seconds in 1 s
    assert cpu.others_busy_cores() == pytest.approx(1.0)


def test_no_proc_stat_means_no_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu, "_read_stat", lambda: None)
    assert cpu.others_busy_cores(0.0) is None


def test_a_busy_process_is_seen() -> None:
    spinner = subprocess.Popen(SPIN)
    try:
        time.sleep(0.3)
        busy = cpu.others_busy_cores(0.5)
    finally:
        spinner.kill()
        spinner.wait()
    assert busy is not None and 0.5 <= busy <= len(os.sched_getaffinity(0)) + 0.01, busy


@pytest.mark.parametrize(
    ("user_setting", "torch_first", "expected"),
    [(None, False, "PASSIVE PASSIVE"), ("ACTIVE", False, "None ACTIVE"), (None, True, "None None")],
)
def test_the_policy_is_passive_on_a_busy_cpu_unless_the_user_chose_or_torch_is_loaded(
    user_setting: str | None, torch_first: bool, expected: str
) -> None:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if user_setting:
        env["OMP_WAIT_POLICY"] = user_setting
    spinner = subprocess.Popen(SPIN)
    try:
        time.sleep(0.3)
        cmd = [sys.executable, "-c", CHOOSE] + (["torch"] if torch_first else [])
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, check=True).stdout
    finally:
        spinner.kill()
        spinner.wait()
    assert out.split() == expected.split()
