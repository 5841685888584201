"""Plain ASGI middleware: request ids, the gateway's added latency, and a last-resort envelope.

Every response carries ``x-request-id`` (the client's when it sent a sane one) and
``x-gateway-overhead-ms``: time to the response start minus the time spent waiting for the
upstream (which the endpoint leaves in the scope as ``gateway.upstream_wait``, seconds). The
same figure is left in the scope as ``gateway.overhead`` (seconds) for the endpoint's metrics.
"""

from __future__ import annotations

import random
import re
import time
from typing import Any

import structlog

from gateway.errors import GatewayError, Overloaded
from gateway.logs import REQUEST_ID

log = structlog.get_logger("gateway.http")

_SANE_ID = re.compile(r"^[A-Za-z0-9._:@/+=-]{1,128}$")

Scope = dict[str, Any]


def request_id_from(headers: list[tuple[bytes, bytes]]) -> str:
    for name, value in headers:
        if name == b"x-request-id":
            text = value.decode("latin-1")
            if _SANE_ID.match(text):
                return text
            break
    # not a secret: a PRNG id avoids a getrandom() syscall per request
    return f"req_{random.getrandbits(96):024x}"


class RequestContextMiddleware:
    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = request_id_from(scope["headers"])
        scope["gateway.request_id"] = request_id
        rid = request_id.encode("latin-1")
        response_started = False

        async def send_with_headers(message: dict[str, Any]) -> None:
            nonlocal response_started
            if message["type"] == "http.response.start":
                response_started = True
                headers = list(message.get("headers") or ())
                upstream = scope.get("gateway.upstream_wait", 0.0)
                overhead = scope["gateway.overhead"] = max(
                    time.perf_counter() - started - upstream, 0.0)
                headers.append((b"x-request-id", rid))
                headers.append((b"x-gateway-overhead-ms", b"%.3f" % (overhead * 1000)))
                message = {**message, "headers": headers}
            await send(message)

        token = REQUEST_ID.set(request_id)
        try:
            await self.app(scope, receive, send_with_headers)
        except Exception as exc:  # the last resort: never a traceback to the client
            log.exception("request_failed", error_type=type(exc).__name__)
            if not response_started:
                error = GatewayError("The gateway failed to process this request.")
                await send_with_headers({
                    "type": "http.response.start",
                    "status": 500,
                    "headers": [(b"content-type", b"application/json")],
                })
                await send({"type": "http.response.body", "body": error.json()})
        finally:
            REQUEST_ID.reset(token)


# Operators' probes and scrapes must answer even when the replica is full.
EXEMPT_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


class RequestCap:
    """Answers 503 with ``retry-after`` beyond `limit` requests in progress (streams count
    until they end), so that one flood cannot slow every other client of the replica."""

    def __init__(self, app: Any, limit: int | None) -> None:
        self.app = app
        self.limit = limit
        self.in_progress = 0

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if self.limit is None or scope["type"] != "http" or scope["path"] in EXEMPT_PATHS:
            await self.app(scope, receive, send)
            return
        if self.in_progress >= self.limit:
            error = Overloaded(self.limit)
            await send({"type": "http.response.start", "status": error.status,
                        "headers": [(b"content-type", b"application/json"),
                                    *((k.encode(), v.encode()) for k, v in error.headers.items())]})
            await send({"type": "http.response.body", "body": error.json()})
            return
        self.in_progress += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_progress -= 1
