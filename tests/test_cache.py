"""ResponseCache: canonical keys, policy decisions, serialisation and single flight."""

from __future__ import annotations

import asyncio
import hashlib
import time
import tracemalloc
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from structlog.testing import capture_logs

from gateway.answer import Answer
from gateway.backends.base import Route
from gateway.config import GatewayConfig
from gateway.metrics import Metrics
from gateway.response_cache import (
    EXACT_KEY_BYTES,
    CacheHooks,
    ResponseCache,
    canonical_body,
    decode_answer,
    encode_answer,
    encode_completion,
    key_material,
)
from gateway.stores.cache import CacheStore, MemoryCacheStore, RedisCacheStore
from gateway.stores.redis_base import RedisNamespace, connect
from gateway.wire import ChatRequest

ROUTE = Route("docs", "inkeep", "inkeep-qa", {})


def make_config(**cache: Any) -> GatewayConfig:
    return GatewayConfig.model_validate({
        "backends": {"inkeep": {"kind": "inkeep", "base_url": "http://upstream"}},
        "models": {
            "docs": {"backend": "inkeep", "cache": {"enabled": True, "ttl": 60}},
            "chat": {"backend": "inkeep"},
            "free": {"backend": "inkeep",
                     "cache": {"enabled": True, "deterministic_only": False}},
        },
        "cache": {"lock_seconds": 2.0, **cache},
    })


def body(**extra: Any) -> dict[str, Any]:
    return {"model": "docs", "messages": [{"role": "user", "content": "How?"}], **extra}


def decide(cache: ResponseCache, raw: dict[str, Any], *, team: str = "t1",
           header: str | None = None, route: Route = ROUTE) -> Any:
    ChatRequest.model_validate(raw)  # as the pipeline does before it asks the cache
    return cache.decide(route, raw, team, header)


def answer(text: str = "Hello there, world") -> Answer:
    return Answer(content=[text[:5], text[5:]], finish_reason="stop",
                  usage={"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7})


@pytest.fixture
def cache() -> ResponseCache:
    config = make_config()
    return ResponseCache(config, MemoryCacheStore(10_000, 5_000))


# -- keys -------------------------------------------------------------------------------------

def test_key_ignores_field_order_stream_user_and_metadata(cache: ResponseCache) -> None:
    base = decide(cache, body(temperature=0, max_tokens=50)).key
    reordered = {"max_tokens": 50, "temperature": 0, **body()}
    assert decide(cache, reordered).key == base
    noise = body(temperature=0, max_tokens=50, stream=True, user="u-42",
                 stream_options={"include_usage": True}, metadata={"req": "1"})
    assert decide(cache, noise).key == base


@pytest.mark.parametrize("change", [
    {"temperature": 0.0, "max_tokens": 51},
    {"seed": 7},
    {"tools": [{"type": "function", "function": {"name": "f"}}]},
    {"response_format": {"type": "json_object"}},
    {"nuclia": {"rag_strategies": [{"name": "hierarchy"}]}},
    {"a_parameter_openai_adds_next_year": True},
    {"messages": [{"role": "user", "content": "Why?"}]},
])
def test_key_changes_with_what_changes_the_answer(cache: ResponseCache,
                                                  change: dict[str, Any]) -> None:
    assert decide(cache, body(**change)).key != decide(cache, body()).key


def test_key_changes_with_temperature_route_and_options() -> None:
    cache = ResponseCache(make_config(), MemoryCacheStore(10_000, 5_000))
    free = Route("free", "inkeep", "inkeep-qa", {})
    assert decide(cache, body(temperature=0.2), route=free).key != \
        decide(cache, body(temperature=0.7), route=free).key
    other_upstream = Route("docs", "inkeep", "inkeep-rag", {})
    assert decide(cache, body(), route=other_upstream).key != decide(cache, body()).key
    with_options = Route("docs", "inkeep", "inkeep-qa", {"generative_model": "x"})
    assert decide(cache, body(), route=with_options).key != decide(cache, body()).key


def test_scope_team_by_default_global_when_configured() -> None:
    team = ResponseCache(make_config(), MemoryCacheStore(10_000, 5_000))
    assert decide(team, body(), team="a").key != decide(team, body(), team="b").key
    shared = ResponseCache(make_config(scope="global"), MemoryCacheStore(10_000, 5_000))
    assert decide(shared, body(), team="a").key == decide(shared, body(), team="b").key


def test_in_process_keys_are_the_canonical_body_and_long_ones_a_digest() -> None:
    cache = ResponseCache(make_config(), MemoryCacheStore(10_000, 5_000))
    short = decide(cache, body(max_tokens=5)).key
    assert isinstance(short, bytes)
    tag, canonical = orjson.loads(short)  # [tag, the body], sorted keys
    assert isinstance(tag, int) and orjson.dumps(canonical) == canonical_body(body(max_tokens=5))
    # the tag stands for the route and scope: another team has another
    other_team = decide(cache, body(max_tokens=5), team="t2").key
    assert isinstance(other_team, bytes) and other_team != short
    assert orjson.loads(other_team)[1] == canonical
    long = body(messages=[{"role": "user", "content": "x" * EXACT_KEY_BYTES}])
    digest = decide(cache, long).key
    assert isinstance(digest, str) and len(digest) == 64
    assert decide(cache, {**long, "user": "u-1"}).key == digest


def test_in_process_keys_hold_no_more_memory_than_their_length() -> None:
    # kept in the store: a key that kept orjson's ~4 KB working buffer made the byte bound
    # undercount the memory held ~10x
    cache = ResponseCache(make_config(), MemoryCacheStore(10_000, 5_000))
    bodies = [body(max_tokens=i) for i in range(500)]
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        keys = [cache.decide(ROUTE, raw, "t1", None).key for raw in bodies]
        held = (tracemalloc.get_traced_memory()[0] - before) / len(keys)
    finally:
        tracemalloc.stop()
    assert all(isinstance(key, bytes) for key in keys)
    assert held < 2 * max(len(key or b"") for key in keys)


def test_caches_sharing_an_in_process_store_never_share_a_tag() -> None:
    store = MemoryCacheStore(10_000, 5_000)
    one, two = ResponseCache(make_config(), store), ResponseCache(make_config(), store)
    other = Route("docs", "inkeep", "inkeep-rag", {})
    assert decide(one, body()).key != decide(two, body(), route=other).key


async def test_shared_keys_are_digests_every_replica_computes_alike() -> None:
    namespaces = [connect("redis://127.0.0.1:1/0", "test") for _ in range(2)]
    try:
        one, two = (ResponseCache(make_config(), RedisCacheStore(ns, 5_000))
                    for ns in namespaces)
        decide(two, body(), route=Route("free", "inkeep", "x"))  # tags would differ now
        key = decide(one, body()).key
        # BLAKE2b-256 of the route's material, then the canonical body
        digest = hashlib.blake2b(key_material(ROUTE, "team:t1") + canonical_body(body()),
                                 digest_size=32).hexdigest()
        assert key == decide(two, body()).key == digest
        assert isinstance(key, str) and len(key) == 64
    finally:
        for ns in namespaces:
            await ns.client.aclose()


# -- policy -----------------------------------------------------------------------------------

def test_policy_decisions(cache: ResponseCache) -> None:
    plain = decide(cache, body())
    assert (plain.read, plain.write, plain.ttl) == (True, True, 60)
    refresh = decide(cache, body(), header="no-cache")
    assert (refresh.read, refresh.write) == (False, True) and refresh.key == plain.key
    no_store = decide(cache, body(), header="max-age=0, No-Store")
    assert (no_store.key, no_store.read, no_store.write) == (None, False, False)
    assert decide(cache, body(temperature=0.5)).key is None  # not deterministic
    assert decide(cache, body(temperature=0)).read
    assert decide(cache, body(temperature=0.0, n=1, top_p=1)).read
    assert decide(cache, body(temperature=None)).read
    assert decide(cache, body(n=2)).key is None
    # spellings lax validation accepts but that are not plain numbers bypass (never a wrong hit)
    assert decide(cache, body(temperature="0.5")).key is None
    assert decide(cache, body(n="2")).key is None
    disabled = decide(cache, body(model="chat"), route=Route("chat", "inkeep", "x"))
    assert disabled.key is None  # no per-model policy and the default is off
    free = decide(cache, body(temperature=0.9), route=Route("free", "inkeep", "x"))
    assert free.read and free.write


def test_default_policy_applies_to_models_without_one() -> None:
    config = make_config(default={"enabled": True, "ttl": 5})
    cache = ResponseCache(config, MemoryCacheStore(10_000, 5_000))
    decision = decide(cache, body(model="chat"), route=Route("chat", "inkeep", "x"))
    assert decision.read and decision.ttl == 5


# -- entries ----------------------------------------------------------------------------------

def test_answers_round_trip_with_their_chunk_boundaries() -> None:
    original = Answer(content=["Hel", "lo", " world"], reasoning=["think"],
                      tool_calls={0: {"id": "c1", "type": "function",
                                      "function": {"name": "f", "arguments": "{}"}}},
                      finish_reason="tool_calls", usage={"total_tokens": 9},
                      extensions={"citations": [{"id": 1}]})
    decoded = decode_answer(encode_answer(original, 1000.0))
    assert decoded is not None
    restored, created, completion = decoded
    assert completion is None
    assert created == 1000.0
    assert restored.content == original.content
    assert (restored.reasoning, restored.tool_calls, restored.finish_reason, restored.usage,
            restored.extensions) == (original.reasoning, original.tool_calls, "tool_calls",
                                     original.usage, original.extensions)
    assert decode_answer(b"not json") is None


def test_entries_of_another_format_read_as_misses() -> None:
    old = b'{"v": 1, "created": 1.0, "content": ["hi"], "finish_reason": "stop"}'
    for data in (old, b"[1, 2]", b"not json", b'[3, 0, [], [], [], "stop", null, {}]'):
        assert decode_answer(data) is None


def test_completions_are_stored_as_sent_and_read_back_whole() -> None:
    sent = {"id": "up-1", "object": "chat.completion", "created": 7, "model": "docs",
            "system_fingerprint": "fp_1",
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": "Hi", "citations": [1]}}],
            "usage": {"total_tokens": 3}}
    data = orjson.dumps(sent)
    decoded = decode_answer(encode_completion(data, 1000.5))
    assert decoded is not None
    answer, created, completion = decoded
    assert created == 1000.5 and completion == sent
    assert (answer.content, answer.finish_reason, answer.usage, answer.extensions) == (
        ["Hi"], "stop", {"total_tokens": 3}, {"citations": [1]})


def test_broken_completion_entries_read_as_misses() -> None:
    whole = encode_completion(b'{"choices": [{"message": {"content": "x"}}]}', 1.0)
    assert decode_answer(whole) is not None
    for data in (whole[:9], whole[:5], whole[:-1], encode_completion(b'{"choices": []}', 1.0),
                 encode_completion(b'[1]', 1.0), encode_completion(b'{"choices": [2]}', 1.0)):
        assert decode_answer(data) is None


def test_a_whole_answer_replays_as_several_chunks() -> None:
    text = "A long answer made in one piece by a non-streamed request. " * 4
    decoded = decode_answer(encode_answer(Answer(content=[text], finish_reason="stop"), 1.0))
    assert decoded is not None
    assert decoded[0].content == [text]  # whole for a whole answer; split when streamed
    chunks = decoded[0].replay_chunks("id", "docs", 1, include_usage=False, pieces=None)
    pieces = [c["choices"][0]["delta"].get("content") for c in chunks]
    assert len([p for p in pieces if p]) > 3 and "".join(p or "" for p in pieces) == text


async def test_put_get_hit_with_age(cache: ResponseCache) -> None:
    decision = decide(cache, body())
    assert await cache.get(decision) is None
    assert await cache.put(decision, answer())
    hit = await cache.get(decision)
    assert hit is not None
    assert hit.answer.content == ["Hello", " there, world"]
    assert 0 <= hit.age < 1 and abs(hit.created - time.time()) < 1
    assert cache.stored_bytes > 0


async def test_put_refuses_unfinished_oversize_and_unwritable(cache: ResponseCache) -> None:
    decision = decide(cache, body())
    assert not await cache.put(decision, Answer(content=["cut"]))  # no finish_reason
    assert not await cache.put(decision, answer("x" * 6_000))  # over max_entry_bytes
    assert not await cache.put(decide(cache, body(), header="no-store"), answer())
    assert await cache.get(decision) is None


# -- single flight ----------------------------------------------------------------------------

@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis),
                        pytest.param("two-replicas", marks=pytest.mark.redis)])
async def caches(request: pytest.FixtureRequest) -> AsyncIterator[list[ResponseCache]]:
    config = make_config()
    if request.param == "memory":
        store = MemoryCacheStore(100_000, 50_000)
        yield [ResponseCache(config, store)]
        return
    url = request.getfixturevalue("redis_proc").url
    namespaces: list[RedisNamespace] = [connect(url, "test")]
    await namespaces[0].client.flushall()
    if request.param == "two-replicas":
        namespaces.append(connect(url, "test"))
    stores: list[CacheStore] = [RedisCacheStore(ns, 50_000) for ns in namespaces]
    try:
        yield [ResponseCache(config, store) for store in stores]
    finally:
        for ns in namespaces:
            await ns.client.aclose()


async def test_twenty_identical_requests_make_one_leader(caches: list[ResponseCache]) -> None:
    upstream_calls = 0

    async def request(i: int) -> str:
        nonlocal upstream_calls
        cache = caches[i % len(caches)]
        decision = decide(cache, body())
        hit = await cache.acquire(decision)
        if hit is not None:
            return "coalesced:" + hit.answer.text
        upstream_calls += 1
        try:
            await asyncio.sleep(0.15)
            await cache.put(decision, answer())
        finally:
            await cache.release(decision)
        return "leader"

    results = await asyncio.gather(*(request(i) for i in range(20)))
    assert upstream_calls == 1
    assert results.count("leader") == 1
    assert results.count("coalesced:Hello there, world") == 19


async def test_failed_leader_wakes_waiters_quickly(caches: list[ResponseCache]) -> None:
    leaders = 0

    async def request(i: int) -> str:
        nonlocal leaders
        cache = caches[i % len(caches)]
        decision = decide(cache, body())
        hit = await cache.acquire(decision)
        if hit is not None:
            return "coalesced"
        leaders += 1
        first = leaders == 1
        try:
            await asyncio.sleep(0.1)
            if not first:  # the first leader fails (no put); the next one succeeds
                await cache.put(decision, answer())
        finally:
            await cache.release(decision)
        return "leader"

    started = time.monotonic()
    results = await asyncio.gather(*(request(i) for i in range(10)))
    elapsed = time.monotonic() - started
    assert results.count("leader") == 2 and results.count("coalesced") == 8
    assert elapsed < 1.0  # far below lock_seconds (2 s)


async def test_a_waiter_takes_over_from_a_failed_leader(caches: list[ResponseCache]) -> None:
    first = decide(caches[0], body())
    assert await caches[0].acquire(first) is None and first.leader
    second = decide(caches[-1], body())
    waiter = asyncio.create_task(caches[-1].acquire(second))
    await asyncio.sleep(0.05)
    started = time.monotonic()
    await caches[0].release(first)  # the leader failed: nothing stored
    assert await waiter is None
    assert second.leader  # the waiter leads now
    assert time.monotonic() - started < 0.5
    await caches[-1].release(second)


def begin(cache: ResponseCache, raw: dict[str, Any]) -> Any:
    ChatRequest.model_validate(raw)
    return cache.begin(ROUTE, raw, "t1", None)


async def test_an_in_process_leader_frees_its_waiters_as_it_stores(cache: ResponseCache) -> None:
    leader = begin(cache, body())
    assert (leader.status, leader.hit, leader.leader) == ("miss", None, True)
    follower = begin(cache, body())
    assert follower.status == "pending" and not follower.leader  # another request leads
    waiting = asyncio.create_task(cache.lookup(follower))
    await asyncio.sleep(0.01)
    assert not waiting.done()
    assert await cache.put(leader, answer())
    assert not leader.leader  # storing ended its lead: nothing is left for `release`
    hit, coalesced = await asyncio.wait_for(waiting, 1)
    assert coalesced and hit is not None and hit.answer.text == "Hello there, world"
    assert not follower.leader
    await cache.release(leader)  # harmless, and frees nobody else's lock
    found = begin(cache, body())  # the entry, at once
    assert found.status == "hit" and found.hit.answer.text == "Hello there, world"
    assert not found.leader
    third = begin(cache, body(max_tokens=9))
    assert third.status == "miss" and third.leader
    await cache.release(leader)
    assert begin(cache, body(max_tokens=9)).status == "pending"  # still led by third


def test_begin_bypasses_and_refreshes_without_looking(cache: ResponseCache) -> None:
    assert cache.begin(ROUTE, body(), "t1", "no-store").status == "bypass"
    refresh = cache.begin(ROUTE, body(), "t1", "no-cache")  # no lookup, no lock: a write
    assert (refresh.status, refresh.write, refresh.leader) == ("miss", True, False)
    other = Route("chat", "inkeep", "inkeep-qa", {})  # no cache policy
    assert cache.begin(other, body(model="chat"), "t1", None).status == "bypass"


async def test_an_entry_that_does_not_decode_is_led_again(cache: ResponseCache) -> None:
    key = decide(cache, body()).key
    assert key is not None
    await cache.store.set(key, b"not an entry", 60)
    decision = begin(cache, body())
    assert decision.status == "pending"  # `lookup` leads in its place
    assert await cache.lookup(decision) == (None, False) and decision.leader
    await cache.release(decision)


async def test_waiters_fall_back_to_upstream_after_lock_seconds() -> None:
    config = make_config(lock_seconds=0.2)
    cache = ResponseCache(config, MemoryCacheStore(10_000, 5_000))
    stuck = decide(cache, body())
    assert await cache.acquire(stuck) is None  # a leader that never finishes nor releases
    started = time.monotonic()
    follower = decide(cache, body())
    assert await cache.acquire(follower) is None  # took over once the lock expired
    assert 0.15 < time.monotonic() - started < 1.0


# -- the cache never fails a request ----------------------------------------------------------

async def test_store_errors_become_misses_and_are_logged() -> None:
    errors: list[int] = []
    ns = connect("redis://127.0.0.1:1/0", "test")
    cache = ResponseCache(make_config(), RedisCacheStore(ns, 5_000),
                          CacheHooks(store_error=lambda: errors.append(1)))
    try:
        decision = decide(cache, body())
        with capture_logs() as logs:
            assert await cache.get(decision) is None
            assert await cache.acquire(decision) is None
            assert not await cache.put(decision, answer())
            await cache.release(decision)
        events = [entry["event"] for entry in logs]
        assert events.count("cache_store_unavailable") >= 3
        assert len(errors) == len(events)
        assert all("127.0.0.1" not in str(entry) for entry in logs)
    finally:
        await ns.client.aclose()


def test_decision_status_before_lookup(cache: ResponseCache) -> None:
    assert decide(cache, body()).status == "miss"
    assert decide(cache, body(), header="no-store").status == "bypass"


async def test_cache_figures_reach_the_metrics_when_sampled() -> None:
    metrics = Metrics()
    held: list[float | None] = [None]
    written = [0]
    metrics.sample_gauge(metrics.cache_bytes, lambda: held[0])
    metrics.sample_total(metrics.cache_stored, lambda: written[0])
    held[0], written[0] = 120, 300
    sampling = asyncio.create_task(metrics.sample_every(0.01))  # what each worker runs
    await asyncio.sleep(0.1)
    sampling.cancel()
    value = metrics.registry.get_sample_value
    assert value("gateway_cache_bytes") == 120
    assert value("gateway_cache_stored_bytes_total") == 300
    held[0], written[0] = None, 500  # None: a store that cannot tell leaves the gauge
    assert b"gateway_cache_stored_bytes_total 500.0" in metrics.render()[0]
    assert value("gateway_cache_bytes") == 120
