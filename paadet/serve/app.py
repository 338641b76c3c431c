"""The ASGI app of ``paadet serve`` (Starlette): ``create_app(detector, settings)``.

Routes: ``POST /v1/detect``, ``GET /readyz``, ``GET /healthz``, ``GET /metrics`` (Prometheus),
``GET /openapi.json``, and the web page at ``GET /``. The app starts its :class:`Batcher` in its
lifespan and drains it on shutdown; when you mount it in another server, run that lifespan (or call
``app.state.batcher.start()`` / ``.close()`` yourself). The service never fetches a URL or opens a
path a request names: it reads only the request's body.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from paadet.detections import detections_json
from paadet.detector import Detector
from paadet.serve.access import AccessLog, startup_line
from paadet.serve.batcher import Batcher
from paadet.serve.limits import RequestError, check_api_key
from paadet.serve.page import page_html
from paadet.serve.receive import Receiving, image_from_body
from paadet.serve.settings import ServeSettings

log = logging.getLogger("paadet.serve")


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """``{"error": "one line"}`` with ``status``."""
    return JSONResponse({"error": " ".join(str(message).split())}, status_code=status, headers=headers)


class Metrics:
    """The app's Prometheus metrics, in a registry of its own (several apps may live in one process)."""

    def __init__(self, batcher: Batcher, max_batch: int) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter(
            "paadet_requests", "POST /v1/detect requests answered, by HTTP status", ["status"], registry=self.registry
        )
        self.latency = Histogram(
            "paadet_request_latency_seconds",
            "POST /v1/detect time from arrival to answer",
            registry=self.registry,
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, math.inf),
        )
        batch_buckets = sorted(
            {1, 2, 4, 8, 16, 32, 64, max_batch} - {b for b in (2, 4, 8, 16, 32, 64) if b > max_batch}
        )
        self.batch_size = Histogram(
            "paadet_batch_size",
            "images per network call",
            registry=self.registry,
            buckets=(*tuple(batch_buckets), math.inf),
        )
        self.batch_seconds = Histogram(
            "paadet_batch_seconds", "time of one network call (pre/network/post)", registry=self.registry
        )
        self.queue_depth = Gauge(
            "paadet_queue_depth", "detect requests admitted and not yet answered", registry=self.registry
        )
        self.queue_depth.set_function(batcher.queue_depth)
        self.receiving = Gauge(
            "paadet_receiving_requests",
            "detect requests whose bodies are arriving (not admitted yet)",
            registry=self.registry,
        )
        self.ready = Gauge("paadet_ready", "1 once the model is loaded and warm", registry=self.registry)
        self.ready.set_function(lambda: 1.0 if batcher.ready.is_set() else 0.0)

    def on_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.batch_seconds.observe(seconds)


def _query(request: Request) -> tuple[float | None, int | None]:
    """``score_thr`` in [0, 1] and ``max_dets`` >= 0 from the query string (400 otherwise)."""
    score_thr = max_dets = None
    text = request.query_params.get("score_thr")
    if text is not None:
        try:
            score_thr = float(text)
        except ValueError:
            raise RequestError(400, f"score_thr must be a number, got {text!r}") from None
        if not 0.0 <= score_thr <= 1.0:
            raise RequestError(400, f"score_thr must be between 0 and 1, got {text}")
    text = request.query_params.get("max_dets")
    if text is not None:
        try:
            max_dets = int(text)
        except ValueError:
            raise RequestError(400, f"max_dets must be an integer, got {text!r}") from None
        if max_dets < 0:
            raise RequestError(400, f"max_dets must be >= 0, got {text}")
    return score_thr, max_dets


def create_app(detector: Detector, settings: ServeSettings | None = None) -> Starlette:
    """The service for ``detector`` (see the module docstring); ``settings`` default to :class:`ServeSettings`."""
    settings = settings or ServeSettings()
    batcher = Batcher(detector, settings)
    metrics = Metrics(batcher, settings.max_batch)
    batcher.on_batch = metrics.on_batch
    receiving = Receiving(settings)
    metrics.receiving.set_function(receiving.count)
    classes = detector.classes
    described = detector.backend.describe()
    model = {key: described[key] for key in ("architecture", "backend", "preset") if key in described}

    async def detect(request: Request) -> Response:
        started = time.perf_counter()
        try:
            response = await _detect(request)
        except RequestError as exc:
            response = error_response(exc.status, exc.message, exc.headers)
        except Exception as exc:
            log.exception("paadet serve: unexpected error")
            response = error_response(500, f"internal error: {type(exc).__name__}")
        metrics.requests.labels(str(response.status_code)).inc()
        metrics.latency.observe(time.perf_counter() - started)
        return response

    async def _detect(request: Request) -> Response:
        started = time.perf_counter()
        check_api_key(settings.api_key, request.headers.get("authorization"), request.headers.get("x-api-key"))
        score_thr, max_dets = _query(request)
        if not batcher.ready.is_set():
            raise RequestError(503, batcher.warmup_error or "the model is still loading", {"Retry-After": "2"})
        full = RequestError(
            503,
            "too many requests in the queue; retry later" if not batcher.closed else "the server is shutting down",
            {"Retry-After": str(settings.retry_after_s)},
        )
        if batcher.closed or batcher.admitted >= settings.max_queue:  # refuse early, before reading the body
            raise full
        body = await receiving.body(request)  # admitted only once it has all arrived: see paadet.serve.receive
        if not batcher.try_admit():
            raise full
        try:
            result, timings = await asyncio.wait_for(_run(request, body), settings.timeout_s)
        except asyncio.TimeoutError:
            raise RequestError(504, f"not answered within {settings.timeout_s:g} s") from None
        finally:
            batcher.release()
        timings["total"] = 1000.0 * (time.perf_counter() - started)
        batch = int(timings.pop("batch_size", 1))
        server_timing = ", ".join(f"{name};dur={ms:.2f}" for name, ms in timings.items())
        return JSONResponse(
            detections_json(result, classes, score_thr, max_dets),
            headers={"Server-Timing": server_timing, "X-Batch-Size": str(batch)},
        )

    async def _run(request: Request, body: bytes):
        return await batcher.detect(await image_from_body(request, body))

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "alive"})

    async def readyz(request: Request) -> Response:
        if batcher.ready.is_set() and not batcher.closed:
            return JSONResponse({"status": "ready", "model": model})
        reason = "shutting down" if batcher.closed else (batcher.warmup_error or "the model is still loading")
        return error_response(503, reason, {"Retry-After": "2"})

    async def metrics_endpoint(request: Request) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    html = page_html(require_key=settings.api_key is not None)

    async def page(request: Request) -> Response:
        return HTMLResponse(html)

    async def openapi(request: Request) -> Response:
        return JSONResponse(openapi_schema(settings))

    @asynccontextmanager
    async def lifespan(app: Starlette):
        log.info("paadet serve: %s", startup_line(described, len(classes), settings))
        batcher.start()
        try:
            yield
        finally:
            await run_in_threadpool(batcher.close)

    app = Starlette(
        routes=[
            Route("/", page, methods=["GET"]),
            Route("/v1/detect", detect, methods=["POST"]),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/readyz", readyz, methods=["GET"]),
            Route("/metrics", metrics_endpoint, methods=["GET"]),
            Route("/openapi.json", openapi, methods=["GET"]),
        ],
        lifespan=lifespan,
        middleware=[Middleware(AccessLog)] if settings.access_log else [],
    )

    async def not_found(request: Request, exc: Exception) -> Response:
        status = getattr(exc, "status_code", 404)
        return error_response(status, getattr(exc, "detail", None) or "not found")

    app.add_exception_handler(404, not_found)
    app.add_exception_handler(405, not_found)
    app.state.batcher = batcher
    app.state.metrics = metrics
    app.state.settings = settings
    return app


def openapi_schema(settings: ServeSettings) -> dict:
    """A short OpenAPI 3.1 description of the API."""
    error = {"application/json": {"schema": {"type": "object", "properties": {"error": {"type": "string"}}}}}
    detection = {
        "type": "object",
        "properties": {
            "bbox": {
                "type": "array",
                "items": {"type": "number"},
                "minItems": 4,
                "maxItems": 4,
                "description": "x1, y1, x2, y2 in pixels of the decoded image",
            },
            "score": {"type": "number"},
            "label": {"type": "integer"},
            "category_id": {"type": "integer"},
            "name": {"type": "string"},
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "paadet serve", "version": "1"},
        "paths": {
            "/v1/detect": {
                "post": {
                    "summary": "detect objects in one image (raw body, or multipart field 'image')",
                    "parameters": [
                        {"name": "score_thr", "in": "query", "schema": {"type": "number", "minimum": 0, "maximum": 1}},
                        {"name": "max_dets", "in": "query", "schema": {"type": "integer", "minimum": 0}},
                    ],
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
                            "multipart/form-data": {
                                "schema": {
                                    "type": "object",
                                    "properties": {"image": {"type": "string", "format": "binary"}},
                                }
                            },
                        },
                    },
                    "responses": {
                        "200": {
                            "description": "detections sorted by score",
                            "content": {
                                "application/json": {
                                    "schema": {
                                        "type": "object",
                                        "properties": {
                                            "width": {"type": "integer"},
                                            "height": {"type": "integer"},
                                            "detections": {"type": "array", "items": detection},
                                        },
                                    }
                                }
                            },
                        },
                        "400": {"description": "not an image, or unreadable", "content": error},
                        "401": {"description": "missing or wrong API key", "content": error},
                        "408": {
                            "description": f"headers or body not received within {settings.read_timeout_s:g} s",
                            "content": error,
                        },
                        "413": {
                            "description": f"body over {settings.max_bytes} bytes or image over "
                            f"{settings.max_pixels} pixels",
                            "content": error,
                        },
                        "503": {"description": "queue full or not ready (see Retry-After)", "content": error},
                        "504": {
                            "description": f"not answered within {settings.timeout_s:g} s of its body's arrival",
                            "content": error,
                        },
                    },
                }
            },
            "/readyz": {
                "get": {
                    "summary": "200 once the model is loaded and warm (with the model's architecture, backend and "
                    "preset), 503 before"
                }
            },
            "/healthz": {"get": {"summary": "200 while the process lives"}},
            "/metrics": {"get": {"summary": "Prometheus metrics"}},
        },
    }
