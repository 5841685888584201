"""What a client is told when an upstream fails, and what only the log gets.

An upstream's own error text can name internal hosts, stack paths or carry a proxy's HTML
page: for 5xx, 429, mid-stream failures and anything that is not a short JSON message, the
client gets the gateway's own words (the backend, the upstream's status; the pipeline adds
the request id) and the upstream's text goes to the error's `detail`, which the pipeline
logs. A short, single-line validation message in a JSON 4xx body may still be passed on:
it tells the client what to fix in its request.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from gateway.errors import (
    GatewayError,
    InvalidRequest,
    PayloadTooLarge,
    UpstreamAuthError,
    UpstreamError,
    UpstreamRateLimited,
)

MAX_DETAIL = 500  # of an upstream's text kept for the log
MAX_PASSED_ON = 200  # longest validation message a client may see as the upstream said it


def body_text(body: bytes) -> str:
    """An upstream body as text for the log, cut to `MAX_DETAIL`."""
    return body.decode("utf-8", "replace").strip()[:MAX_DETAIL]


def json_message(body: bytes, find: Any) -> str | None:
    """`find(data)` over a JSON error body: the upstream's own message, or None when the body
    is not JSON or holds none."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    found = find(data)
    return found if isinstance(found, str) and found else None


def passable(message: str | None) -> str | None:
    """`message` when a client may see it: short and on one line."""
    if message is None or len(message) > MAX_PASSED_ON or "\n" in message or "<" in message:
        return None
    return message


def refused_credentials(backend: str, status: int, body: bytes) -> UpstreamAuthError:
    return UpstreamAuthError(
        f"The upstream '{backend}' refused the gateway's credentials (HTTP {status}). "
        "This is a gateway configuration problem, not your key: tell the gateway operator.",
        backend=backend, detail=body_text(body), upstream_status=status)


def rate_limited(backend: str, body: bytes, headers: Mapping[str, str]) -> UpstreamRateLimited:
    retry = headers.get("retry-after")
    return UpstreamRateLimited(
        f"The upstream '{backend}' is rate limiting the gateway (HTTP 429). Retry later.",
        backend=backend, headers={"retry-after": retry} if retry else None,
        detail=body_text(body), upstream_status=429)


def rejected(backend: str, status: int, body: bytes, message: str | None) -> GatewayError:
    """A 4xx about the request itself (400, 412, 413, 422): the upstream's words when they
    are a short validation message, else ours."""
    said = passable(message)
    text = (f"The upstream '{backend}' rejected the request: {said}" if said else
            f"The upstream '{backend}' rejected the request (HTTP {status}).")
    if status == 413:
        return PayloadTooLarge(text, detail=body_text(body))
    return InvalidRequest(text, code="upstream_rejected", detail=body_text(body))


def failed(backend: str, status: int, body: bytes, doing: str = "") -> UpstreamError:
    """A 5xx or an unexpected status: our words only."""
    where = f" while {doing}" if doing else ""
    return UpstreamError(f"The upstream '{backend}' failed{where} (HTTP {status}).",
                         backend=backend, detail=body_text(body), upstream_status=status)


def failed_mid_answer(backend: str, detail: str) -> UpstreamError:
    """An error the upstream reported after the answer had begun."""
    return UpstreamError(f"The upstream '{backend}' failed while answering.",
                         backend=backend, detail=detail[:MAX_DETAIL])
