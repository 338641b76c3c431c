"""The CPU as other processes leave it: how many of this process's cores they keep busy, and the OpenMP waiting
policy the command line chooses from that before torch loads.

torch's CPU threads are GNU OpenMP's. By default a thread that reaches the end of a parallel region spins (about
300,000 rounds) before it sleeps, waiting for the others. On an idle machine that is the fastest choice. When
another process shares the cores, the thread it waits for is often descheduled, and the spinning one holds the
core that thread needs: on the 2-core EPYC beside one busy process, a 160 px image took 3.6x as long as alone
(``benchmarks/bench_busy_cpu.py``; docs/benchmarks.md "A busy CPU"). ``OMP_WAIT_POLICY=PASSIVE`` (sleep at once)
keeps that at 1.2x but costs about a fifth of the idle speed, so ``paadet`` chooses it only when other processes
already keep at least half a core busy when a command starts (:func:`choose_openmp_wait_policy`). OpenMP reads the
setting once, when torch loads it; a user's own ``OMP_WAIT_POLICY`` always wins.
"""

from __future__ import annotations

import os
import platform
import sys
import time

BUSY_CORES = 0.5
"""Other processes' load, in cores, from which the command line makes OpenMP's threads wait passively."""


def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (Linux), else :func:`platform.processor`."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def usable_cores() -> int:
    """How many cores this process may run on (its affinity mask), else the machine's count."""
    cpus = _usable_cpus()
    return len(cpus) if cpus else (os.cpu_count() or 1)


def _usable_cpus() -> set[int] | None:
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None


def _read_stat() -> dict[int, tuple[int, int]] | None:
    """``{cpu: (busy, total)}`` jiffies of each CPU from ``/proc/stat`` (Linux), or None where there is none."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            lines = f.readlines()
    except OSError:
        return None
    out = {}
    for line in lines:
        fields = line.split()
        if not fields or not fields[0].startswith("cpu") or fields[0] == "cpu":
            continue
        values = [int(v) for v in fields[1:9]]  # user nice system idle iowait irq softirq steal
        idle = values[3] + (values[4] if len(values) > 4 else 0)
        out[int(fields[0][3:])] = (sum(values) - idle, sum(values))
    return out


def _own_cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


def others_busy_cores(window_s: float = 0.1) -> float | None:
    """How many of this process's usable cores other processes kept busy over the next ``window_s`` seconds
    (0.0 to the core count), or None where ``/proc/stat`` cannot tell."""
    cpus = _usable_cpus()
    before, own_before, start = _read_stat(), _own_cpu_seconds(), time.monotonic()
    time.sleep(window_s)
    after, own_after, elapsed = _read_stat(), _own_cpu_seconds(), time.monotonic() - start
    if not before or not after or elapsed <= 0:
        return None
    busy_cores = 0.0
    for cpu, (busy, total) in after.items():
        if (cpus is not None and cpu not in cpus) or cpu not in before:
            continue
        spent = total - before[cpu][1]
        if spent > 0:
            busy_cores += (busy - before[cpu][0]) / spent
    return max(0.0, busy_cores - (own_after - own_before) / elapsed)


def choose_openmp_wait_policy(window_s: float = 0.1) -> str | None:
    """Set ``OMP_WAIT_POLICY=PASSIVE`` for torch's threads when other processes keep at least :data:`BUSY_CORES`
    busy now; returns the policy set, or None when it leaves OpenMP's default (an idle machine, a policy the user
    set, torch already loaded, or no ``/proc/stat``)."""
    if "OMP_WAIT_POLICY" in os.environ or "torch" in sys.modules:
        return None
    busy = others_busy_cores(window_s)
    if busy is None or busy < BUSY_CORES:
        return None
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return "PASSIVE"
