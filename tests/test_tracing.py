"""Tracing end to end: a real `gateway serve` exporting OTLP/HTTP to a receiver in the test,
which decodes the real protobuf payloads; the openai SDK as the client, the fake Nuclia as the
upstream and the fake webhook as the analytics sink."""

from __future__ import annotations

import gzip
import os
import secrets
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.testing.configs import config_yaml, static_key
from gateway.testing.fake_analytics import create_fake_analytics_app
from gateway.testing.fake_nuclia import answer_text, create_fake_nuclia_app
from gateway.testing.process import GatewayProcess, run_gateway
from gateway.testing.server import run_server, run_server_in_thread
from gateway.tracing import otlp_endpoint
from tests.eventually import eventually

pytestmark = pytest.mark.slow

KEY = "sk-tracing-client-secret"
TOKEN = "nuclia-tracing-secret"
KBID = "kb-traced"
QUESTION = "Which spans does the gateway make?"
REQUEST = "POST /v1/chat/completions"
ATTEMPT = "chat kb-upstream"
# exported every 50 ms rather than every 5 s: the spans arrive while the test waits
FAST_EXPORT = {"OTEL_BSP_SCHEDULE_DELAY": "50"}


# -- the OTLP/HTTP receiver ----------------------------------------------------------------


@dataclass
class Received:
    spans: list[Span] = field(default_factory=list)
    services: list[str] = field(default_factory=list)
    posts: int = 0

    def named(self, name: str) -> list[Span]:
        return [s for s in self.spans if s.name == name]

    def one(self, name: str) -> Span | None:
        found = self.named(name)
        assert len(found) <= 1, found
        return found[0] if found else None

    def children(self, parent: Span) -> dict[str, Span]:
        return {s.name: s for s in self.spans
                if s.parent_span_id == parent.span_id and s.trace_id == parent.trace_id}


def receiver_app(received: Received) -> Starlette:
    async def traces(request: Request) -> Response:
        raw = await request.body()
        if request.headers.get("content-encoding") == "gzip":
            raw = gzip.decompress(raw)
        export = ExportTraceServiceRequest.FromString(raw)
        received.posts += 1
        for resource in export.resource_spans:
            service = attributes(resource.resource.attributes)["service.name"]
            for scope in resource.scope_spans:
                received.services.extend(service for _ in scope.spans)
                received.spans.extend(scope.spans)
        return Response(ExportTraceServiceResponse().SerializeToString(),
                        media_type="application/x-protobuf")

    return Starlette(routes=[Route("/v1/traces", traces, methods=["POST"])])


def value(any_value: AnyValue) -> Any:
    kind = any_value.WhichOneof("value")
    if kind == "array_value":
        return [value(v) for v in any_value.array_value.values]
    return getattr(any_value, kind) if kind else None


def attributes(pairs: Any) -> dict[str, Any]:
    return {pair.key: value(pair.value) for pair in pairs}


# -- the setting ---------------------------------------------------------------------------


@dataclass
class Setting:
    tmp_path: Path
    collector: str  # the receiver's base URL
    received: Received
    nuclia: Starlette
    nuclia_url: str
    hook_url: str
    hook: Any  # the fake webhook's state

    def config(self, observability: dict[str, Any] | None = None, retries: int = 0) -> Path:
        path = self.tmp_path / "gateway.yaml"
        extra: dict[str, Any] = {"observability": observability} if observability else {}
        path.write_text(config_yaml(
            backends={"nuclia": {"kind": "nuclia", "base_url": f"{self.nuclia_url}/api/v1",
                                 "kbid": KBID, "api_key": TOKEN}},
            models={"kb": {"backend": "nuclia", "upstream_model": "kb-upstream",
                           "retries": retries}},
            keys=[static_key(KEY, id="key-7", team="alpha")],
            sinks=[{"name": "hook", "kind": "webhook", "url": f"{self.hook_url}/hook"}],
            extra=extra))
        return path


@pytest.fixture
def collector() -> Iterator[tuple[str, Received]]:
    # in a thread: the gateway exports its last spans while it stops, when this test's event
    # loop is blocked waiting for it
    received = Received()
    with run_server_in_thread(receiver_app(received)) as url:
        yield url, received


@pytest.fixture
async def setting(tmp_path: Path, collector: tuple[str, Received]) -> AsyncIterator[Setting]:
    nuclia = create_fake_nuclia_app(kbid=KBID, token=TOKEN, slow_delay=0.05)
    hook = create_fake_analytics_app()
    async with run_server(nuclia) as nuclia_url, run_server(hook) as hook_url:
        yield Setting(tmp_path, collector[0], collector[1], nuclia, nuclia_url, hook_url,
                      hook.state.analytics)


def client(gateway: GatewayProcess, key: str = KEY) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{gateway.url}/v1", api_key=key, max_retries=0)


def logged_requests(gateway: GatewayProcess) -> list[dict[str, Any]]:
    lines = [orjson.loads(line) for line in gateway.log().splitlines() if line.startswith("{")]
    return [line for line in lines if line.get("event") == "request"]


def ended_within(child: Span, parent: Span) -> bool:
    return parent.start_time_unix_nano <= child.start_time_unix_nano \
        and child.end_time_unix_nano <= parent.end_time_unix_nano


# -- the tests -----------------------------------------------------------------------------


async def test_a_streamed_nuclia_answer(setting: Setting) -> None:
    trace_id, parent_id = secrets.token_hex(16), secrets.token_hex(8)
    received = setting.received
    with run_gateway(setting.config({"otlp_endpoint": setting.collector}),
                     env=FAST_EXPORT) as gateway:
        async with client(gateway) as sdk:
            stream = await sdk.chat.completions.create(
                model="kb", messages=[{"role": "user", "content": f"[slow] {QUESTION}"}],
                stream=True, max_tokens=300, temperature=0.2,
                extra_headers={"traceparent": f"00-{trace_id}-{parent_id}-01",
                               "tracestate": "vendor=opaque"})
            text = "".join([c.choices[0].delta.content or "" async for c in stream
                            if c.choices])
        assert text == answer_text(f"[slow] {QUESTION}")
        await eventually(lambda: received.one(REQUEST) and received.one("deliver hook")
                         and logged_requests(gateway))
        [logged] = logged_requests(gateway)

    request = received.one(REQUEST)
    assert request is not None
    assert (request.trace_id.hex(), request.parent_span_id.hex()) == (trace_id, parent_id)
    assert request.kind == Span.SPAN_KIND_SERVER
    assert request.status.code == Status.STATUS_CODE_UNSET
    assert set(received.services) == {"rag-gateway"}

    spans = received.children(request)
    assert set(spans) == {"authenticate", "limits", "cache", ATTEMPT}
    assert all(ended_within(span, request) for span in spans.values())
    assert spans["authenticate"].end_time_unix_nano <= spans["limits"].start_time_unix_nano
    attempt = spans[ATTEMPT]
    assert attempt.kind == Span.SPAN_KIND_CLIENT
    assert attributes(attempt.attributes) == {
        "gen_ai.operation.name": "chat", "gen_ai.system": "nuclia",
        "gen_ai.provider.name": "nuclia", "gen_ai.request.model": "kb-upstream",
        "gateway.deployment": "nuclia", "gateway.attempt": 1, "gateway.outcome": "success"}

    found = attributes(request.attributes)
    usage = (found["gen_ai.usage.input_tokens"], found["gen_ai.usage.output_tokens"])
    assert usage == (logged["prompt_tokens"], logged["completion_tokens"])
    assert min(usage) > 0
    assert {k: found[k] for k in (
        "http.request.method", "http.route", "http.response.status_code",
        "gen_ai.operation.name", "gen_ai.system", "gen_ai.request.model",
        "gen_ai.response.model", "gen_ai.response.finish_reasons", "gen_ai.request.max_tokens",
        "gen_ai.request.temperature", "gateway.team", "gateway.key_id", "gateway.outcome",
        "gateway.cached", "gateway.attempts")} == {
        "http.request.method": "POST", "http.route": "/v1/chat/completions",
        "http.response.status_code": 200, "gen_ai.operation.name": "chat",
        "gen_ai.system": "nuclia", "gen_ai.request.model": "kb",
        "gen_ai.response.model": "kb-upstream", "gen_ai.response.finish_reasons": ["stop"],
        "gen_ai.request.max_tokens": 300, "gen_ai.request.temperature": 0.2,
        "gateway.team": "alpha", "gateway.key_id": "key-7", "gateway.outcome": "completed",
        "gateway.cached": False, "gateway.attempts": 1}
    # never a secret, nor the conversation, unless capture_content is on
    everything = repr([attributes(s.attributes) for s in received.spans])
    assert KEY not in everything and TOKEN not in everything and QUESTION not in everything

    # the first token comes in the middle of the span: the span ends with the stream
    [first] = [e for e in request.events if e.name == "gen_ai.first_token"]
    assert request.start_time_unix_nano < first.time_unix_nano < request.end_time_unix_nano
    assert (logged["ttft_ms"] * 1e6) < request.end_time_unix_nano - request.start_time_unix_nano

    # the upstream got the attempt's span as its parent, and the client's tracestate
    headers = setting.nuclia.state.last_headers
    assert headers["traceparent"] == f"00-{trace_id}-{attempt.span_id.hex()}-01"
    assert headers["tracestate"] == "vendor=opaque"
    assert logged["trace_id"] == trace_id

    # the analytics delivery: a trace of its own, linked to the request's span
    delivery = received.one("deliver hook")
    assert delivery is not None and delivery.trace_id != request.trace_id
    assert [(link.trace_id, link.span_id) for link in delivery.links] == [
        (request.trace_id, request.span_id)]
    assert attributes(delivery.attributes)["gateway.records"] == 1
    [hooked] = setting.hook.on("/hook")
    assert (hooked.body["trace_id"], hooked.body["span_id"]) == (trace_id, request.span_id.hex())


async def test_an_upstream_failure(setting: Setting) -> None:
    """Tracing on by the standard variable, without a word in the config; a span for each
    of the router's attempts."""
    env = {**FAST_EXPORT, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"{setting.collector}/v1/traces",
           "OTEL_SERVICE_NAME": "gateway-under-test"}
    received = setting.received
    with run_gateway(setting.config(retries=1), env=env) as gateway:
        async with client(gateway) as sdk:
            with pytest.raises(openai.APIStatusError) as failed:
                await sdk.chat.completions.create(
                    model="kb", messages=[{"role": "user", "content": "[500] why?"}])
        assert failed.value.status_code == 502
        await eventually(lambda: received.one(REQUEST))

    request = received.one(REQUEST)
    assert request is not None and request.parent_span_id == b""  # no traceparent: a root
    assert set(received.services) == {"gateway-under-test"}
    assert (request.status.code, request.status.message) == (
        Status.STATUS_CODE_ERROR, "upstream_error")
    found = attributes(request.attributes)
    assert (found["error.type"], found["http.response.status_code"], found["gateway.outcome"],
            found["gateway.attempts"]) == ("upstream_error", 502, "error", 2)
    attempts = sorted(received.named(ATTEMPT), key=lambda span: span.start_time_unix_nano)
    assert [attributes(span.attributes)["gateway.attempt"] for span in attempts] == [1, 2]
    for attempt in attempts:
        assert attempt.parent_span_id == request.span_id
        assert attempt.status.code == Status.STATUS_CODE_ERROR
        assert {k: v for k, v in attributes(attempt.attributes).items()
                if k in ("http.response.status_code", "gateway.outcome", "error.type")} == {
            "http.response.status_code": 500, "gateway.outcome": "error",
            "error.type": "upstream_error"}
    assert setting.nuclia.state.calls == 2


async def test_a_refused_key(setting: Setting) -> None:
    received = setting.received
    with run_gateway(setting.config({"otlp_endpoint": setting.collector}),
                     env=FAST_EXPORT) as gateway:
        async with client(gateway, key="sk-not-a-key") as sdk:
            with pytest.raises(openai.AuthenticationError):
                await sdk.chat.completions.create(
                    model="kb", messages=[{"role": "user", "content": QUESTION}])
        await eventually(lambda: received.one(REQUEST))
    request = received.one(REQUEST)
    assert request is not None
    assert (request.status.code, request.status.message) == (
        Status.STATUS_CODE_ERROR, "invalid_api_key")
    assert attributes(request.attributes)["http.response.status_code"] == 401
    [auth] = received.children(request).values()  # refused there: no later stage
    assert auth.name == "authenticate" and auth.status.code == Status.STATUS_CODE_ERROR
    assert "sk-not-a-key" not in repr(received.spans)


async def test_a_client_that_goes_away(setting: Setting) -> None:
    received = setting.received
    with run_gateway(setting.config({"otlp_endpoint": setting.collector}),
                     env=FAST_EXPORT) as gateway:
        async with httpx.AsyncClient(timeout=30) as http:
            async with http.stream("POST", f"{gateway.url}/v1/chat/completions",
                                   headers={"authorization": f"Bearer {KEY}"}, json={
                                       "model": "kb", "stream": True, "messages": [
                                           {"role": "user", "content": "[slow] [chunks=40] ?"}]
                                   }) as reply:
                async for _ in reply.aiter_lines():
                    break  # the first event, then away
        await eventually(lambda: received.one(REQUEST))
    request = received.one(REQUEST)
    assert request is not None
    assert "client_disconnected" in [event.name for event in request.events]
    found = attributes(request.attributes)
    assert (found["gateway.outcome"], found["http.response.status_code"]) == (
        "client_disconnected", 499)


async def test_capture_content(setting: Setting) -> None:
    received = setting.received
    config = setting.config({"otlp_endpoint": setting.collector, "capture_content": True})
    with run_gateway(config, env=FAST_EXPORT) as gateway:
        async with client(gateway) as sdk:
            await sdk.chat.completions.create(
                model="kb", messages=[{"role": "user", "content": QUESTION}])
        await eventually(lambda: received.one(REQUEST))
    request = received.one(REQUEST)
    assert request is not None
    found = attributes(request.attributes)
    assert orjson.loads(found["gen_ai.input.messages"]) == [
        {"role": "user", "parts": [{"type": "text", "content": QUESTION}]}]
    [output] = orjson.loads(found["gen_ai.output.messages"])
    assert output["parts"] == [{"type": "text", "content": answer_text(QUESTION)}]
    assert output["role"] == "assistant" and output["finish_reason"] == "stop"


async def test_off_sends_nothing(setting: Setting) -> None:
    """The standard switch wins over an endpoint; the gateway stopped (flushing whatever it
    had), the receiver has had nothing, and the request log no trace id."""
    env = {**FAST_EXPORT, "OTEL_SDK_DISABLED": "true"}
    with run_gateway(setting.config({"otlp_endpoint": setting.collector}), env=env) as gateway:
        async with client(gateway) as sdk:
            await sdk.chat.completions.create(
                model="kb", messages=[{"role": "user", "content": QUESTION}])
        await eventually(lambda: logged_requests(gateway))
        [logged] = logged_requests(gateway)
        assert setting.nuclia.state.last_headers.get("traceparent") is None
    assert logged["trace_id"] is None
    assert setting.received.posts == 0


def test_where_spans_go() -> None:
    config, traces, base = "http://collector:4318", "http://traces:4318/v1/traces", \
        "http://base:4318/"
    assert otlp_endpoint(None, {}) is None
    assert otlp_endpoint(config, {}) == "http://collector:4318/v1/traces"
    assert otlp_endpoint(config, {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": traces}) == \
        "http://collector:4318/v1/traces"
    assert otlp_endpoint(None, {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": traces,
                                "OTEL_EXPORTER_OTLP_ENDPOINT": base}) == traces
    assert otlp_endpoint(None, {"OTEL_EXPORTER_OTLP_ENDPOINT": base}) == \
        "http://base:4318/v1/traces"
    assert otlp_endpoint(config, {"OTEL_SDK_DISABLED": "true"}) is None
    assert "OTEL_EXPORTER_OTLP_ENDPOINT" not in os.environ  # the tests' gateways start off


async def test_a_failed_delivery_and_its_retry(setting: Setting) -> None:
    received = setting.received
    setting.hook.faults.fail_next(1, 503)
    with run_gateway(setting.config({"otlp_endpoint": setting.collector}),
                     env=FAST_EXPORT) as gateway:
        async with client(gateway) as sdk:
            await sdk.chat.completions.create(
                model="kb", messages=[{"role": "user", "content": QUESTION}])
        await eventually(lambda: received.one(REQUEST)
                         and len(received.named("deliver hook")) == 2)
    request = received.one(REQUEST)
    assert request is not None
    failed, delivered = sorted(received.named("deliver hook"),
                               key=lambda span: span.start_time_unix_nano)
    assert failed.status.code == Status.STATUS_CODE_ERROR
    assert attributes(failed.attributes)["error.type"] == "upstream_unavailable"
    assert delivered.status.code == Status.STATUS_CODE_UNSET
    for span in (failed, delivered):
        assert [(link.trace_id, link.span_id) for link in span.links] == [
            (request.trace_id, request.span_id)]
