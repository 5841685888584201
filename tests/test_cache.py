"""Cache keys, policy decisions and single flight (memory and across Redis clients)."""

from __future__ import annotations

import asyncio
import textwrap
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from gateway.answer import Answer
from gateway.backends.base import Route
from gateway.cache import ResponseCache, cache_control, decode_answer, encode_answer, split_text
from gateway.config import GatewayConfig, parse_config
from gateway.stores.cache import MemoryCacheStore, RedisCacheStore
from gateway.stores.redis_base import RedisNamespace
from gateway.wire import ChatRequest

ROUTE = Route("docs", "inkeep", "inkeep-qa")
MESSAGES = [{"role": "user", "content": "How do I rotate a key?"}]


def config(extra: str = "") -> GatewayConfig:
    return parse_config(textwrap.dedent("""
        backends:
          inkeep: {kind: inkeep, base_url: "http://127.0.0.1:1/v1", requires_key: false}
        models:
          docs: {backend: inkeep, upstream_model: inkeep-qa, cache: {enabled: true, ttl: 60}}
          plain: {backend: inkeep}
        cache: {lock_seconds: 2}
    """) + textwrap.dedent(extra), env={})


def decide(cache: ResponseCache, body: dict[str, Any], team: str = "a",
           header: str | None = None, route: Route = ROUTE) -> Any:
    return cache.decide(route, ChatRequest.model_validate(body), body, team, header)


def answer(text: str = "The answer.") -> Answer:
    result = Answer(content=[text[:4], text[4:]], finish_reason="stop",
                    usage={"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7})
    return result


def test_key_ignores_what_does_not_change_the_answer() -> None:
    cache = ResponseCache(config(), MemoryCacheStore(1 << 20, 1 << 16))
    base = {"model": "docs", "messages": MESSAGES}
    key = decide(cache, base).key
    assert key is not None
    assert decide(cache, {**base, "stream": True, "user": "u",
                          "stream_options": {"include_usage": True}}).key == key
    assert decide(cache, {"messages": MESSAGES, "model": "docs"}).key == key  # order
    assert decide(cache, {**base, "max_tokens": 10}).key != key
    assert decide(cache, {**base, "tools": [{"type": "function"}]}).key != key
    assert decide(cache, {**base, "nuclia": {"top_k": 3}}).key != key
    assert decide(cache, {**base, "a_new_openai_param": 1}).key != key
    assert decide(cache, base, team="b").key != key


def test_global_scope_shares_between_teams() -> None:
    cache = ResponseCache(config("cache: {scope: global}"), MemoryCacheStore(1 << 20, 1 << 16))
    body = {"model": "docs", "messages": MESSAGES}
    assert decide(cache, body, team="a").key == decide(cache, body, team="b").key


def test_policy_decisions() -> None:
    cache = ResponseCache(config(), MemoryCacheStore(1 << 20, 1 << 16))
    body = {"model": "docs", "messages": MESSAGES}
    hit = decide(cache, body)
    assert (hit.read, hit.write) == (True, True)
    assert decide(cache, {**body, "temperature": 0}).key is not None
    assert decide(cache, {**body, "temperature": 0.7}).key is None  # not deterministic
    assert decide(cache, {**body, "n": 2}).key is None
    refresh = decide(cache, body, header="no-cache")
    assert (refresh.read, refresh.write) == (False, True) and refresh.key == hit.key
    assert decide(cache, body, header="no-store").key is None
    plain = Route("plain", "inkeep", "plain")
    assert decide(cache, {"model": "plain", "messages": MESSAGES}, route=plain).key is None
    assert cache_control("max-age=0, No-Store") == (False, False)


def test_answer_round_trip_and_replay_pieces() -> None:
    original = answer()
    original.extensions["nuclia"] = {"status": "success"}
    decoded = decode_answer(encode_answer(original, 123.0))
    assert decoded is not None
    restored, created = decoded
    assert created == 123.0 and restored.content == original.content
    assert restored.usage == original.usage and restored.extensions == original.extensions
    long = " ".join(["word"] * 100)
    whole = decode_answer(encode_answer(Answer(content=[long], finish_reason="stop"), 1.0))
    assert whole is not None and len(whole[0].content) > 5
    assert "".join(whole[0].content) == long
    assert "".join(split_text(long, 10)) == long


async def test_put_refuses_unfinished_answers() -> None:
    cache = ResponseCache(config(), MemoryCacheStore(1 << 20, 1 << 16))
    decision = decide(cache, {"model": "docs", "messages": MESSAGES})
    assert not await cache.put(decision, Answer(content=["cut"]))
    assert await cache.get(decision) is None
    assert await cache.put(decision, answer())
    hit = await cache.get(decision)
    assert hit is not None and hit.answer.text == "The answer." and hit.age < 5


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
async def caches(request: pytest.FixtureRequest) -> AsyncIterator[list[ResponseCache]]:
    """Two caches on one store: two replicas when it is Redis (separate clients)."""
    cfg = config()
    if request.param == "memory":
        store = MemoryCacheStore(1 << 20, 1 << 16)
        yield [ResponseCache(cfg, store), ResponseCache(cfg, store)]
        return
    url = request.getfixturevalue("redis_proc").url  # async fixtures cannot be requested here
    clients = [aioredis.Redis.from_url(url) for _ in range(2)]
    await clients[0].flushall()
    yield [ResponseCache(cfg, RedisCacheStore(RedisNamespace(c, "t"), 1 << 16))
           for c in clients]
    for client in clients:
        await client.aclose()


async def test_single_flight_one_leader_nineteen_coalesced(caches: list[ResponseCache]) -> None:
    body = {"model": "docs", "messages": MESSAGES}
    upstream_calls = 0

    async def request(cache: ResponseCache) -> str:
        nonlocal upstream_calls
        decision = decide(cache, body)
        hit = await cache.acquire(decision)
        if hit is not None:
            return hit.answer.text
        upstream_calls += 1
        await asyncio.sleep(0.1)  # the upstream takes a while
        await cache.put(decision, answer())
        await cache.release(decision)
        return "The answer."

    results = await asyncio.gather(*(request(caches[i % 2]) for i in range(20)))
    assert results == ["The answer."] * 20
    assert upstream_calls == 1


async def test_failed_leader_hands_over_quickly(caches: list[ResponseCache]) -> None:
    body = {"model": "docs", "messages": MESSAGES}
    first = decide(caches[0], body)
    assert await caches[0].acquire(first) is None and first.leader
    second = decide(caches[1], body)
    waiter = asyncio.create_task(caches[1].acquire(second))
    await asyncio.sleep(0.05)
    loop = asyncio.get_running_loop()
    started = loop.time()
    await caches[0].release(first)  # the leader failed: nothing stored
    assert await waiter is None
    assert second.leader  # the waiter leads now
    assert loop.time() - started < 0.5
    await caches[1].release(second)
