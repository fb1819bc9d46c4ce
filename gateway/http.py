"""The gateway's HTTP server: aiohttp, with the TGI routes (tgi.py) and the
OpenAI routes (openai_api.py), plus GET /health, /info and /metrics.

Why aiohttp (3.14, pinned): it is already in every install of ours (kopf's
HTTP client, and operator/kube.py's), maintained by aio-libs for a decade,
and one library serves what the gateway needs with no second layer:
streamed responses whose `write` waits for the socket to drain (so a slow
reader applies backpressure all the way to the worker's stream), and
`handler_cancellation`, which cancels a request's handler when its client
disconnects, which is how a dropped client cancels its upstream Generate.
Starlette on uvicorn would do as well but adds two dependencies and an ASGI
hop, and it notices a disconnect only while something awaits `receive`.

Every error answer has its API's shape: the middleware renders a
GatewayError as TGI's `{"error", "error_type"}` or OpenAI's error object,
by the route's API, with Retry-After where waiting helps. /health and
/metrics need no token (probes and Prometheus send none); every other route
needs the gateway's own bearer token when it has one.
"""

from __future__ import annotations

import importlib.metadata
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from elasticfleet.gateway.errors import GatewayError, Kind
from elasticfleet.gateway.openai_api import add_openai_routes, openai_error
from elasticfleet.gateway.service import GatewayService
from elasticfleet.gateway.tgi import MAX_STOP, add_tgi_routes, tgi_error

log = logging.getLogger(__name__)
SERVICE = web.AppKey("service", GatewayService)
OPEN_ROUTES = ("/health", "/metrics")
# A prompt is at most 256 KiB (the worker's limit); the rest is JSON framing.
MAX_BODY_BYTES = 1 << 20

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _route_name(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "other"


def error_response(path: str, error: GatewayError) -> web.Response:
    """`error` in the shape of the API `path` belongs to."""
    status, body = (openai_error if path.startswith("/v1/") else tgi_error)(error)
    headers = {} if error.retry_after is None else {"Retry-After": str(error.retry_after)}
    return web.json_response(body, status=status, headers=headers)


@web.middleware
async def gateway_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Authentication, error shapes and the requests counter, for every route."""
    service = request.app[SERVICE]
    route = _route_name(request)
    try:
        if request.path not in OPEN_ROUTES:
            service.require_auth(request.headers.get("Authorization"))
        response = await handler(request)
    except GatewayError as error:
        response = error_response(request.path, error)
    except web.HTTPException as error:  # aiohttp's own: unknown path, wrong method, body too big
        service.metrics.count(route, error.status)
        raise
    except Exception as error:  # a bug: the client gets its API's shape, the log the rest
        log.exception("gateway error on %s", request.path)
        internal = GatewayError(Kind.GENERATION, f"internal error ({type(error).__name__})")
        response = error_response(request.path, internal)
    service.metrics.count(route, response.status)
    return response


async def health(request: web.Request) -> web.Response:
    """200 while some worker is ready (TGI's /health), else 503."""
    if request.app[SERVICE].ready():
        return web.Response(status=200)
    return web.json_response({"error": "no worker is ready", "error_type": "unhealthy"}, status=503)


async def metrics(request: web.Request) -> web.Response:
    body = request.app[SERVICE].metrics.render()
    return web.Response(body=body, content_type="text/plain", charset="utf-8")


async def info(request: web.Request) -> web.Response:
    """TGI's /info fields that apply, and the gateway's view of its workers."""
    service = request.app[SERVICE]
    pool = service.pool
    workers = [
        {
            "name": view.name,
            "address": view.address,
            "ready": view.ready,
            "plan_id": view.plan_id,
            "perplexity_ratio": view.ratio,
            "load": view.load,
            "free_kv_bytes": view.free_kv_bytes,
            "adapters": {name: list(held.tasks) for name, held in view.adapters.items()},
        }
        for view in pool.views
    ]
    return web.json_response(
        {
            "model_id": service.model_name,
            "model_sha": None,
            "model_pipeline_tag": "text-generation",
            "max_concurrent_requests": pool.options.max_streams * max(len(workers), 1),
            "max_best_of": 1,
            "max_stop_sequences": MAX_STOP,
            "max_waiting_requests": pool.options.max_waiting,
            "router": "elasticfleet-gateway",
            "version": importlib.metadata.version("elasticfleet"),
            "sha": None,
            "docker_label": None,
            "workers": workers,
        }
    )


def build_app(service: GatewayService) -> web.Application:
    app = web.Application(middlewares=[gateway_middleware], client_max_size=MAX_BODY_BYTES)
    app[SERVICE] = service
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/info", info)
    add_tgi_routes(app, service)
    add_openai_routes(app, service)
    return app


async def serve_http(service: GatewayService, host: str, port: int) -> tuple[web.AppRunner, int]:
    """Listen on host:port (0: a free port); the runner and the port."""
    runner = web.AppRunner(build_app(service), handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    server = site._server
    sockets = getattr(server, "sockets", None) or []
    bound = int(sockets[0].getsockname()[1]) if sockets else port
    return runner, bound
