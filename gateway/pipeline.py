"""The request pipeline of ``/v1/chat/completions`` and ``/v1/responses``, independent of ASGI.

auth → parse → route → credentials → limits → cache / single flight → router (deployments,
retries, fallbacks) → encode,
and, in one ``finally`` per exchange, settle the reservation and hand exactly one
`ExchangeRecord` to every observer (metering, analytics, metrics).

Both APIs are one pipeline: an `Api` parses its request into the internal chat request, and
the `Encoder` it gives the exchange writes the answer in its own shape (chat chunks here, the
Responses API's events in `gateway.responses`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import orjson
import structlog

from gateway.answer import Answer
from gateway.auth import Principal
from gateway.backends.base import ChunkStream, Route, UpstreamCall
from gateway.errors import (
    GatewayError,
    ModelNotFound,
    PermissionDenied,
    ServiceUnavailable,
    ShuttingDown,
    UpstreamError,
    cut_by_shutdown,
)
from gateway.exchange import Api as ApiName
from gateway.exchange import ExchangeObserver, ExchangeRecord, Outcome
from gateway.metrics import Metrics
from gateway.response_cache import CachedAnswer, CacheDecision, Claim
from gateway.routing.router import Router, RoutingFailed, Served
from gateway.routing.table import ModelPlan
from gateway.tokens import prompt_tokens, text_tokens
from gateway.tracing import NO_TRACE, NO_TRACING, ExchangeTrace, Tracing
from gateway.wire import (
    SSE_DONE,
    ChatRequest,
    parse_chat_request,
    sse_event,
    usage_chunk,
    usage_dict,
)

log = structlog.get_logger("gateway.pipeline")
T = TypeVar("T")


class Authenticator(Protocol):
    async def authenticate(self, authorization: str | None) -> Principal: ...


class Admission(Protocol):
    headers: list[tuple[bytes, bytes]]  # x-ratelimit-*, encoded as the response sends them

    def settle(self, actual_tokens: int) -> None:
        """Correct the reservation to what was used; once, never waits, never raises."""
        ...


class Admitter(Protocol):
    async def admit(self, principal: Principal, model: str, estimated_tokens: int
                    ) -> Admission: ...


class ResponseCache(Protocol):
    def decide(self, route: Route, body: dict[str, Any], team: str,
               cache_control: str | None) -> CacheDecision: ...

    async def claim(self, decision: CacheDecision) -> Claim: ...

    async def store(self, claim: Claim, answer: Answer) -> None: ...

    def release(self, claim: Claim) -> None: ...


# A piece of a streamed body and whether it is the last one (sent with the end of the body).
Piece = tuple[bytes, bool]


class Encoder(Protocol):
    """How one exchange's answer is written for its client. The pipeline adds the upstream's
    chunks or completion to ``ex.answer``; the encoder writes them."""

    def relay(self, ex: Exchange, batch: list[dict[str, Any]]) -> list[bytes]:
        """One upstream read's chunks (already in ``ex.answer``) as SSE events."""
        ...

    async def close(self, ex: Exchange) -> list[bytes]:
        """The events that end a complete stream."""
        ...

    async def whole(self, ex: Exchange, completion: dict[str, Any]) -> bytes:
        """The body of a non-streamed reply (``completion``'s usage is set)."""
        ...

    async def replay(self, ex: Exchange) -> bytes:
        """``ex.answer`` from the cache: the whole body, or every event of the stream."""
        ...

    def failure(self, ex: Exchange, exc: GatewayError) -> bytes:
        """The event that ends a stream cut by `exc`."""
        ...


@dataclass(slots=True)
class Parsed:
    """A request as the pipeline serves it: the chat body to forward, its typed view, and
    the encoder of its API."""

    body: dict[str, Any]
    chat: ChatRequest
    encoder: Encoder


class Api(Protocol):
    name: ApiName
    path: str  # its route, for the request's span

    async def parse(self, raw: bytes, principal: Principal) -> Parsed: ...


@dataclass(slots=True)
class Reply:
    """What the HTTP layer sends: a whole body, or a stream of SSE byte pieces."""

    status: int
    headers: dict[str, str]
    body: bytes = b""
    stream: AsyncIterator[Piece] | None = None
    media_type: str = "application/json"
    raw_headers: Sequence[tuple[bytes, bytes]] = ()  # sent after `headers`, already encoded
    upstream_wait: float = 0.0  # seconds spent waiting for the upstream before the reply
    route: Route | None = None  # None: refused before it was routed


@dataclass(slots=True)
class Exchange:
    """Mutable state of one admitted request, finished exactly once."""

    request_id: str
    started: float  # perf_counter
    wall: float
    principal: Principal
    plan: ModelPlan
    # the answering deployment's route (a fallback's, maybe), the model's own until one
    # answers (cache keys, refusals)
    route: Route
    chat: ChatRequest
    body: dict[str, Any]
    headers: Mapping[str, str]
    prompt_estimate: int
    encoder: Encoder
    api: ApiName
    admission: Admission | None = None
    claim: Claim | None = None
    answer: Answer = field(default_factory=Answer)
    status: int = 200
    outcome: Outcome = "completed"
    cached: bool = False
    ttft: float | None = None
    error: dict[str, Any] | None = None
    upstream_wait: float = 0.0
    finished: bool = False
    extra_headers: dict[str, str] = field(default_factory=dict)
    attempts: int = 0  # upstream calls made
    trace: ExchangeTrace = NO_TRACE


class Pipeline:
    def __init__(
        self,
        *,
        plans: Mapping[str, ModelPlan],
        router: Router,
        authenticator: Authenticator,
        admitter: Admitter | None,
        cache: ResponseCache | None,
        observers: Sequence[ExchangeObserver],
        metrics: Metrics,
        default_max_tokens: int = 1024,
        conversation_header: str = "x-conversation-id",
        user_header: str = "x-end-user-id",
        tracing: Tracing = NO_TRACING,
    ) -> None:
        self.plans = plans
        self.router = router
        self.authenticator = authenticator
        self.admitter = admitter
        self.cache = cache
        self.observers = list(observers)
        self.metrics = metrics
        self.default_max_tokens = default_max_tokens
        self.conversation_header = conversation_header
        self.user_header = user_header
        self.tracing = tracing
        # cache results by (model, result): plain counts, reported when metrics are sampled
        self._cache_events = metrics.tally(metrics.cache_events)
        self._requests = metrics.tally(metrics.requests)  # by model, backend, status
        self.chat_api = ChatApi()

    # -- entry -------------------------------------------------------------------------------

    async def handle(self, request_id: str, raw: bytes, headers: Mapping[str, str],
                     api: Api | None = None) -> Reply:
        """Serve one request of `api` (chat completions by default)."""
        started = time.perf_counter()
        wall = time.time()
        api = api or self.chat_api
        trace = self.tracing.exchange(headers, api.path)
        try:
            with trace.stage("authenticate"):
                principal = await self.authenticator.authenticate(headers.get("authorization"))
            parsed = await api.parse(raw, principal)
            body, chat = parsed.body, parsed.chat
            trace.request(principal.team, principal.key_id, chat.model, body)
            plan = self._plan(principal, chat.model)
            estimate = prompt_tokens(body["messages"])
            ex = Exchange(request_id, started, wall, principal, plan, plan.route, chat, body,
                          headers, estimate, parsed.encoder, api.name, trace=trace)
            if self.admitter is not None:
                tokens = estimate + (chat.answer_token_budget or self.default_max_tokens)
                with trace.stage("limits"):
                    ex.admission = await self.admitter.admit(principal, plan.model, tokens)
        except GatewayError as exc:  # refused before anything was reserved: no record
            self.metrics.rejected.labels(exc.code or "error").inc()
            trace.refused(exc)
            return self._error_reply(exc)
        return await self._admitted(ex)

    def _plan(self, principal: Principal, model: str) -> ModelPlan:
        """The routing plan of `model`, when this principal may use it and one of its
        deployments has its credentials."""
        plan = self.plans.get(model)
        if plan is None:
            raise ModelNotFound(
                f"The model '{model}' does not exist or is not served by this gateway. "
                "GET /v1/models lists the models you can use.",
                param="model",
            )
        if not principal.allows(plan.model):
            raise PermissionDenied(f"Your key may not use the model '{plan.model}'.",
                                   param="model")
        missing = plan.credentials_missing
        if missing:
            raise ServiceUnavailable(
                f"The model '{plan.model}' is not available: its backend "
                f"'{plan.route.backend}' has no upstream credentials. Set {missing} and "
                "restart the gateway.",
                code="backend_not_configured",
            )
        return plan

    async def _admitted(self, ex: Exchange) -> Reply:
        handed_off = False
        try:
            with ex.trace.stage("cache"):
                cached = await self._cached(ex)
            if cached is not None:
                ex.cached = True
                reply = await self._replay(ex, cached)
                handed_off = reply.stream is not None
                return reply
            upstream_started = time.perf_counter()
            if ex.chat.stream:
                stream = self._served(ex, await self.router.stream(ex.plan, self._call(ex)))
                ex.upstream_wait = time.perf_counter() - upstream_started
                handed_off = True
                return self._ok(ex, stream=self._relay(ex, stream))
            completion = self._served(ex, await self.router.complete(ex.plan, self._call(ex)))
            ex.upstream_wait = time.perf_counter() - upstream_started
            return await self._completed(ex, completion)
        except RoutingFailed as failed:
            ex.attempts = failed.attempts
            self._fail(ex, failed.error)
            return self._error_reply(failed.error, ex)
        except GatewayError as exc:
            self._fail(ex, exc)
            return self._error_reply(exc, ex)
        except asyncio.CancelledError as exc:
            self._interrupted(ex, exc)
            raise
        except Exception as exc:  # a bug must still end as an envelope and a record
            log.exception("pipeline_failed", error_type=type(exc).__name__)
            error = GatewayError("The gateway failed to process this request.")
            self._fail(ex, error)
            return self._error_reply(error, ex)
        finally:
            if not handed_off:
                await self._finish(ex)

    # -- upstream ----------------------------------------------------------------------------

    @staticmethod
    def _call(ex: Exchange) -> Callable[[Route], UpstreamCall]:
        """The upstream call of one attempt, on a deployment's route."""
        def call(route: Route) -> UpstreamCall:
            return UpstreamCall(ex.request_id, route, ex.chat, ex.body, ex.headers,
                                trace=ex.trace)
        return call

    def _served(self, ex: Exchange, served: Served[T]) -> T:
        """Note who answered, for the reply's headers and the record."""
        ex.route = served.call.route
        ex.attempts = served.attempts
        ex.extra_headers.update(served.call.reply_headers)
        ex.extra_headers["x-gateway-backend"] = served.deployment.name
        ex.extra_headers["x-gateway-attempts"] = str(served.attempts)
        return served.result

    # -- cache -------------------------------------------------------------------------------

    async def _cached(self, ex: Exchange) -> CachedAnswer | None:
        cache = self.cache
        if cache is None:
            return None
        decision = cache.decide(ex.plan.route, ex.body, ex.principal.team,
                                ex.headers.get("cache-control"))
        claim = ex.claim = await cache.claim(decision)
        self._count_cache(ex.route.model, claim.status)
        if claim.coalesced:
            self._count_cache(ex.route.model, "coalesced")
        ex.extra_headers["x-gateway-cache"] = claim.status
        if claim.hit is not None:
            ex.extra_headers["age"] = str(int(claim.hit.age))
        return claim.hit

    def _count_cache(self, model: str, result: str) -> None:
        key = (model, result)
        self._cache_events[key] = self._cache_events.get(key, 0) + 1

    async def _replay(self, ex: Exchange, hit: CachedAnswer) -> Reply:
        ex.answer = hit.answer
        data = await ex.encoder.replay(ex)
        if not ex.chat.stream:
            return self._ok(ex, data)
        return self._ok(ex, stream=self._replay_stream(ex, data))

    async def _replay_stream(self, ex: Exchange, data: bytes) -> AsyncIterator[Piece]:
        try:
            ex.ttft = time.perf_counter() - ex.started
            # one write for the whole replay: the events stay distinct SSE events
            yield data, True
        except BaseException:
            ex.outcome = "client_disconnected"
            raise
        finally:
            await self._finish(ex)

    async def _completed(self, ex: Exchange, completion: dict[str, Any]) -> Reply:
        answer = ex.answer
        answer.add_completion(completion)
        if not completion.get("usage"):
            completion["usage"] = estimated_usage(ex)
        answer.usage = completion["usage"]
        ex.ttft = time.perf_counter() - ex.started
        data = await ex.encoder.whole(ex, completion)
        await self._store(ex)
        return self._ok(ex, data)

    async def _relay(self, ex: Exchange, stream: ChunkStream) -> AsyncIterator[Piece]:
        """Re-emit upstream chunks as they arrive; one ``finally`` ends the exchange.

        Chunks that arrived in one upstream read leave in one write; the read that carried
        ``[DONE]`` goes out together with the encoder's ending (for chat: the usage chunk and
        our ``[DONE]``) and the end of the response body."""
        encoder = ex.encoder
        # closed below rather than left suspended after the last batch: the event loop's
        # finalizer would close it with a task of its own, per stream
        batches = stream.batches()
        try:
            tail: list[bytes] = []
            async for batch, last in batches:
                out = encoder.relay(ex, batch)
                if not out:
                    continue
                if ex.ttft is None:
                    ex.ttft = time.perf_counter() - ex.started
                if last:
                    tail = out
                    break
                yield (out[0] if len(out) == 1 else b"".join(out)), False
            tail += await encoder.close(ex)
            yield b"".join(tail), True
            await self._store(ex)
        except GatewayError as exc:
            self._fail(ex, exc)
            yield encoder.failure(ex, exc), True
        except (asyncio.CancelledError, GeneratorExit) as exc:
            self._interrupted(ex, exc)
            raise
        except Exception as exc:  # never cut a stream silently
            log.exception("stream_failed", error_type=type(exc).__name__)
            error = GatewayError("The gateway failed while relaying the stream.")
            self._fail(ex, error)
            yield encoder.failure(ex, error), True
        finally:
            await batches.aclose()
            await stream.aclose()
            await self._finish(ex)

    async def _store(self, ex: Exchange) -> None:
        """Cache the answer, unless a fallback model gave it (not this model's answer)."""
        if ex.claim is not None and self.cache is not None and ex.route.model == ex.plan.model:
            await self.cache.store(ex.claim, ex.answer)

    # -- endings -----------------------------------------------------------------------------

    def _fail(self, ex: Exchange, exc: GatewayError) -> None:
        if isinstance(exc, UpstreamError):
            self.metrics.child(self.metrics.upstream_errors, ex.route.backend,
                               exc.code or "error").inc()
            log.warning("upstream_failed", backend=ex.route.backend, code=exc.code,
                        status=exc.status, detail=exc.detail)
            exc.message = f"{exc.message} Request id: {ex.request_id}."
        ex.status = exc.status
        ex.outcome = "error"
        ex.error = exc.body()

    def _interrupted(self, ex: Exchange, exc: BaseException) -> None:
        """The drain's cut is an error the client is told of; anything else interrupting an
        exchange is its client going away."""
        if cut_by_shutdown(exc):
            self._fail(ex, ShuttingDown())
        else:
            ex.outcome = "client_disconnected"
            ex.status = 499

    async def _finish(self, ex: Exchange) -> None:
        if ex.finished:
            return
        ex.finished = True
        if ex.claim is not None and self.cache is not None:
            self.cache.release(ex.claim)  # a lead not ended by storing the answer
        usage = ex.answer.usage = ex.answer.usage or estimated_usage(ex)
        if ex.admission is not None:
            used = int(usage.get("prompt_tokens") or 0) + int(usage.get("completion_tokens") or 0)
            ex.admission.settle(0 if ex.cached else used)
        elapsed = time.perf_counter() - ex.started
        self._observe(ex, elapsed)
        record = self._record(ex, elapsed)
        ex.trace.finish(record)
        for observer in self.observers:
            try:
                observer.exchange_finished(record)
            except Exception:  # an observer must never break the request path
                log.exception("observer_failed", observer=type(observer).__name__)

    def _observe(self, ex: Exchange, elapsed: float) -> None:
        model, backend = ex.plan.model, ex.route.backend  # asked for; answered by
        status = str(ex.status)
        key = (model, backend, status)
        self._requests[key] = self._requests.get(key, 0) + 1
        self.metrics.child(self.metrics.latency, model, backend, status).observe(elapsed)
        if ex.ttft is not None and not ex.cached:
            self.metrics.child(self.metrics.ttft, model, backend).observe(ex.ttft)

    def _record(self, ex: Exchange, elapsed: float) -> ExchangeRecord:
        answer, route = ex.answer, ex.route
        return ExchangeRecord(
            request_id=ex.request_id,
            time=ex.wall,
            team=ex.principal.team,
            key_id=ex.principal.key_id,
            model=ex.plan.model,
            backend=route.backend,
            upstream_model=route.upstream_model,
            served_model=route.model,
            attempts=ex.attempts,
            stream=ex.chat.stream,
            messages=ex.body["messages"],
            answer=answer.text,
            finish_reason=answer.finish_reason,
            usage=answer.usage or {},
            latency_ms=round(elapsed * 1000, 3),
            ttft_ms=None if ex.ttft is None else round(ex.ttft * 1000, 3),
            status=ex.status,
            cached=ex.cached,
            outcome=ex.outcome,
            tool_calls=[answer.tool_calls[i] for i in sorted(answer.tool_calls)],
            reasoning="".join(answer.reasoning) or None,
            extensions=dict(answer.extensions),
            error=ex.error,
            user=ex.headers.get(self.user_header) or ex.chat.user,
            conversation_id=ex.headers.get(self.conversation_header),
            api=ex.api,
            trace_id=ex.trace.trace_id,
            span_id=ex.trace.span_id,
        )

    # -- replies -----------------------------------------------------------------------------

    def _ok(self, ex: Exchange, body: bytes = b"",
            stream: AsyncIterator[Piece] | None = None) -> Reply:
        """A 200 reply, whole (`body`) or streamed, with the exchange's headers."""
        headers = ex.extra_headers
        raw = ex.admission.headers if ex.admission is not None else ()
        if stream is None:
            return Reply(200, headers, body, raw_headers=raw, upstream_wait=ex.upstream_wait,
                         route=ex.route)
        return Reply(200, headers, stream=stream, media_type="text/event-stream",
                     raw_headers=raw, upstream_wait=ex.upstream_wait, route=ex.route)

    def _error_reply(self, exc: GatewayError, ex: Exchange | None = None) -> Reply:
        headers = dict(exc.headers)
        if ex is None:
            return Reply(exc.status, headers, exc.json())
        if ex.admission is not None:
            limits = {name.decode(): value.decode() for name, value in ex.admission.headers}
            headers = {**limits, **headers}
        if ex.attempts:
            headers["x-gateway-attempts"] = str(ex.attempts)
        return Reply(exc.status, headers, exc.json(), upstream_wait=ex.upstream_wait,
                     route=ex.route)


def estimated_usage(ex: Exchange) -> dict[str, Any]:
    """Usage counted by the gateway, for an upstream that told none."""
    completion = text_tokens(ex.answer.text) + text_tokens("".join(ex.answer.reasoning))
    for call in ex.answer.tool_calls.values():
        completion += text_tokens(str((call.get("function") or {}).get("arguments") or ""))
    return usage_dict(ex.prompt_estimate, completion, estimated=True)


# -- chat completions ------------------------------------------------------------------------


class ChatApi:
    """``/v1/chat/completions``: the body is the chat request, the answer re-emitted as
    ``chat.completion`` chunks."""

    name: ApiName = "chat.completions"
    path = "/v1/chat/completions"

    async def parse(self, raw: bytes, principal: Principal) -> Parsed:
        body, chat = parse_chat_request(raw)
        return Parsed(body, chat, ChatEncoder())


class ChatEncoder:
    __slots__ = ("cid", "created")

    def __init__(self) -> None:
        now = time.time()
        self.cid = f"chatcmpl-{time.time_ns():x}"
        self.created = int(now)

    def relay(self, ex: Exchange, batch: list[dict[str, Any]]) -> list[bytes]:
        """One upstream read's chunks as our SSE events: under the public model name, with
        an id and time where the upstream gave none. Each is added to the answer first; the
        upstream's usage is kept for the end of the stream (sent only when asked)."""
        out: list[bytes] = []
        for data in batch:
            ex.answer.add_chunk(data)
            if "usage" in data:
                del data["usage"]
                if not data.get("choices"):
                    continue  # the upstream's usage chunk
            data["model"] = ex.route.model
            data["object"] = "chat.completion.chunk"
            if not data.get("id"):
                data["id"] = self.cid
            if not data.get("created"):
                data["created"] = self.created
            out.append(sse_event(data))
        return out

    async def close(self, ex: Exchange) -> list[bytes]:
        if not ex.chat.include_usage:
            return [SSE_DONE]
        ex.answer.usage = ex.answer.usage or estimated_usage(ex)
        return [sse_event(usage_chunk(self.cid, ex.route.model, self.created, ex.answer.usage)),
                SSE_DONE]

    async def whole(self, ex: Exchange, completion: dict[str, Any]) -> bytes:
        completion["id"] = completion.get("id") or self.cid
        completion["object"] = "chat.completion"
        completion["created"] = completion.get("created") or self.created
        completion["model"] = ex.route.model
        return orjson.dumps(completion)

    async def replay(self, ex: Exchange) -> bytes:
        answer, model = ex.answer, ex.route.model
        if not ex.chat.stream:
            return orjson.dumps(answer.to_completion(self.cid, model, self.created))
        chunks = answer.replay_chunks(self.cid, model, self.created,
                                      include_usage=ex.chat.include_usage, pieces=None)
        return b"".join([*(sse_event(data) for data in chunks), SSE_DONE])

    def failure(self, ex: Exchange, exc: GatewayError) -> bytes:
        return sse_event(exc.body())
