"""OpenTelemetry spans of each exchange, exported over OTLP/HTTP (imported only when on).

One ``POST /v1/chat/completions`` server span per request (a child of the client's
``traceparent``), with GenAI semantic-convention attributes, and child spans: ``authenticate``,
``limits``, ``cache``, one ``chat {upstream model}`` client span per upstream attempt. An
analytics delivery is a span of its own, linked to the requests whose records it carries.
Never a secret; prompts and answers only with ``observability.capture_content``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any

import orjson
from opentelemetry import context, propagate, trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import Link, Span, SpanContext, SpanKind, Status, StatusCode, TraceFlags

from gateway.errors import GatewayError, UpstreamError
from gateway.exchange import ExchangeRecord

DEFAULT_SERVICE = "rag-gateway"
FIRST_TOKEN = "gen_ai.first_token"


class OtelTracing:
    """`endpoint`: the OTLP/HTTP traces URL; `systems`: each backend's ``gen_ai.system``."""

    def __init__(self, endpoint: str, systems: Mapping[str, str], *,
                 capture_content: bool = False) -> None:
        service = os.environ.get("OTEL_SERVICE_NAME") or DEFAULT_SERVICE
        self.provider = TracerProvider(resource=Resource.create({"service.name": service}))
        self.provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
        self.tracer = self.provider.get_tracer("gateway")
        self.systems = systems
        self.capture_content = capture_content

    def exchange(self, headers: Mapping[str, str], route: str) -> ExchangeSpans:
        return ExchangeSpans(self, headers, route)

    def delivery(self, sink: str, records: Sequence[ExchangeRecord]) -> _Scope:
        links = [link for link in map(_link, records) if link is not None]
        span = self.tracer.start_span(f"deliver {sink}", kind=SpanKind.CLIENT, links=links,
                                      attributes={"gateway.sink": sink,
                                                  "gateway.records": len(records)})
        return _Scope(span, attach=False)

    def inject(self, headers: dict[str, str]) -> None:
        propagate.inject(headers)

    def shutdown(self) -> None:
        self.provider.shutdown()


class _Scope:
    """A span ended when the block ends, failed by the error leaving it; `attach` makes it
    the current span meanwhile."""

    def __init__(self, span: Span, *, attach: bool, keep: bool = False) -> None:
        self.span = span
        self._attach = attach
        self._token: object = None
        self.kept = keep  # on success the span is left open, for its owner to end

    def __enter__(self) -> Span:
        if self._attach:
            self._token = context.attach(trace.set_span_in_context(self.span))
        return self.span

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._token is not None:
            context.detach(self._token)  # type: ignore[arg-type]
        if exc is None:
            self.span.set_attribute("gateway.outcome", "success")
            if not self.kept:
                self.span.end()
            return
        self.kept = False
        if isinstance(exc, GatewayError):
            failed(self.span, exc)
        else:
            self.span.set_attribute("gateway.outcome", "cancelled")
        self.span.end()


def _link(record: ExchangeRecord) -> Link | None:
    """A link to the record's request span (None for a record made without tracing, or
    whose ids do not read as hex: a delivery never fails for its span)."""
    try:
        return Link(SpanContext(int(record.trace_id or "", 16), int(record.span_id or "", 16),
                                is_remote=True, trace_flags=TraceFlags(TraceFlags.SAMPLED)))
    except ValueError:
        return None


def failed(span: Span, exc: GatewayError) -> None:
    code = exc.code or type(exc).__name__
    span.set_status(Status(StatusCode.ERROR, code))
    span.set_attribute("error.type", code)
    span.set_attribute("gateway.outcome", "error")
    if isinstance(exc, UpstreamError) and exc.upstream_status is not None:
        span.set_attribute("http.response.status_code", exc.upstream_status)


class ExchangeSpans:
    """The spans of one request (an `ExchangeTrace`)."""

    def __init__(self, tracing: OtelTracing, headers: Mapping[str, str], route: str) -> None:
        self._tracing = tracing
        self.started = time.time_ns()
        attributes: dict[str, Any] = {"http.request.method": "POST", "http.route": route,
                                      "url.path": route, "gen_ai.operation.name": "chat"}
        agent = headers.get("user-agent")
        if agent:
            attributes["user_agent.original"] = agent
        self.span = tracing.tracer.start_span(
            f"POST {route}", context=propagate.extract(headers), kind=SpanKind.SERVER,
            attributes=attributes, start_time=self.started)
        ids = self.span.get_span_context()
        self.trace_id: str | None = format(ids.trace_id, "032x")
        self.span_id: str | None = format(ids.span_id, "016x")
        self._parent = trace.set_span_in_context(self.span)
        self._answering: _Scope | None = None

    def stage(self, name: str) -> _Scope:
        return _Scope(self._tracing.tracer.start_span(name, context=self._parent),
                      attach=False)

    def attempt(self, deployment: str, upstream_model: str, number: int) -> _Scope:
        system = self._tracing.systems.get(deployment, deployment)
        span = self._tracing.tracer.start_span(
            f"chat {upstream_model}", context=self._parent, kind=SpanKind.CLIENT,
            attributes={"gen_ai.operation.name": "chat", "gen_ai.system": system,
                        "gen_ai.provider.name": system, "gen_ai.request.model": upstream_model,
                        "gateway.deployment": deployment, "gateway.attempt": number})
        # the answering attempt's span lasts until its answer was relayed (`finish`)
        self._answering = _Scope(span, attach=True, keep=True)
        return self._answering

    def request(self, team: str, key_id: str, model: str, body: Mapping[str, Any]) -> None:
        span = self.span
        span.set_attribute("gateway.team", team)
        span.set_attribute("gateway.key_id", key_id)
        span.set_attribute("gen_ai.request.model", model)
        budget = body.get("max_completion_tokens") or body.get("max_tokens")
        if isinstance(budget, int):
            span.set_attribute("gen_ai.request.max_tokens", budget)
        temperature = body.get("temperature")
        if isinstance(temperature, int | float):
            span.set_attribute("gen_ai.request.temperature", float(temperature))

    def refused(self, error: GatewayError) -> None:
        self.span.set_attribute("http.response.status_code", error.status)
        failed(self.span, error)
        self.span.end()

    def finish(self, record: ExchangeRecord) -> None:
        span = self.span
        span.set_attributes(_attributes(record, self._tracing.systems))
        if record.ttft_ms is not None:
            span.add_event(FIRST_TOKEN, timestamp=self.started + int(record.ttft_ms * 1e6))
        if self._tracing.capture_content:
            span.set_attributes(_content(record))
        answering = self._answering
        if answering is not None and answering.kept:
            if record.outcome == "error":
                answering.span.set_status(Status(StatusCode.ERROR, _code(record)))
            answering.span.end()
        if record.outcome == "error":
            span.set_status(Status(StatusCode.ERROR, _code(record)))
            span.set_attribute("error.type", _code(record))
        elif record.outcome == "client_disconnected":
            span.add_event("client_disconnected")
        span.end()


def _code(record: ExchangeRecord) -> str:
    return str((record.error or {}).get("error", {}).get("code") or "error")


def _attributes(record: ExchangeRecord, systems: Mapping[str, str]) -> dict[str, Any]:
    system = systems.get(record.backend, record.backend)
    attributes: dict[str, Any] = {
        "http.response.status_code": record.status, "gateway.request_id": record.request_id,
        "gen_ai.system": system, "gen_ai.provider.name": system,
        "gen_ai.response.model": record.upstream_model, "gateway.backend": record.backend,
        "gateway.served_model": record.served_model, "gateway.outcome": record.outcome,
        "gateway.cached": record.cached, "gateway.attempts": record.attempts,
        "gen_ai.usage.input_tokens": record.prompt_tokens,
        "gen_ai.usage.output_tokens": record.completion_tokens,
        "gateway.tokens_estimated": record.estimated,
    }
    if record.finish_reason:
        attributes["gen_ai.response.finish_reasons"] = [record.finish_reason]
    return attributes


def _content(record: ExchangeRecord) -> dict[str, str]:
    """The prompt and the answer as the GenAI conventions' message attributes (JSON)."""
    output = [{"role": "assistant", "parts": [{"type": "text", "content": record.answer}],
               "finish_reason": record.finish_reason or ""}]
    return {"gen_ai.input.messages": orjson.dumps([_message(m) for m in record.messages]
                                                  ).decode(),
            "gen_ai.output.messages": orjson.dumps(output).decode()}


def _message(message: dict[str, Any]) -> dict[str, Any]:
    """An OpenAI message as a GenAI one: text content as a text part, parts as they are."""
    content = message.get("content")
    parts = [{"type": "text", "content": content}] if isinstance(content, str) else content
    return {"role": message.get("role"), "parts": parts or []}
