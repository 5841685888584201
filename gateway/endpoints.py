"""HTTP endpoints: the OpenAI surface and the operational ones beside it.

`/v1/chat/completions` (and `/v1/responses`, on the same pipeline) is a plain ASGI endpoint
(no Request object, no task group per response): it reads the body under the size limit,
hands it to the pipeline and sends the reply, watching for ``http.disconnect`` while a
stream is being relayed so that a client that goes away cancels the upstream promptly.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from gateway.errors import (
    GatewayError,
    InvalidRequest,
    ModelNotFound,
    NotFound,
    PayloadTooLarge,
    ServiceUnavailable,
    ShuttingDown,
    cut_by_shutdown,
)
from gateway.pipeline import Api, Piece
from gateway.serving import Drain
from gateway.state import GatewayState
from gateway.wire import sse_event

JSON = [(b"content-type", b"application/json")]
SSE = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


def state_of(scope: dict[str, Any]) -> GatewayState:
    state: GatewayState = scope["state"]["gateway"]
    return state


def error_response(exc: GatewayError) -> Response:
    return Response(exc.json(), status_code=exc.status, headers=exc.headers,
                    media_type="application/json")


async def read_body(receive: Any, scope: Mapping[str, Any], limit: int) -> bytes:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                declared = int(value)
            except ValueError:
                declared = 0
            if declared > limit:
                raise PayloadTooLarge(
                    f"The request body is {declared} bytes; this gateway accepts at most {limit}."
                )
            break
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise asyncio.CancelledError
        body = message.get("body", b"")
        if body:
            size += len(body)
            if size > limit:
                raise PayloadTooLarge(
                    f"The request body is larger than the {limit} bytes this gateway accepts."
                )
            chunks.append(body)
        if not message.get("more_body", False):
            break
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


class ChatCompletions:
    """``POST /v1/chat/completions``."""

    def api(self, state: GatewayState) -> Api | None:
        """The API this endpoint serves; None: chat completions, the pipeline's default."""
        return None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        state = state_of(scope)
        request_id: str = scope.get("gateway.request_id") or ""
        try:
            raw = await read_body(receive, scope, state.config.server.max_body_bytes)
        except GatewayError as exc:
            await _send_whole(send, exc.status, exc.headers, exc.json())
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        metrics = state.metrics
        metrics.in_flight_now += 1
        try:
            try:
                with state.drain.tracking():
                    reply = await state.pipeline.handle(request_id, raw, headers,
                                                        self.api(state))
            except asyncio.CancelledError as exc:
                if not cut_by_shutdown(exc):
                    raise
                _uncancel()
                error = ShuttingDown()
                await _send_whole(send, error.status, error.headers, error.json())
                return
            if reply.status == 200:
                reply.headers.update(state.analytics.reply_headers(request_id))
            # the request-id middleware takes it off the gateway's added latency
            scope["gateway.upstream_wait"] = reply.upstream_wait
            if reply.stream is None:
                await _send_whole(send, reply.status, reply.headers, reply.body,
                                  reply.raw_headers)
            else:
                await _send_stream(send, receive, reply.status, reply.headers, reply.stream,
                                   reply.raw_headers, state.drain)
            # the figure of x-gateway-overhead-ms, which the middleware leaves in the scope
            overhead = scope.get("gateway.overhead")
            if reply.route is not None and overhead is not None:
                metrics.child(metrics.overhead, reply.route.model, reply.route.backend
                              ).observe(overhead)
        finally:
            metrics.in_flight_now -= 1


class Responses(ChatCompletions):
    """``POST /v1/responses``."""

    def api(self, state: GatewayState) -> Api | None:
        return state.responses


def _uncancel() -> None:
    """Go on after catching the drain's cut: this task has a reply to send."""
    task = asyncio.current_task()
    if task is not None:
        task.uncancel()


def _encode(headers: dict[str, str]) -> list[tuple[bytes, bytes]]:
    return [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]


async def _send_whole(send: Any, status: int, headers: dict[str, str], body: bytes,
                      raw: Sequence[tuple[bytes, bytes]] = ()) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [*JSON, (b"content-length", b"%d" % len(body)), *_encode(headers),
                            *raw]})
    await send({"type": "http.response.body", "body": body})


async def _send_stream(
    send: Any, receive: Any, status: int, headers: dict[str, str], stream: AsyncIterator[Piece],
    raw: Sequence[tuple[bytes, bytes]], drain: Drain,
) -> None:
    """Send the pieces as they come; a disconnect before the last one cancels the relay, and
    the drain's cut ends the stream with an error event."""
    sent_last = False

    async def pump() -> None:
        nonlocal sent_last
        try:
            await send({"type": "http.response.start", "status": status,
                        "headers": [*SSE, *_encode(headers), *raw]})
            async for data, last in stream:
                if not sent_last:
                    await send({"type": "http.response.body", "body": data,
                                "more_body": not last})
                    sent_last = last
            if not sent_last:
                await send({"type": "http.response.body", "body": b""})
                sent_last = True
        finally:
            await stream.aclose()  # type: ignore[attr-defined]

    async def watch() -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return

    pumping = asyncio.ensure_future(pump())
    watching = asyncio.ensure_future(watch())
    try:
        with drain.tracking(pumping):
            await asyncio.wait((pumping, watching), return_when=asyncio.FIRST_COMPLETED)
            if sent_last and not pumping.done():
                # the response is complete (so receive() reports a disconnect): let the relay
                # finish its bookkeeping rather than cancelling it
                await asyncio.wait((pumping,))
    finally:
        for task in (pumping, watching):
            if not task.done():
                task.cancel()
        await asyncio.gather(pumping, watching, return_exceptions=True)
    if pumping.cancelled():
        if not sent_last and _cut(pumping):
            await send({"type": "http.response.body", "body": sse_event(ShuttingDown().body())})
        return
    if pumping.exception() is not None:
        exc = pumping.exception()
        if not isinstance(exc, OSError):
            raise exc  # type: ignore[misc]


def _cut(task: asyncio.Task[None]) -> bool:
    try:
        task.result()
    except asyncio.CancelledError as exc:
        return cut_by_shutdown(exc)
    return False


async def list_models(request: Request) -> Response:
    state: GatewayState = request.state.gateway
    try:
        principal = await state.authority.authenticate(request.headers.get("authorization"))
    except GatewayError as exc:
        return error_response(exc)
    data = [_model(state, name) for name in state.plans if principal.allows(name)]
    return Response(orjson.dumps({"object": "list", "data": data}),
                    media_type="application/json")


def _model(state: GatewayState, name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": state.started,
            "owned_by": f"gateway:{state.plans[name].route.backend}"}


async def retrieve_model(request: Request) -> Response:
    """``GET /v1/models/{id}``: a model this key may use, else 404 (whether it does not
    exist or is not this key's to use)."""
    state: GatewayState = request.state.gateway
    name = request.path_params["model_id"]
    try:
        principal = await state.authority.authenticate(request.headers.get("authorization"))
        if name not in state.plans or not principal.allows(name):
            raise ModelNotFound(f"The model '{name}' does not exist or you do not have "
                                "access to it.", param="model")
    except GatewayError as exc:
        return error_response(exc)
    return Response(orjson.dumps(_model(state, name)), media_type="application/json")


async def stored_response(request: Request) -> Response:
    """``GET`` / ``DELETE /v1/responses/{id}``: a stored response of the key's team."""
    state: GatewayState = request.state.gateway
    response_id = request.path_params["response_id"]
    store = state.responses.store
    try:
        principal = await state.authority.authenticate(request.headers.get("authorization"))
        if request.method == "DELETE":
            if not await store.delete(principal.team, response_id):
                raise _no_response(response_id)
            body: dict[str, Any] = {"id": response_id, "object": "response", "deleted": True}
        else:
            found = await store.get(principal.team, response_id)
            if found is None:
                raise _no_response(response_id)
            body = found.response
    except GatewayError as exc:
        return error_response(exc)
    return Response(orjson.dumps(body), media_type="application/json")


def _no_response(response_id: str) -> NotFound:
    return NotFound(f"Response with id '{response_id}' not found.", param="response_id")


FEEDBACK_LIMIT = 64 * 1024


async def feedback(request: Request) -> Response:
    """``POST /v1/feedback``: thumbs up/down for an answer, by the id the chat response gave
    in ``x-gateway-message-id``, forwarded to the Inkeep Analytics ``/feedback`` endpoint;
    the reply is the Analytics API's feedback object."""
    from gateway.analytics.feedback import forward_feedback

    state: GatewayState = request.state.gateway
    try:
        await state.authority.authenticate(request.headers.get("authorization"))
        sink = state.analytics.inkeep
        if sink is None:
            raise ServiceUnavailable(
                "Feedback needs an `inkeep` sink under analytics.sinks in the gateway config.")
        raw = await read_body(request.receive, request.scope, FEEDBACK_LIMIT)
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise InvalidRequest("The feedback body is not valid JSON.") from None
        reply = await forward_feedback(sink, body)
    except GatewayError as exc:
        return error_response(exc)
    return Response(orjson.dumps(reply), media_type="application/json")


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    state: GatewayState = request.state.gateway
    if state.drain.draining:
        return JSONResponse({"status": "draining", "checks": {"config": "ok"}}, status_code=503)
    checks: dict[str, str] = {"config": "ok"}
    ready = True
    try:
        await asyncio.wait_for(state.components.ping(), 2.0)
        checks["store"] = "ok"
    except Exception as exc:  # readiness reports any failure, it never raises
        checks["store"] = f"unreachable ({type(exc).__name__})"
        ready = False
    return JSONResponse({"status": "ready" if ready else "not_ready", "checks": checks},
                        status_code=200 if ready else 503)


async def metrics(request: Request) -> Response:
    state: GatewayState = request.state.gateway
    body, content_type = state.metrics.render()
    return Response(body, media_type=content_type)


def uptime_created() -> int:
    return int(time.time())
