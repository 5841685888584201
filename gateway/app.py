"""The application factory: routes, middleware and the lifespan that builds every resource.

Resources (HTTP clients, the Redis connection, stores, background workers) are created in the
lifespan and handed to the endpoints as typed state; tests inject their own through
`create_app`'s arguments.
"""

from __future__ import annotations

import asyncio
import gc
import os
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import structlog
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Mount
from starlette.routing import Route as HTTPRoute

from gateway import endpoints
from gateway.admin import admin_routes
from gateway.backends.base import Backend
from gateway.backends.nuclia import NucliaBackend
from gateway.backends.openai_compat import OpenAICompatBackend
from gateway.components import build_components, make_tracing
from gateway.config import GatewayConfig
from gateway.console.app import console_app
from gateway.errors import GatewayError, MethodNotAllowed, NotFound
from gateway.exchange import ExchangeObserver
from gateway.health import HealthSource
from gateway.metrics import Metrics
from gateway.middleware import RequestCap, RequestContextMiddleware
from gateway.pipeline import Pipeline
from gateway.request_log import RequestLog
from gateway.responses import ResponsesApi
from gateway.routing.assembly import build_router
from gateway.routing.table import build_table
from gateway.serving import Drain
from gateway.state import GatewayState
from gateway.tracing import NO_TRACING, Tracing
from gateway.upstream import UpstreamClient

log = structlog.get_logger("gateway.app")


GC_THRESHOLDS = (50_000, 50, 50)


def tune_gc() -> None:
    """Everything built at start-up lives as long as the process: freeze it out of the
    collector's sight, and collect young objects every 50,000 allocations instead of 700
    (each request allocates thousands; see docs/performance.md). Reference counting still
    frees almost everything at once; only cyclic garbage waits a little longer."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def has_admin_key(config: GatewayConfig) -> bool:
    """The admin API and the console exist only with an admin key."""
    return bool(config.server.admin_key and config.server.admin_key.get_secret_value())


def build_backend(name: str, config: GatewayConfig, connector: Any = None,
                  tracing: Tracing = NO_TRACING) -> Backend:
    spec = config.backends[name]
    client = UpstreamClient(name, spec, connector=connector, tracing=tracing)
    if spec.kind == "nuclia":
        return NucliaBackend(name, spec, client)
    return OpenAICompatBackend(name, spec, client)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    error: GatewayError
    if exc.status_code == 405:
        error = MethodNotAllowed(f"Method {request.method} is not allowed on {request.url.path}.",
                                 headers=dict(exc.headers or {}))
    elif exc.status_code == 404:
        error = NotFound(f"There is no endpoint {request.method} {request.url.path}.")
    else:
        error = GatewayError(str(exc.detail), status=exc.status_code, code=None)
    return endpoints.error_response(error)


def create_app(
    config: GatewayConfig,
    *,
    metrics: Metrics | None = None,
    connector_factory: Callable[[], Any] | None = None,
    on_startup: Callable[[AsyncExitStack], Any] | None = None,
    observers: Sequence[ExchangeObserver] = (),
    handle_signals: bool = False,
    health: HealthSource | None = None,
) -> Any:
    """`on_startup(stack)` may enter extra async contexts first (e.g. the demo upstreams);
    `observers` receive every finished exchange besides the configured ones;
    `handle_signals`: SIGTERM and SIGINT drain the process (`gateway serve` sets it);
    `health`: the deployments' circuit state, for the console."""
    drain = Drain(config.server.drain_delay, config.server.shutdown_grace)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        async with AsyncExitStack() as stack:
            if on_startup is not None:
                await on_startup(stack)
            state = await assemble(config, stack, metrics or Metrics(), drain,
                                   connector_factory, observers, health)
            app.state.gateway = state
            if state.metrics.multiprocess:
                sampling = asyncio.create_task(state.metrics.sample_every(1.0))
                stack.callback(sampling.cancel)
                stack.callback(state.metrics.worker_stopped)
            if handle_signals:
                drain.watch_signals()
            tune_gc()
            log.info("gateway_ready", models=len(state.plans), backends=len(state.backends),
                     store="redis" if config.redis_url else "memory")
            yield {"gateway": state}

    chat = endpoints.ChatCompletions()
    routes: list[BaseRoute] = [
        HTTPRoute("/v1/chat/completions", chat, methods=["POST"]),
        HTTPRoute("/chat/completions", chat, methods=["POST"]),
        HTTPRoute("/v1/responses", endpoints.Responses(), methods=["POST"]),
        HTTPRoute("/v1/responses/{response_id}", endpoints.stored_response,
                  methods=["GET", "DELETE"]),
        HTTPRoute("/v1/models", endpoints.list_models, methods=["GET"]),
        HTTPRoute("/v1/models/{model_id:path}", endpoints.retrieve_model, methods=["GET"]),
        HTTPRoute("/v1/feedback", endpoints.feedback, methods=["POST"]),
        HTTPRoute("/healthz", endpoints.healthz, methods=["GET"]),
        HTTPRoute("/readyz", endpoints.readyz, methods=["GET"]),
        HTTPRoute("/metrics", endpoints.metrics, methods=["GET"]),
    ]
    if has_admin_key(config):
        routes.append(Mount("/console", app=console_app(config)))
    app = Starlette(
        routes=routes,
        exception_handlers={HTTPException: _http_error, Exception: _server_error},
        lifespan=lifespan,
    )
    return RequestContextMiddleware(RequestCap(FastPath(app, chat, CHAT_PATHS),
                                               config.server.max_concurrent_requests))


CHAT_PATHS = frozenset({"/v1/chat/completions", "/chat/completions"})


class FastPath:
    """Sends ``POST /v1/chat/completions`` straight to its endpoint; everything else (and the
    lifespan) goes through Starlette: the hot path skips its middleware stack and router."""

    def __init__(self, app: Starlette, chat: Any, paths: frozenset[str]) -> None:
        self.app = app
        self.chat = chat
        self.paths = paths

    @property
    def state(self) -> Any:
        return self.app.state

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            path = scope["path"]
            if scope["method"] == "POST" and path in self.paths:
                await self.chat(scope, receive, send)
                return
            if path.startswith("/admin/") or path == "/admin":
                admin = scope["state"]["gateway"].admin
                if admin is not None:
                    await admin(scope, receive, send)
                    return
        await self.app(scope, receive, send)


async def _server_error(request: Request, exc: Exception) -> Response:
    log.error("request_failed", error_type=type(exc).__name__, path=request.url.path)
    return endpoints.error_response(GatewayError("The gateway failed to process this request."))


async def assemble(
    config: GatewayConfig,
    stack: AsyncExitStack,
    metrics: Metrics,
    drain: Drain,
    connector_factory: Callable[[], Any] | None = None,
    observers: Sequence[ExchangeObserver] = (),
    health: HealthSource | None = None,
) -> GatewayState:
    """Build every resource in dependency order; `stack` closes them in reverse."""
    tracing = make_tracing(config, os.environ)
    stack.callback(tracing.shutdown)  # last: after the mirror's final deliveries
    backends: dict[str, Backend] = {}
    for name in config.backends:
        connector = connector_factory() if connector_factory else None
        backends[name] = build_backend(name, config, connector, tracing)
        stack.push_async_callback(backends[name].aclose)
    parts = await build_components(config, stack, metrics, tracing)
    plans = build_table(config, backends)
    router = await build_router(config, plans, parts.circuit_store, metrics, stack)
    if config.server.request_log:
        request_log = RequestLog()
        stack.callback(request_log.flush)
        observers = [*observers, request_log]
    pipeline = Pipeline(
        plans=plans,
        router=router,
        authenticator=parts.authority,
        admitter=parts.limiter,
        cache=parts.cache,
        observers=[*parts.analytics.observers, *observers],
        metrics=metrics,
        default_max_tokens=config.limits.default_max_tokens,
        conversation_header=config.analytics.conversation_header,
        user_header=config.analytics.user_header,
        tracing=tracing,
    )
    admin = None
    if has_admin_key(config):
        admin = Starlette(
            routes=admin_routes(config, parts.key_store, parts.authority,
                                parts.analytics.usage_store, router),
            exception_handlers={HTTPException: _http_error, Exception: _server_error},
        )
    return GatewayState(config=config, metrics=metrics, plans=plans, backends=backends,
                        pipeline=pipeline, components=parts, drain=drain,
                        started=int(time.time()), admin=admin, health=health or router,
                        responses=ResponsesApi(parts.response_store))
