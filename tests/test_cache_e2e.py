"""The response cache through the real openai SDK: hit/miss/bypass, stream replay, coalescing."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import openai
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.stores.cache import ENTRY_OVERHEAD
from gateway.testing.fake_inkeep import answer_text, create_fake_inkeep_app
from gateway.testing.server import run_server
from tests.gateway_fixtures import UPSTREAM_KEY, async_client, gateway_config, serve_gateway

CACHED = "cache: {default: {enabled: true, ttl: 60}, lock_seconds: 10}\n"


def ask(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
async def setup(request: pytest.FixtureRequest) -> AsyncIterator[tuple[str, Any]]:
    store = "memory" if request.param == "memory" else request.getfixturevalue("redis_proc").url
    if store != "memory":
        import redis.asyncio as aioredis

        client = aioredis.Redis.from_url(store)
        await client.flushall()
        await client.aclose()
    upstream = create_fake_inkeep_app(api_key=UPSTREAM_KEY)
    async with run_server(upstream) as url:
        async with serve_gateway(gateway_config(url, extra=CACHED, store=store)) as gateway:
            yield gateway, upstream


async def test_miss_then_hit_and_bypass(setup: tuple[str, Any],
                                        request: pytest.FixtureRequest) -> None:
    gateway, upstream = setup
    async with async_client(gateway) as client:
        first = await client.chat.completions.with_raw_response.create(
            model="qa", messages=ask("cache me"))
        second = await client.chat.completions.with_raw_response.create(
            model="qa", messages=ask("cache me"))
        hot = await client.chat.completions.with_raw_response.create(
            model="qa", messages=ask("cache me"), temperature=0.9)
        refresh = await client.chat.completions.with_raw_response.create(
            model="qa", messages=ask("cache me"), extra_headers={"cache-control": "no-cache"})
        skip = await client.chat.completions.with_raw_response.create(
            model="qa", messages=ask("cache me"), extra_headers={"cache-control": "no-store"})
    assert first.headers["x-gateway-cache"] == "miss"
    assert second.headers["x-gateway-cache"] == "hit" and int(second.headers["age"]) >= 0
    assert hot.headers["x-gateway-cache"] == "bypass"
    assert refresh.headers["x-gateway-cache"] == "miss"
    assert skip.headers["x-gateway-cache"] == "bypass"
    assert second.parse().choices[0].message.content == answer_text("cache me")
    assert second.parse().model == "qa"
    assert upstream.state.calls == 4  # first, hot, refresh, skip
    async with httpx.AsyncClient() as http:
        metrics = (await http.get(f"{gateway}/metrics")).text
    assert 'gateway_cache_events_total{model="qa",result="hit"} 1.0' in metrics
    # sampled when rendered: two answers written (first, then refresh over the same key)
    written = sample(metrics, "gateway_cache_stored_bytes_total")
    assert written > 100
    if request.node.callspec.params["setup"] == "memory":
        # one entry held: the refresh replaced the first under the same key (a 64-character
        # digest); the answers' `created` lengths make up the tolerance
        held = sample(metrics, "gateway_cache_bytes") - ENTRY_OVERHEAD - 64
        assert abs(held - written / 2) < 10


def sample(metrics: str, name: str) -> float:
    line = next(line for line in metrics.splitlines() if line.startswith(name + " "))
    return float(line.split()[1])


async def test_stream_replay_equals_the_original(setup: tuple[str, Any]) -> None:
    gateway, upstream = setup
    async with async_client(gateway) as client:
        async def chunks() -> list[Any]:
            stream = await client.chat.completions.create(
                model="qa", messages=ask("stream me"), stream=True,
                stream_options={"include_usage": True})
            return [c async for c in stream]

        original, replay = await chunks(), await chunks()
        whole = await client.chat.completions.create(model="qa", messages=ask("stream me"))
    deltas = [[c.choices[0].delta.content for c in run if c.choices and
               c.choices[0].delta.content] for run in (original, replay)]
    assert deltas[0] == deltas[1] and len(deltas[1]) == 10
    assert replay[-1].usage is not None
    assert [c.choices[0].finish_reason for c in replay if c.choices][-1] == "stop"
    assert whole.choices[0].message.content == answer_text("stream me")  # a stream made it
    assert upstream.state.calls == 1


async def test_whole_entry_replays_as_a_real_stream(setup: tuple[str, Any]) -> None:
    gateway, upstream = setup
    question = "a whole answer, " + "long " * 30
    async with async_client(gateway) as client:
        await client.chat.completions.create(model="qa", messages=ask(question))
        stream = await client.chat.completions.create(
            model="qa", messages=ask(question), stream=True)
        pieces = [c.choices[0].delta.content async for c in stream
                  if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 2 and "".join(pieces) == answer_text(question)
    assert upstream.state.calls == 1


@pytest.mark.parametrize("stream", [False, True])
async def test_twenty_identical_requests_make_one_upstream_call(
    setup: tuple[str, Any], stream: bool
) -> None:
    gateway, upstream = setup
    question = f"[slow] [chunks=3] coalesce {stream}"
    async with async_client(gateway) as client:
        async def one() -> str:
            if not stream:
                done = await client.chat.completions.create(model="qa", messages=ask(question))
                return done.choices[0].message.content or ""
            chunks = await client.chat.completions.create(
                model="qa", messages=ask(question), stream=True)
            return "".join([c.choices[0].delta.content or "" async for c in chunks
                            if c.choices])

        answers = await asyncio.gather(*(one() for _ in range(20)))
    assert answers == [answer_text(question)] * 20
    assert upstream.state.calls == 1


async def test_errors_are_never_cached(setup: tuple[str, Any]) -> None:
    gateway, upstream = setup
    async with async_client(gateway) as client:
        for _ in range(2):
            with pytest.raises(openai.InternalServerError):
                await client.chat.completions.create(model="qa", messages=ask("[500]"))
        for _ in range(2):
            stream = await client.chat.completions.create(
                model="qa", messages=ask("[midstream-error]"), stream=True)
            with pytest.raises(openai.APIError):
                async for _ in stream:
                    pass
    assert upstream.state.calls == 4


async def test_a_whole_hit_is_the_completion_first_sent_under_its_own_id() -> None:
    """An upstream's own fields (here `system_fingerprint`, `service_tier` and a choice's
    `logprobs`) come back on a hit, which has an id and time of its own."""
    calls = 0

    async def completions(request: Request) -> Response:
        nonlocal calls
        calls += 1
        return JSONResponse({
            "id": f"up-{calls}", "object": "chat.completion", "created": 1, "model": "m",
            "system_fingerprint": "fp_42", "service_tier": "default",
            "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                         "message": {"role": "assistant", "content": "Forty-two."}}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}})

    upstream = Starlette(routes=[Route("/v1/chat/completions", completions, methods=["POST"])])
    async with run_server(upstream) as url, \
            serve_gateway(gateway_config(url, extra=CACHED)) as gateway:
        async with async_client(gateway) as client:
            first = await client.chat.completions.with_raw_response.create(
                model="qa", messages=ask("the answer"))
            second = await client.chat.completions.with_raw_response.create(
                model="qa", messages=ask("the answer"))
            stream = await client.chat.completions.create(
                model="qa", messages=ask("the answer"), stream=True)
            streamed = "".join([c.choices[0].delta.content or "" async for c in stream
                                if c.choices])
    assert [first.headers["x-gateway-cache"], second.headers["x-gateway-cache"]] == [
        "miss", "hit"]
    sent, hit = first.parse(), second.parse()
    assert sent.id == "up-1" and hit.id != sent.id and hit.created > 1
    assert hit.model_dump(exclude={"id", "created"}) == sent.model_dump(
        exclude={"id", "created"})
    assert hit.system_fingerprint == "fp_42" and hit.service_tier == "default"
    assert streamed == "Forty-two." and calls == 1
