"""The gateway's one exception tree, and its rendering as OpenAI error envelopes.

    GatewayError                      -> status, type, code, param (rendered by `envelope`)
    ├── InvalidRequest               400 invalid_request_error
    │   └── UnsupportedParameter     400 invalid_request_error, code unsupported_parameter
    ├── PayloadTooLarge              413
    ├── AuthenticationFailed         401 invalid_api_key
    ├── PermissionDenied             403 model_not_allowed
    ├── ModelNotFound                404 model_not_found
    ├── MethodNotAllowed             405
    ├── RateLimited                  429 rate_limit_exceeded (retry_after seconds)
    ├── QuotaExceeded                429 insufficient_quota
    ├── ServiceUnavailable           503 (backend not configured, store down)
    │   ├── Overloaded               503 server_overloaded: the replica's request cap
    │   └── ShuttingDown             503 server_shutting_down: cut by the drain
    ├── QueueLost                    the outbox's store lost a sink's queue (internal)
    └── UpstreamError                502 by default; raised by backends at the boundary
        ├── UpstreamAuthError        502 the gateway's upstream credentials were refused
        ├── UpstreamRateLimited      429 upstream said slow down (retry_after passed on)
        ├── UpstreamTimeout          504
        ├── UpstreamUnavailable      502 connection refused / reset / DNS
        └── UpstreamProtocolError    502 the upstream sent something we cannot read

Foreign errors (aiohttp, redis, sockets) are translated where they happen with
``raise OurError(...) from exc``; the HTTP layer renders every `GatewayError` with one handler.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson


class GatewayError(Exception):
    status: int = 500
    type: str = "api_error"
    code: str | None = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        status: int | None = None,
        headers: dict[str, str] | None = None,
        detail: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        # what an upstream said about it: for the log, never for the client (it may name
        # internal hosts, stack paths or an nginx page)
        self.detail = detail
        self.param = param
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        self.headers: dict[str, str] = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return envelope(self.message, self.type, self.code, self.param)

    def json(self) -> bytes:
        return orjson.dumps(self.body())


class InvalidRequest(GatewayError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_request"


class UnsupportedParameter(InvalidRequest):
    code = "unsupported_parameter"


class PayloadTooLarge(GatewayError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class AuthenticationFailed(GatewayError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class PermissionDenied(GatewayError):
    status = 403
    type = "invalid_request_error"
    code = "model_not_allowed"


class ModelNotFound(GatewayError):
    status = 404
    type = "invalid_request_error"
    code = "model_not_found"


class NotFound(GatewayError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class MethodNotAllowed(GatewayError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class RateLimited(GatewayError):
    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"

    def __init__(self, message: str, *, retry_after: float, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.retry_after = max(retry_after, 0.0)
        self.headers.setdefault("retry-after", str(max(1, int(-(-self.retry_after // 1)))))
        self.headers.setdefault("retry-after-ms", str(int(self.retry_after * 1000)))


class QuotaExceeded(GatewayError):
    status = 429
    type = "insufficient_quota"
    code = "insufficient_quota"


class ServiceUnavailable(GatewayError):
    status = 503
    type = "api_error"
    code = "service_unavailable"


class Overloaded(ServiceUnavailable):
    """This replica holds ``server.max_concurrent_requests`` already."""

    code = "server_overloaded"

    def __init__(self, limit: int) -> None:
        super().__init__(
            f"This gateway replica is serving its limit of {limit} concurrent requests. "
            "Retry shortly.", headers={"retry-after": "1"})


class ShuttingDown(ServiceUnavailable):
    """A request still running when the shutdown grace ran out."""

    code = "server_shutting_down"

    def __init__(self) -> None:
        super().__init__("The gateway replica serving this request is shutting down and its "
                         "grace period ran out. Retry the request.", headers={"retry-after": "1"})


class QueueLost(GatewayError):
    """The outbox's store lost a sink's queue (a Redis that restarted empty); never shown to
    a client: the outbox puts back what it still owes that sink."""

    code = "outbox_queue_lost"

    def __init__(self, message: str, *, sink: str) -> None:
        super().__init__(message)
        self.sink = sink


# The message of the cancellation by which a draining process cuts what still runs.
SHUTDOWN_CUT = "gateway shutdown: shutdown_grace has run out"


def cut_by_shutdown(exc: BaseException) -> bool:
    """Whether a cancellation is the drain's cut (not a client that went away)."""
    return isinstance(exc, asyncio.CancelledError) and exc.args == (SHUTDOWN_CUT,)


class UpstreamError(GatewayError):
    """Anything that went wrong talking to an upstream; `backend` names it (never a secret)."""

    status = 502
    type = "api_error"
    code = "upstream_error"

    def __init__(self, message: str, *, backend: str = "", upstream_status: int | None = None,
                 **kw: Any) -> None:
        super().__init__(message, **kw)
        self.backend = backend
        self.upstream_status = upstream_status  # the HTTP status the upstream answered


class UpstreamAuthError(UpstreamError):
    code = "upstream_auth_error"


class UpstreamRateLimited(UpstreamError):
    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"


class UpstreamTimeout(UpstreamError):
    status = 504
    code = "upstream_timeout"


class UpstreamUnavailable(UpstreamError):
    code = "upstream_unavailable"


class UpstreamProtocolError(UpstreamError):
    code = "upstream_protocol_error"


def envelope(
    message: str, type: str = "api_error", code: str | None = None, param: str | None = None
) -> dict[str, Any]:
    """The OpenAI error body: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}
