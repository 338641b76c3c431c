"""The Ray side of a run: joining or starting the cluster, checking that it can hold a worker, and starting
the pool of workers under a deadline, so that a run never waits forever on resources that are not there."""

from __future__ import annotations

import contextlib
import logging
import math
import re
import time
from collections.abc import Callable
from typing import Any

from paadet.batch.errors import BatchError
from paadet.batch.worker import ShardWorker
from paadet.console import RAY_TOKEN_NOTICE_LOGGER, quieted
from paadet.errors import one_line
from paadet.runtime.spec import DetectorSpec

DEFAULT_START_TIMEOUT = 120.0
"""Seconds to wait for Ray to start the workers (place them on nodes with free resources) by default."""

_EPS = 1e-9


def require_ray():
    """Import Ray, or fail with the command that installs it."""
    try:
        import ray
    except ImportError:
        raise BatchError("Ray is not installed; install the extra: pip install 'paadet[ray]'") from None
    return ray


def connect(ray, address: str | None) -> bool:
    """Join ``address`` (None: start a local instance) unless Ray is initialised; whether this call started it.

    Raises:
        BatchError: Ray cannot start or the cluster cannot be reached.
    """
    if ray.is_initialized():
        return False
    try:
        # a local instance: Ray's notice that it turned its default token authentication on is not the user's concern
        with quieted(RAY_TOKEN_NOTICE_LOGGER) if address is None else contextlib.nullcontext():
            ray.init(address=address or "local", include_dashboard=False, logging_level=logging.WARNING)
    except Exception as exc:
        where = f"join the Ray cluster at {address}" if address else "start a local Ray instance"
        raise BatchError(one_line(f"cannot {where}: {type(exc).__name__}: {exc}")) from exc
    return True


def _amount(value: float, unit: str) -> str:
    return f"{value:g} {unit}{'' if value == 1 else 's'}"


def describe_resources(resources: dict[str, float]) -> str:
    """``"2 CPUs and no GPU"``: the CPUs and GPUs of a resources dict."""
    gpus = resources.get("GPU", 0.0)
    return f"{_amount(resources.get('CPU', 0.0), 'CPU')} and {_amount(gpus, 'GPU') if gpus else 'no GPU'}"


def worker_need(cpus_per_worker: float, gpus_per_worker: float) -> str:
    """What one worker needs on one node, in words."""
    need = _amount(cpus_per_worker, "CPU")
    return f"{_amount(gpus_per_worker, 'GPU')} and {need}" if gpus_per_worker > 0 else need


def node_capacity(resources: dict[str, float], cpus_per_worker: float, gpus_per_worker: float) -> int:
    """How many workers of ``cpus_per_worker`` CPUs and ``gpus_per_worker`` GPUs one node's resources hold."""
    fits = math.floor(resources.get("CPU", 0.0) / cpus_per_worker + _EPS)
    if gpus_per_worker > 0:
        fits = min(fits, math.floor(resources.get("GPU", 0.0) / gpus_per_worker + _EPS))
    return max(fits, 0)


def cluster_capacity(ray, cpus_per_worker: float, gpus_per_worker: float) -> int:
    """How many workers the cluster's nodes hold (their total resources, busy or not; one worker is on one node).

    Raises:
        BatchError: no node has what one worker needs (e.g. ``--device cuda`` on a cluster without GPUs):
            the message says what is missing and what the cluster has.
    """
    total = ray.cluster_resources()
    try:
        nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive", True)]
    except Exception:
        nodes = [total]
    capacity = sum(node_capacity(r, cpus_per_worker, gpus_per_worker) for r in nodes)
    if capacity > 0:
        return capacity
    have = f"{describe_resources(total)} on {len(nodes)} node{'' if len(nodes) == 1 else 's'}"
    if gpus_per_worker > 0 and not any(r.get("GPU", 0.0) >= gpus_per_worker - _EPS for r in nodes):
        largest = max((r.get("GPU", 0.0) for r in nodes), default=0.0)
        what = (
            f"GPUs: each worker needs {_amount(gpus_per_worker, 'GPU')} (--gpus-per-worker {gpus_per_worker:g}"
            f"{', the default with --device cuda' if gpus_per_worker == 1 else ''})"
        )
        hint = (
            "use --device cpu, or join a cluster with GPUs (--ray ADDRESS)"
            if largest == 0
            else "lower --gpus-per-worker"
        )
        raise BatchError(f"the Ray cluster lacks {what}, but it has {have}; {hint}")
    raise BatchError(
        f"the Ray cluster lacks CPUs: each worker needs {worker_need(cpus_per_worker, gpus_per_worker)} "
        f"on one node (--cpus-per-worker {cpus_per_worker:g}), but it has {have}; "
        f"lower --cpus-per-worker"
    )


def start_workers(
    ray,
    spec: DetectorSpec,
    count: int,
    cpus_per_worker: float,
    gpus_per_worker: float,
    start_timeout: float,
    warn: Callable[[str], None],
    weights_check: tuple[int, int, str] | None = None,
) -> tuple[list[Any], dict[int, dict[str, Any]]]:
    """Start ``count`` actors, wait at most ``start_timeout`` s for Ray to place them, then load their models.

    ``weights_check`` goes to each worker (see :class:`~paadet.batch.worker.ShardWorker`).
    Workers not placed by the deadline (the cluster's resources are taken by other jobs) are dropped
    with a warning when at least one was placed.

    Returns:
        ``(actors, identities)``: every actor created (by worker number; kill them all at the end) and
        the identity of each started one, by worker number.

    Raises:
        BatchError: no worker was placed within ``start_timeout``; or a worker failed to start or to
            load its model (the worker's own error, e.g. a corrupt checkpoint).
    """
    threads = max(1, int(cpus_per_worker))
    actor_class = ray.remote(ShardWorker).options(
        num_cpus=cpus_per_worker,
        num_gpus=gpus_per_worker,
        max_restarts=-1,
        max_task_retries=0,
    )
    actors = [actor_class.remote(i, spec, threads, weights_check) for i in range(count)]
    waiting = {actor.placed.remote(): i for i, actor in enumerate(actors)}
    deadline = time.monotonic() + start_timeout
    placed: list[int] = []
    try:
        while waiting:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            ready, _ = ray.wait(list(waiting), num_returns=1, timeout=left)
            for ref in ready:
                i = waiting.pop(ref)
                ray.get(ref)
                placed.append(i)
        if not placed:
            free = describe_resources(ray.available_resources())
            raise BatchError(
                f"no worker started within --start-timeout {start_timeout:g} s: each needs "
                f"{worker_need(cpus_per_worker, gpus_per_worker)} on one node and the Ray cluster has {free} free "
                f"of {describe_resources(ray.cluster_resources())} (taken by other jobs); "
                f"try again later or raise --start-timeout"
            )
        if waiting:
            warn(
                f"{len(waiting)} of {count} workers did not start within --start-timeout {start_timeout:g} s "
                f"(the cluster's resources are taken); going on with {len(placed)}"
            )
            for i in waiting.values():
                ray.kill(actors[i], no_restart=True)
        placed.sort()
        identities = dict(zip(placed, ray.get([actors[i].ready.remote() for i in placed]), strict=False))
    except ray.exceptions.RayError as exc:
        raise BatchError(f"the workers could not start: {reason(exc)}") from exc
    return actors, identities


def reason(exc: BaseException) -> str:
    """One line saying why a Ray call failed: the worker's own exception (the last line of the traceback
    Ray carries) for an error raised in the worker, else the first line of Ray's message."""
    import ray

    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(exc).splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        return type(exc).__name__
    raised_in_worker = isinstance(exc, ray.exceptions.RayTaskError) or getattr(exc, "_actor_init_failed", False)
    return one_line(lines[-1] if raised_in_worker else lines[0])
