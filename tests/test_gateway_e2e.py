"""The gateway core end to end: the real openai SDK against real uvicorn servers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import openai
import pytest

from gateway.testing.fake_inkeep import answer_text, create_fake_inkeep_app
from gateway.testing.server import run_server
from tests.eventually import eventually
from tests.gateway_fixtures import (
    CLIENT_KEY,
    LIMITED_KEY,
    OTHER_KEY,
    UPSTREAM_KEY,
    async_client,
    gateway_config,
    serve_gateway,
    sync_client,
)

USER = [{"role": "user", "content": "How do I rotate a key?"}]


@pytest.fixture
async def upstream() -> AsyncIterator[tuple[Any, str]]:
    app = create_fake_inkeep_app(api_key=UPSTREAM_KEY)
    async with run_server(app) as url:
        yield app, url


@pytest.fixture
async def gateway(upstream: tuple[Any, str]) -> AsyncIterator[str]:
    async with serve_gateway(gateway_config(upstream[1])) as url:
        yield url


async def test_non_streaming_completion(gateway: str, upstream: tuple[Any, str]) -> None:
    app, _ = upstream
    async with async_client(gateway) as client:
        completion = await client.chat.completions.create(model="qa", messages=USER)
    assert completion.choices[0].message.content == answer_text(USER[0]["content"])
    assert completion.model == "qa"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None and completion.usage.total_tokens > 0
    # the upstream got its own model name and the gateway's credential, never the client's key
    assert app.state.last_body["model"] == "inkeep-qa"
    assert app.state.last_headers["authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert CLIENT_KEY not in str(app.state.last_headers)
    assert app.state.last_headers["x-extra-upstream"] == "configured"


async def test_streaming_chunk_by_chunk(gateway: str) -> None:
    async with async_client(gateway) as client:
        stream = await client.chat.completions.create(
            model="qa", messages=USER, stream=True, stream_options={"include_usage": True})
        chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == answer_text(USER[0]["content"])
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) == 10
    assert all(c.model == "qa" for c in chunks)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


async def test_unknown_fields_are_forwarded(gateway: str, upstream: tuple[Any, str]) -> None:
    async with async_client(gateway) as client:
        await client.chat.completions.create(
            model="qa", messages=USER, temperature=0.2,
            extra_body={"brand_new_param": {"x": 1}, "inkeep_option": True})
    body = upstream[0].state.last_body
    assert body["brand_new_param"] == {"x": 1}
    assert body["inkeep_option"] is True
    assert body["temperature"] == 0.2


async def test_agents_api_dialect_is_normalised(gateway: str) -> None:
    """No model, no usage, no [DONE] upstream: the client still gets all three."""
    async with httpx.AsyncClient(base_url=gateway) as http:
        response = await http.post(
            "/v1/chat/completions",
            headers={"authorization": f"Bearer {CLIENT_KEY}"},
            json={"model": "agent", "messages": USER, "stream": True,
                  "stream_options": {"include_usage": True}},
        )
    events = [line[6:] for line in response.text.split("\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert '"model":"agent"' in events[1]
    assert '"usage"' in events[-2] and '"estimated":true' in events[-2]
    async with async_client(gateway) as client:
        stream = await client.chat.completions.create(model="agent", messages=USER, stream=True)
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text == answer_text(USER[0]["content"])


async def test_sync_client_and_raw_headers(gateway: str) -> None:
    await asyncio.to_thread(_sync_client_calls, gateway)


def _sync_client_calls(gateway: str) -> None:
    with sync_client(gateway) as client:
        raw = client.chat.completions.with_raw_response.create(
            model="qa", messages=USER, extra_headers={"x-request-id": "my-trace-123"})
        completion = raw.parse()
        assert raw.headers["x-request-id"] == "my-trace-123"
        assert float(raw.headers["x-gateway-overhead-ms"]) >= 0
        slow = client.chat.completions.with_raw_response.create(
            model="qa", messages=[{"role": "user", "content": "[slow] wait"}])
        # the upstream took 200 ms of it: what the gateway added excludes that wait
        assert 0 <= float(slow.headers["x-gateway-overhead-ms"]) < 100
        assert "x-gateway-upstream-ms" not in slow.headers
        assert completion.choices[0].message.content
        generated = client.chat.completions.with_raw_response.create(model="qa", messages=USER)
        assert generated.headers["x-request-id"].startswith("req_")
        chunks = list(client.chat.completions.create(model="qa", messages=USER, stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


async def test_models_list_filtered_by_key(gateway: str) -> None:
    async with async_client(gateway) as client:
        ids = {m.id async for m in client.models.list()}
    assert {"qa", "rag", "agent"} <= ids
    async with async_client(gateway, key=OTHER_KEY) as client:
        ids = {m.id async for m in client.models.list()}
    assert ids == {"qa"}


async def test_operational_endpoints(gateway: str) -> None:
    async with async_client(gateway) as client:
        await client.chat.completions.create(model="qa", messages=USER)
    async with httpx.AsyncClient(base_url=gateway) as http:
        assert (await http.get("/healthz")).json() == {"status": "ok"}
        ready = await http.get("/readyz")
        assert ready.status_code == 200 and ready.json()["status"] == "ready"
        metrics = (await http.get("/metrics")).text
    assert 'gateway_requests_total{backend="inkeep",model="qa",status="200"} 1.0' in metrics
    assert "gateway_request_duration_seconds_bucket" in metrics
    assert UPSTREAM_KEY not in metrics and CLIENT_KEY not in metrics


# -- errors ------------------------------------------------------------------------------------


async def test_upstream_errors_map_to_sdk_exceptions(gateway: str) -> None:
    async with async_client(gateway) as client:
        with pytest.raises(openai.RateLimitError) as limited:
            await client.chat.completions.create(model="qa", messages=[
                {"role": "user", "content": "[429]"}])
        assert limited.value.response.headers["retry-after"] == "7"
        with pytest.raises(openai.InternalServerError) as refused:
            await client.chat.completions.create(model="qa", messages=[
                {"role": "user", "content": "[401]"}])
        assert refused.value.status_code == 502
        assert "credentials" in refused.value.message and UPSTREAM_KEY not in refused.value.message
        with pytest.raises(openai.InternalServerError) as failed:
            await client.chat.completions.create(model="qa", messages=[
                {"role": "user", "content": "[500]"}])
        assert failed.value.status_code == 502
        with pytest.raises(openai.BadRequestError) as problem:
            await client.chat.completions.create(model="agent", messages=[
                {"role": "user", "content": "[problem]"}])
        assert "messages are malformed" in problem.value.message
        with pytest.raises(openai.InternalServerError) as unreachable:
            await client.chat.completions.create(model="dead", messages=USER)
        assert unreachable.value.status_code == 502
        with pytest.raises(openai.APIStatusError) as timeout:
            await client.chat.completions.create(model="qa", messages=[
                {"role": "user", "content": "[hang]"}])
        assert timeout.value.status_code == 504


async def test_errors_after_stream_start_raise_in_sdk(gateway: str) -> None:
    async with async_client(gateway) as client:
        for marker in ("[midstream-error]", "[cut]"):
            stream = await client.chat.completions.create(
                model="qa", messages=[{"role": "user", "content": marker}], stream=True)
            with pytest.raises(openai.APIError):
                async for _ in stream:
                    pass


async def test_bad_input_gets_openai_envelopes(gateway: str) -> None:
    auth = {"authorization": f"Bearer {CLIENT_KEY}"}
    async with httpx.AsyncClient(base_url=gateway) as http:
        cases = [
            (await http.post("/v1/chat/completions", headers=auth, content=b"{nope"), 400, None),
            (await http.post("/v1/chat/completions", headers=auth, json=[1]), 400, None),
            (await http.post("/v1/chat/completions", headers=auth, json={"messages": USER}),
             400, "model"),
            (await http.post("/v1/chat/completions", headers=auth, json={"model": "qa"}),
             400, "messages"),
            (await http.post("/v1/chat/completions", headers=auth,
                             json={"model": "qa", "messages": "hi"}), 400, "messages"),
            (await http.post("/v1/chat/completions", headers=auth,
                             json={"model": "nope", "messages": USER}), 404, "model"),
            (await http.post("/v1/chat/completions", json={"model": "qa", "messages": USER}),
             401, None),
            (await http.post("/v1/chat/completions", headers=auth,
                             content=b"x" * (2 * 1024 * 1024 + 1)), 413, None),
            (await http.get("/v1/chat/completions", headers=auth), 405, None),
            (await http.get("/v1/nothing-here"), 404, None),
        ]
    for response, status, param in cases:
        assert response.status_code == status, response.text
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["param"] == param
        assert "Traceback" not in response.text
        assert response.headers["x-request-id"]


async def test_sdk_error_classes_for_client_mistakes(gateway: str) -> None:
    async with async_client(gateway, key="sk-wrong") as client:
        with pytest.raises(openai.AuthenticationError):
            await client.chat.completions.create(model="qa", messages=USER)
    async with async_client(gateway) as client:
        with pytest.raises(openai.NotFoundError) as missing:
            await client.chat.completions.create(model="gpt-nope", messages=USER)
        assert missing.value.code == "model_not_found"
    async with async_client(gateway, key=OTHER_KEY) as client:
        with pytest.raises(openai.PermissionDeniedError):
            await client.chat.completions.create(model="rag", messages=USER)


async def test_missing_credentials_is_a_clear_503(gateway: str) -> None:
    async with async_client(gateway) as client:
        with pytest.raises(openai.InternalServerError) as unavailable:
            await client.chat.completions.create(model="unconfigured", messages=USER)
    assert unavailable.value.status_code == 503
    assert "MISSING_TEST_VAR" in unavailable.value.message


async def test_client_disconnect_cancels_upstream(gateway: str, upstream: tuple[Any, str]) -> None:
    app, _ = upstream
    async with httpx.AsyncClient(base_url=gateway) as http:
        async with http.stream(
            "POST", "/v1/chat/completions", headers={"authorization": f"Bearer {CLIENT_KEY}"},
            json={"model": "qa", "stream": True,
                  "messages": [{"role": "user", "content": "[slow] [chunks=40]"}]},
        ) as response:
            async for line in response.aiter_lines():
                if "content" in line:
                    break
    await eventually(lambda: app.state.streams_cancelled, within=2)
    assert app.state.streams_cancelled == 1
    assert app.state.streams_finished == 0


async def test_first_chunk_is_not_buffered(gateway: str) -> None:
    """A slow upstream's first content reaches the client long before the stream ends."""
    loop = asyncio.get_running_loop()
    async with async_client(gateway) as client:
        started = loop.time()
        stream = await client.chat.completions.create(
            model="qa", stream=True, messages=[{"role": "user", "content": "[slow] [chunks=5]"}])
        first = None
        async for chunk in stream:
            if first is None and chunk.choices and chunk.choices[0].delta.content:
                first = loop.time() - started
        total = loop.time() - started
    assert first is not None and first < 0.5 and total > 0.9


async def test_rate_limit_headers_and_sdk_retry(gateway: str) -> None:
    async with async_client(gateway, key=LIMITED_KEY) as client:
        first = await client.chat.completions.with_raw_response.create(model="qa", messages=USER)
        assert first.headers["x-ratelimit-limit-requests"] == "2"
        assert first.headers["x-ratelimit-remaining-requests"] == "1"
        await client.chat.completions.create(model="qa", messages=USER)
        with pytest.raises(openai.RateLimitError) as limited:
            await client.chat.completions.create(model="qa", messages=USER)
    error = limited.value
    assert error.code == "rate_limit_exceeded" and "requests per minute" in error.message
    retry_ms = int(error.response.headers["retry-after-ms"])
    assert 0 < retry_ms <= 30_000 and int(error.response.headers["retry-after"]) >= 1
    # GCRA: one request is admitted again after one emission interval (30 s at 2 rpm), and the
    # SDK's own retry honours retry-after-ms; we check the header rather than waiting 30 s.
