"""ResponseCache: keys, policy decisions, entries, and claims with single flight."""

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
    CacheDecision,
    CacheHooks,
    Claim,
    ResponseCache,
    canonical_form,
    decode_answer,
    encode_answer,
)
from gateway.stores.cache import CacheStats, CacheStore, Failed, MemoryCacheStore, RedisCacheStore
from gateway.stores.redis_base import RedisNamespace, connect
from gateway.wire import ChatRequest
from tests.eventually import eventually

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
           header: str | None = None, route: Route = ROUTE) -> CacheDecision:
    ChatRequest.model_validate(raw)  # as the pipeline does before it asks the cache
    return cache.decide(route, raw, team, header)


async def claim(cache: ResponseCache, raw: dict[str, Any] | None = None,
                header: str | None = None) -> Claim:
    return await cache.claim(decide(cache, body() if raw is None else raw, header=header))


def answer(text: str = "Hello there, world") -> Answer:
    return Answer(content=[text[:5], text[5:]], finish_reason="stop",
                  usage={"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7})


@pytest.fixture
def cache() -> ResponseCache:
    return ResponseCache(make_config(), MemoryCacheStore(10_000, 5_000))


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


def test_key_changes_with_temperature_route_and_options(cache: ResponseCache) -> None:
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


async def test_keys_are_digests_every_replica_and_store_computes_alike() -> None:
    ns = connect("redis://127.0.0.1:1/0", "test")
    one = ResponseCache(make_config(), MemoryCacheStore(10_000, 5_000))
    two = ResponseCache(make_config(), RedisCacheStore(ns, 5_000))
    try:
        decide(two, body(), route=Route("free", "inkeep", "x"))  # nothing a process keeps counts
        key = decide(one, body(user="u-1")).key
        # BLAKE2b-256 of the canonical form: route, scope, the relevant body with sorted keys
        digest = hashlib.blake2b(canonical_form(ROUTE, "team:t1", body()),
                                 digest_size=32).hexdigest()
        assert key == decide(two, body()).key == digest
        form = orjson.loads(canonical_form(ROUTE, "team:t1", body(user="u-1")))
        assert form["body"] == body() and form["scope"] == "team:t1"
    finally:
        await ns.aclose()


# -- policy -----------------------------------------------------------------------------------

def test_policy_decisions(cache: ResponseCache) -> None:
    plain = decide(cache, body())
    assert plain.key is not None and (plain.read, plain.ttl) == (True, 60)
    refresh = decide(cache, body(), header="no-cache")
    assert not refresh.read and refresh.key == plain.key  # not read, but stored
    no_store = decide(cache, body(), header="max-age=0, No-Store")
    assert (no_store.key, no_store.read) == (None, False)
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
    assert decide(cache, body(temperature=0.9), route=Route("free", "inkeep", "x")).read


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
                      extensions={"citations": [{"id": 1}]},
                      completion_fields={"system_fingerprint": "fp_1"})
    decoded = decode_answer(encode_answer(original, 1000.0))
    assert decoded is not None
    restored, created = decoded
    assert created == 1000.0
    assert restored == original


def test_a_whole_hit_rebuilds_the_completion_first_sent() -> None:
    sent = {"id": "up-1", "object": "chat.completion", "created": 7, "model": "docs",
            "system_fingerprint": "fp_1", "service_tier": "default",
            "choices": [{"index": 0, "finish_reason": "stop", "message": {
                "role": "assistant", "content": "Hi", "reasoning_content": "hm",
                "citations": [1], "nuclia": {"learning_id": "l1"}}}],
            "usage": {"total_tokens": 3}}
    answer = Answer()
    answer.add_completion(orjson.loads(orjson.dumps(sent)))
    decoded = decode_answer(encode_answer(answer, 1000.5))
    assert decoded is not None
    rebuilt = decoded[0].to_completion("new-id", "docs", 9)
    assert rebuilt == {**sent, "id": "new-id", "created": 9}


def test_entries_of_another_format_read_as_misses() -> None:
    old_json = b'{"v": 1, "created": 1.0, "content": ["hi"], "finish_reason": "stop"}'
    old_array = b'[2, 1.0, ["hi"], [], [], "stop", null, {}]'
    old_completion = b"\x03" + bytes(8) + b'{"choices": [{"message": {"content": "x"}}]}'
    current = encode_answer(answer(), 1.0)
    for data in (old_json, old_array, old_completion, b"[1, 2]", b"not json", b"", b"7",
                 current[:-1], current.replace(b'"stop"', b"{}", 1).replace(b"[", b"{", 1),
                 b'[3, "x", 1, 2, 3, "stop", null, {}, {}]'):
        assert decode_answer(data) is None, data
    assert decode_answer(current) is not None


def test_entries_hold_no_more_memory_than_their_length() -> None:
    # kept as they are in the in-process store: an entry that kept orjson's ~4 KB working
    # buffer would make the byte bound undercount the memory held ~10x
    answers = [answer(f"answer number {i}") for i in range(500)]
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        entries = [encode_answer(a, 1.0) for a in answers]
        held = (tracemalloc.get_traced_memory()[0] - before) / len(entries)
    finally:
        tracemalloc.stop()
    assert held < 2 * max(len(entry) for entry in entries)


def test_a_whole_answer_replays_as_several_chunks() -> None:
    text = "A long answer made in one piece by a non-streamed request. " * 4
    decoded = decode_answer(encode_answer(Answer(content=[text], finish_reason="stop"), 1.0))
    assert decoded is not None
    assert decoded[0].content == [text]  # whole for a whole answer; split when streamed
    chunks = decoded[0].replay_chunks("id", "docs", 1, include_usage=False, pieces=None)
    pieces = [c["choices"][0]["delta"].get("content") for c in chunks]
    assert len([p for p in pieces if p]) > 3 and "".join(p or "" for p in pieces) == text


# -- claims -----------------------------------------------------------------------------------

async def test_store_then_hit_with_age(cache: ResponseCache) -> None:
    first = await claim(cache)
    assert (first.status, first.hit, first.leads) == ("miss", None, True)
    await cache.store(first, answer())
    assert not first.leads  # storing ended the lead
    hit = await claim(cache)
    assert hit.status == "hit" and hit.hit is not None and not hit.leads
    assert hit.hit.answer.content == ["Hello", " there, world"]
    assert 0 <= hit.hit.age < 1
    assert cache.stored_bytes > 0


async def test_bypass_claims_nothing_and_stores_nothing(cache: ResponseCache) -> None:
    for found in (await claim(cache, header="no-store"), await claim(cache, body(n=2))):
        assert (found.status, found.hit, found.leads) == ("bypass", None, False)
        await cache.store(found, answer())
    assert cache.stored_bytes == 0


async def test_store_refuses_unfinished_and_oversize_answers(cache: ResponseCache) -> None:
    lead = await claim(cache)
    await cache.store(lead, Answer(content=["cut"]))  # no finish_reason: cut off
    assert not lead.leads  # the lead ends all the same
    again = await claim(cache)
    assert again.status == "miss" and again.leads
    await cache.store(again, answer("x" * 6_000))  # over max_entry_bytes
    assert (await claim(cache)).status == "miss"


async def test_no_cache_refreshes_without_looking_or_leading(cache: ResponseCache) -> None:
    lead = await claim(cache)
    await cache.store(lead, answer("old"))
    refresh = await claim(cache, header="no-cache")
    assert (refresh.status, refresh.hit, refresh.leads) == ("miss", None, False)
    await cache.store(refresh, answer("new answer"))
    found = await claim(cache)
    assert found.hit is not None and found.hit.answer.text == "new answer"


async def test_an_entry_that_does_not_decode_is_a_miss_that_leads() -> None:
    store = MemoryCacheStore(10_000, 5_000)
    cache = ResponseCache(make_config(), store)
    key = decide(cache, body()).key
    assert key is not None
    await store.set(key, b"an entry of an older gateway", 60)
    found = await claim(cache)
    assert (found.status, found.leads) == ("miss", True)
    cache.release(found)


class Watched:
    """A store that tells when requests wait on it (so tests need not sleep)."""

    def __init__(self, store: CacheStore, waits: Waits) -> None:
        self.store = store
        self.waits = waits

    async def get(self, key: str) -> bytes | None:
        return await self.store.get(key)

    async def set(self, key: str, value: bytes, ttl: float) -> bool:
        return await self.store.set(key, value, ttl)

    async def lock(self, key: str, ttl: float) -> bool:
        return await self.store.lock(key, ttl)

    def unlock(self, key: str, failed: Failed | None = None) -> None:
        self.store.unlock(key, failed)

    async def wait(self, key: str, within: float) -> bytes | None:
        self.waits.change(+1)
        try:
            return await self.store.wait(key, within)
        finally:
            self.waits.change(-1)

    def stats(self) -> CacheStats:
        return self.store.stats()


class Waits:
    """How many requests wait on the stores of a test's replicas right now."""

    def __init__(self) -> None:
        self.count = 0
        self._goals: list[tuple[int, asyncio.Event]] = []

    def change(self, by: int) -> None:
        self.count += by
        for goal, event in self._goals:
            if self.count >= goal:
                event.set()

    async def reach(self, count: int) -> None:
        if self.count < count:
            event = asyncio.Event()
            self._goals.append((count, event))
            await asyncio.wait_for(event.wait(), 5)


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis),
                        pytest.param("two-replicas", marks=pytest.mark.redis)])
async def replicas(request: pytest.FixtureRequest
                   ) -> AsyncIterator[tuple[list[ResponseCache], Waits]]:
    """Caches that share entries and locks, and the count of their waits."""
    config = make_config()
    waits = Waits()
    if request.param == "memory":
        yield [ResponseCache(config, Watched(MemoryCacheStore(100_000, 50_000), waits))], waits
        return
    url = request.getfixturevalue("redis_proc").url
    namespaces: list[RedisNamespace] = [connect(url, "test")]
    await namespaces[0].client.flushall()
    if request.param == "two-replicas":
        namespaces.append(connect(url, "test"))
    try:
        yield [ResponseCache(config, Watched(RedisCacheStore(ns, 50_000), waits))
               for ns in namespaces], waits
    finally:
        for ns in namespaces:
            await ns.aclose()


async def test_twenty_identical_requests_make_one_leader(
        replicas: tuple[list[ResponseCache], Waits]) -> None:
    caches, waits = replicas
    upstream_calls = 0

    async def request(i: int) -> str:
        nonlocal upstream_calls
        cache = caches[i % len(caches)]
        found = await claim(cache)
        if found.hit is not None:
            assert found.coalesced and found.status == "hit"
            return "coalesced:" + found.hit.answer.text
        upstream_calls += 1
        await waits.reach(19)  # the upstream answers once everybody else waits
        await cache.store(found, answer())
        return "leader"

    results = await asyncio.gather(*(request(i) for i in range(20)))
    assert upstream_calls == 1
    assert results.count("leader") == 1
    assert results.count("coalesced:Hello there, world") == 19


async def test_a_failed_leader_hands_over_to_one_waiter_at_once(
        replicas: tuple[list[ResponseCache], Waits]) -> None:
    caches, waits = replicas
    leaders = 0

    async def request(i: int) -> str:
        nonlocal leaders
        cache = caches[i % len(caches)]
        found = await claim(cache)
        if found.hit is not None:
            return "coalesced"
        leaders += 1
        if leaders == 1:  # the first leader fails once all nine wait: no store
            await waits.reach(9)
            cache.release(found)
        else:  # the next one succeeds once the other eight wait (again)
            await waits.reach(8)
            await cache.store(found, answer())
        return "leader"

    started = time.monotonic()
    results = await asyncio.gather(*(request(i) for i in range(10)))
    assert results.count("leader") == 2 and results.count("coalesced") == 8
    assert time.monotonic() - started < 1.0  # far below lock_seconds (2 s)


async def test_storing_ends_the_lead_and_releasing_twice_frees_nobody_else(
        replicas: tuple[list[ResponseCache], Waits]) -> None:
    caches, waits = replicas
    one, other = caches[0], caches[-1]
    leader = await claim(one)
    assert leader.leads
    follower = asyncio.create_task(claim(other))
    await waits.reach(1)
    await one.store(leader, answer())
    found = await asyncio.wait_for(follower, 5)
    assert (found.status, found.coalesced, found.leads) == ("hit", True, False)
    one.release(leader)  # harmless: storing ended the lead
    third = await claim(one, body(max_tokens=9))
    assert third.leads
    one.release(leader)
    fourth = asyncio.create_task(claim(other, body(max_tokens=9)))
    await waits.reach(1)  # still led by the third
    assert not fourth.done()
    one.release(third)
    assert (await asyncio.wait_for(fourth, 5)).leads


async def test_a_waiter_served_an_entry_that_does_not_decode_goes_upstream() -> None:
    store, waits = MemoryCacheStore(10_000, 5_000), Waits()
    cache = ResponseCache(make_config(), Watched(store, waits))
    key = decide(cache, body()).key
    assert key is not None and await store.lock(key, 10)
    follower = asyncio.create_task(claim(cache))
    await waits.reach(1)
    await store.set(key, b"not an entry", 60)
    store.unlock(key)
    found = await asyncio.wait_for(follower, 1)
    assert (found.status, found.hit, found.leads, found.coalesced) == (
        "miss", None, False, False)


async def test_waiters_go_upstream_after_lock_seconds() -> None:
    cache = ResponseCache(make_config(lock_seconds=0.1), MemoryCacheStore(10_000, 5_000))
    stuck = await claim(cache)  # a leader that never finishes nor releases
    assert stuck.leads
    started = time.monotonic()
    follower = await claim(cache)
    assert follower.status == "miss" and follower.leads  # took over once the lock expired
    assert 0.05 < time.monotonic() - started < 1.0


# -- the cache never fails a request ----------------------------------------------------------

async def test_store_errors_become_misses_and_are_logged() -> None:
    errors: list[int] = []
    released = asyncio.Event()

    def store_error() -> None:
        errors.append(1)
        released.set()

    ns = connect("redis://127.0.0.1:1/0", "test")
    cache = ResponseCache(make_config(), RedisCacheStore(ns, 5_000), CacheHooks(store_error))
    try:
        with capture_logs() as logs:
            found = await claim(cache)
            assert (found.status, found.hit, found.leads) == ("miss", None, False)
            await cache.store(found, answer())
            assert len(errors) == 2
            released.clear()
            cache.release(Claim(found.decision, "miss", leads=True))  # a lead Redis lost
            await asyncio.wait_for(released.wait(), 5)
        operations = [entry["operation"] for entry in logs
                      if entry["event"] == "cache_store_unavailable"]
        assert operations == ["claim", "store", "release"] and len(errors) == 3
        assert all("127.0.0.1" not in str(entry) for entry in logs)
    finally:
        await ns.aclose()


async def test_cache_figures_reach_the_metrics_when_sampled() -> None:
    metrics = Metrics()
    held: list[float | None] = [None]
    written = [0]
    metrics.sample_gauge(metrics.cache_bytes, lambda: held[0])
    metrics.sample_total(metrics.cache_stored, lambda: written[0])
    held[0], written[0] = 120, 300
    sampling = asyncio.create_task(metrics.sample_every(0.01))  # what each worker runs
    value = metrics.registry.get_sample_value
    try:
        await eventually(lambda: value("gateway_cache_stored_bytes_total") == 300, within=2)
    finally:
        sampling.cancel()
    assert value("gateway_cache_bytes") == 120
    held[0], written[0] = None, 500  # None: a store that cannot tell leaves the gauge
    assert b"gateway_cache_stored_bytes_total 500.0" in metrics.render()[0]
    assert value("gateway_cache_bytes") == 120
