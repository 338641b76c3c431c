"""``paadet serve``: an HTTP detection service (Starlette on uvicorn) with dynamic batching."""

from __future__ import annotations

import argparse
import math
import os
import signal

import starlette  # noqa: F401  (a missing [serve] extra is reported by `paadet serve` in one line)
import uvicorn  # noqa: F401

from paadet.commands.options import ModelOptions, nonnegative_float, positive_float, positive_int, resolve_backend

API_KEY_ENV = "PAADET_API_KEY"
MODEL = ModelOptions()


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve",
        help="serve detections over HTTP (dynamic batching, limits, a web page)",
        description="Serve POST /v1/detect (image bytes or a multipart field 'image'; query score_thr, max_dets), "
        'GET /readyz /healthz /metrics /openapi.json and a web page at /. Needs `pip install "paadet[serve]"`.',
    )
    g = p.add_argument_group("service")
    g.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for every interface)"
    )
    g.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    g.add_argument("--max-batch", type=positive_int, default=4, help="images per network call at most (default 4)")
    g.add_argument(
        "--max-wait-ms", type=nonnegative_float, default=10.0, help="how long a batch waits to fill, in ms (default 10)"
    )
    g.add_argument(
        "--max-queue",
        type=positive_int,
        default=64,
        help="detect requests admitted at once; more get 503 + Retry-After (default 64)",
    )
    g.add_argument(
        "--max-bytes",
        type=positive_int,
        default=50 * 1024 * 1024,
        help="largest request body in bytes (default 52428800 = 50 MiB; 413 beyond)",
    )
    g.add_argument(
        "--max-pixels",
        type=_pixels,
        default=64_000_000,
        help="largest image in pixels, read from its header before decoding (default 64e6; 413 beyond)",
    )
    g.add_argument(
        "--timeout-s",
        type=positive_float,
        default=30.0,
        help="504 for a request not answered this many seconds after its body arrived (default 30)",
    )
    g.add_argument(
        "--read-timeout-s",
        type=positive_float,
        default=30.0,
        help="408 for a request whose headers (from the connection opening) or whose body (from its headers) "
        "take longer than this to arrive; slow senders never hold a --max-queue slot (default 30)",
    )
    g.add_argument(
        "--max-connections",
        type=positive_int,
        default=512,
        help="open connections at most; one more is answered 503 at once (default 512)",
    )
    g.add_argument(
        "--api-key",
        default=None,
        help=f"require this key ('Authorization: Bearer KEY' or 'X-API-Key: KEY') on POST /v1/detect "
        f"(default: the environment variable {API_KEY_ENV}, if set)",
    )
    g.add_argument(
        "--log-level",
        default="info",
        choices=("critical", "error", "warning", "info", "debug"),
        help="log level of the server's console (default info: the start-up line and a line per request)",
    )
    g.add_argument(
        "--access-log",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="one line per request on stdout: client, method and path, status, ms, batch size (default on; "
        "shown at --log-level info or debug)",
    )
    r = p.add_argument_group('Ray Serve (scale out; needs `pip install "paadet[ray-serve]"`)')
    r.add_argument(
        "--ray",
        nargs="?",
        const="",
        default=None,
        metavar="ADDRESS",
        help="run the app as a Ray Serve deployment behind Ray's HTTP proxy on --host:--port; "
        "ADDRESS joins a running cluster ('auto', or ray://HOST:10001), none starts a local Ray instance",
    )
    r.add_argument(
        "--replicas",
        type=positive_int,
        default=1,
        help="with --ray: replicas of the model, each with its own batcher (default 1)",
    )
    r.add_argument(
        "--cpus-per-replica",
        type=positive_float,
        default=1.0,
        help="with --ray: CPUs Ray reserves for each replica (default 1); with --device cuda each "
        "replica also gets one GPU",
    )
    MODEL.add_to(p)
    p.set_defaults(func=run)


def _pixels(text: str) -> int:
    """argparse type: a pixel count >= 1, as an integer or a number such as 64e6."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of pixels, got {text!r}") from None
    if not math.isfinite(value) or value < 1 or value != int(value):
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text}")
    return int(value)


def run(args: argparse.Namespace) -> int:
    from paadet.serve.app import create_app
    from paadet.serve.settings import ServeSettings

    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be between 0 and 65535, got {args.port}")
    if args.streams not in (None, 1):  # the batcher runs one batch at a time: more streams would only split the threads
        raise ValueError(
            "--streams is for predict, eval and batch; paadet serve runs one batch at a time "
            "(scale it with --ray --replicas)"
        )
    api_key = args.api_key if args.api_key is not None else (os.environ.get(API_KEY_ENV) or None)
    settings = ServeSettings(
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        max_queue=args.max_queue,
        max_bytes=args.max_bytes,
        max_pixels=args.max_pixels,
        timeout_s=args.timeout_s,
        workers=max(1, args.workers),
        api_key=api_key,
        read_timeout_s=args.read_timeout_s,
        max_connections=args.max_connections,
        access_log=args.access_log,
    )
    spec = resolve_backend(MODEL.spec(args, batch_size=args.batch_size or args.max_batch))
    if args.ray is not None:
        from paadet.serve.ray_serve import run_on_ray

        return run_on_ray(
            spec,
            settings,
            host=args.host,
            port=args.port,
            address=args.ray,
            replicas=args.replicas,
            cpus_per_replica=args.cpus_per_replica,
            log_level=args.log_level,
        )
    if args.replicas != 1:
        raise ValueError("--replicas needs --ray (one process serves one model otherwise)")
    from paadet.detector import Detector
    from paadet.serve.server import bind_sockets, run_server

    sockets = bind_sockets(args.host, args.port)  # a port in use is one line here, before the model loads
    try:
        app = create_app(Detector.from_spec(spec), settings)
        # uvicorn drains on SIGTERM (stops accepting, answers what is in flight, runs the lifespan shutdown,
        # which drains the batcher) and then re-raises the signal to the handler it found: make that a
        # no-op, so a drained shutdown exits 0.
        signal.signal(signal.SIGTERM, lambda signum, frame: None)
        started = run_server(app, sockets, settings, args.log_level)
    finally:
        for sock in sockets:
            sock.close()
    if not started:
        raise RuntimeError(f"the server did not start on {args.host}:{args.port} (see the log above)")
    return 0
