"""``paadet serve --ray``: the same ASGI app (:func:`paadet.serve.app.create_app`) as a Ray Serve deployment.

Each replica builds its own :class:`~paadet.Detector` and its own app, so batching (the :class:`Batcher`),
the limits and the metrics live inside each replica; Ray Serve's HTTP proxy spreads requests over the
replicas and restarts a replica that dies. Needs ``pip install "paadet[ray-serve]"``.

Example (on a running cluster, from a node of it)::

    paadet serve --ray auto --replicas 4 --device cuda --checkpoint /shared/paa.pth --host 0.0.0.0 --port 8000
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import threading

from paadet.console import RAY_TOKEN_NOTICE_LOGGER, quieted
from paadet.runtime.spec import DetectorSpec
from paadet.serve.settings import ServeSettings

log = logging.getLogger("paadet.serve")

APP_NAME = "paadet"
DEPLOYMENT_NAME = "PaadetDetector"


def absolute_paths(spec: DetectorSpec) -> DetectorSpec:
    """``spec`` with its weights file made absolute: each replica resolves paths itself, from its own folder."""
    changes = {
        name: os.path.abspath(getattr(spec, name))
        for name in ("checkpoint", "model")
        if getattr(spec, name) and os.path.exists(getattr(spec, name))
    }
    return spec.replace(**changes)


def uses_gpu(device: str | None) -> bool:
    return bool(device) and str(device).startswith("cuda")


PROXY_CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
PROXY_CALLBACK = "paadet.serve.ray_serve.proxy_middlewares"


class LostReplicaAs503:
    """ASGI middleware for Ray Serve's HTTP proxy: a request whose replica died is answered 503, not 500.

    When a replica dies with requests in flight (a crash, a lost node), Ray's proxy gets a ``RayActorError``
    and ends the request without a response, which uvicorn turns into a bare ``500 Internal Server Error``.
    Nothing was answered wrongly, the request is simply not answered: say so as the service's API does,
    ``503 {"error": ...}`` with ``Retry-After``, so clients retry (Ray has already routed new requests to
    the live replicas). Responses the app started (its own JSON errors included) pass through untouched.
    """

    def __init__(self, app, retry_after_s: int = 1) -> None:
        self.app = app
        self.retry_after_s = retry_after_s

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracking_send(message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception:
            if started:
                raise
            log.warning("paadet serve: a request lost its replica; answered 503", exc_info=True)
        if not started:
            import json

            body = json.dumps({"error": "the replica serving this request went away; retry"}).encode()
            await send(
                {
                    "type": "http.response.start",
                    "status": 503,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"content-length", str(len(body)).encode()),
                        (b"retry-after", str(self.retry_after_s).encode()),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": body})


def proxy_middlewares() -> list:
    """The Ray Serve proxy callback (``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``): :class:`LostReplicaAs503`."""
    from starlette.middleware import Middleware

    return [Middleware(LostReplicaAs503)]


class WarmLifespan:
    """The app, with its lifespan startup reported complete only once the model is warm.

    Ray Serve routes requests to a replica once its ASGI lifespan has started: holding the
    ``lifespan.startup.complete`` message until the :class:`Batcher` is warm keeps a new (or restarted)
    replica out of the rotation while it loads, instead of answering 503s. A failed warm-up fails the startup,
    and Ray replaces the replica. Other attributes (``state``, ``add_exception_handler``) are the app's.
    """

    def __init__(self, app) -> None:
        self.app = app

    def __getattr__(self, name: str):
        return getattr(self.app, name)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "lifespan":
            return await self.app(scope, receive, send)
        batcher = self.app.state.batcher

        async def send_when_warm(message) -> None:
            if message["type"] == "lifespan.startup.complete":
                while not batcher.ready.is_set() and not batcher.warmup_error:
                    await asyncio.sleep(0.05)
                if batcher.warmup_error:
                    message = {"type": "lifespan.startup.failed", "message": batcher.warmup_error}
            await send(message)

        await self.app(scope, receive, send_when_warm)


def build_deployment(
    spec: DetectorSpec, settings: ServeSettings, *, replicas: int, cpus_per_replica: float, gpus_per_replica: float
):
    """The bound Ray Serve application: ``replicas`` copies of the app, each on its own detector."""
    from ray import serve

    @serve.ingress()  # late-bound: the app is built on the replica, by __serve_build_asgi_app__
    class PaadetDetector:
        async def __init__(self, spec: DetectorSpec, settings: ServeSettings) -> None:
            from paadet.detector import Detector

            if uses_gpu(spec.device):
                # Ray sets CUDA_VISIBLE_DEVICES to this replica's GPU: it is cuda:0 here
                spec = spec.replace(device="cuda")
            self.settings = settings
            self.detector = Detector.from_spec(spec)
            self._paadet_app = None

        def __serve_build_asgi_app__(self):
            from paadet.serve.app import create_app

            self._paadet_app = create_app(self.detector, self.settings)
            return WarmLifespan(self._paadet_app)

        async def check_health(self) -> None:
            """Ray Serve's health check: a replica whose warm-up failed is replaced."""
            batcher = self._paadet_app.state.batcher if self._paadet_app is not None else None
            if batcher is not None and batcher.warmup_error:
                raise RuntimeError(batcher.warmup_error)

    deployment = serve.deployment(
        PaadetDetector,
        name=DEPLOYMENT_NAME,
        num_replicas=replicas,
        ray_actor_options={"num_cpus": cpus_per_replica, "num_gpus": gpus_per_replica},
        # the app admits max_queue requests and answers 503 beyond: let Ray route that many to a replica,
        # and bound what waits in front of the replicas (Ray answers 503 past it)
        max_ongoing_requests=settings.max_queue,
        max_queued_requests=settings.max_queue * replicas,
        graceful_shutdown_timeout_s=settings.timeout_s + 5,
        health_check_period_s=2,
        health_check_timeout_s=30,
    )
    return deployment.bind(spec, settings)


def run_on_ray(
    spec: DetectorSpec,
    settings: ServeSettings,
    *,
    host: str,
    port: int,
    address: str | None = None,
    replicas: int = 1,
    cpus_per_replica: float = 1.0,
    log_level: str = "info",
) -> int:
    """Start (or join) Ray, run the deployment behind Ray Serve's proxy on ``host:port``, wait for SIGTERM.

    ``address``: the cluster to join (``auto``, ``ray://HOST:10001``); None or empty starts a local Ray instance.
    """
    import ray
    from ray import serve

    address = address or None  # "" / None: a local Ray instance started here
    gpus = 1.0 if uses_gpu(spec.device) else 0.0
    cpus = cpus_per_replica
    init_kwargs: dict = {"log_to_driver": log_level in ("info", "debug"), "include_dashboard": False}
    if address is None:
        # the proxy of a local instance inherits this (on a cluster, set it where `ray start` runs)
        os.environ.setdefault(PROXY_CALLBACK_ENV, PROXY_CALLBACK)
        # a local instance: enough CPUs for the replicas even on a small machine (the proxy and controller need none)
        init_kwargs["num_cpus"] = max(os.cpu_count() or 1, int(cpus * replicas + 0.999))
    else:
        init_kwargs.pop("include_dashboard")
        if os.environ.get(PROXY_CALLBACK_ENV) != PROXY_CALLBACK:
            log.warning(
                "paadet serve: for 503 (not 500) answers when a replica dies, start the cluster's Ray with %s=%s",
                PROXY_CALLBACK_ENV,
                PROXY_CALLBACK,
            )
    # a local instance: Ray's notice that it turned its default token authentication on is not the user's concern
    with quieted(RAY_TOKEN_NOTICE_LOGGER) if address is None else contextlib.nullcontext():
        ray.init(address=address, **init_kwargs)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stop.set())
    started_serve = False
    try:
        serve.start(http_options={"host": host, "port": port}, logging_config={"log_level": log_level.upper()})
        started_serve = True
        app = build_deployment(
            absolute_paths(spec), settings, replicas=replicas, cpus_per_replica=cpus, gpus_per_replica=gpus
        )
        serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
        print(f"paadet serve: {replicas} replica(s) on Ray Serve at http://{host}:{port}", flush=True)
        while not stop.wait(1.0):
            pass
        log.info("paadet serve: stopping (draining the replicas)")
    finally:
        if started_serve:
            try:
                if address is None:
                    serve.shutdown()  # our own instance: take the proxy down with it
                else:
                    serve.delete(APP_NAME)  # a shared cluster: remove only our application
            except Exception as exc:
                log.warning("paadet serve: Ray Serve shutdown: %s", exc)
        ray.shutdown()
    return 0
