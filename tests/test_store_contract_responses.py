"""One contract suite for `ResponseStore`, run against the in-process and the Redis store.

Time moves by `advance` (the memory store's clock; on Redis every key's TTL shortened by as
much); one test lets Redis itself expire an entry."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from gateway.stores.redis_base import connect
from gateway.stores.responses import (
    MemoryResponseStore,
    RedisResponseStore,
    ResponseStore,
    StoredResponse,
)
from tests.eventually import eventually
from tests.test_store_contract_cache import Advance, Clock, shorten_ttls

TTL = 60.0

@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
async def subject(request: pytest.FixtureRequest) -> AsyncIterator[tuple[ResponseStore, Advance]]:
    if request.param == "memory":
        clock = Clock()
        yield MemoryResponseStore(TTL, max_entries=3, clock=clock), clock.advance
        return
    ns = connect(request.getfixturevalue("redis_proc").url, "test")
    await ns.client.flushall()

    async def advance(seconds: float) -> None:
        await shorten_ttls(ns.client, seconds)

    try:
        yield RedisResponseStore(ns, TTL), advance
    finally:
        await ns.aclose()


def stored(rid: str = "resp_1", team: str = "alpha") -> StoredResponse:
    return StoredResponse(rid, team, {"id": rid, "object": "response", "output": []},
                          [{"role": "user", "content": "hi"},
                           {"role": "assistant", "content": "hello"}])


async def test_a_stored_response_reads_back(subject: tuple[ResponseStore, Advance]) -> None:
    store, _ = subject
    await store.put(stored())
    assert await store.get("alpha", "resp_1") == stored()
    assert await store.get("alpha", "resp_2") is None


async def test_another_team_finds_nothing(subject: tuple[ResponseStore, Advance]) -> None:
    store, _ = subject
    await store.put(stored())
    assert await store.get("beta", "resp_1") is None
    assert await store.delete("beta", "resp_1") is False
    assert await store.get("alpha", "resp_1") == stored()


async def test_delete_forgets_once(subject: tuple[ResponseStore, Advance]) -> None:
    store, _ = subject
    await store.put(stored())
    assert await store.delete("alpha", "resp_1") is True
    assert await store.get("alpha", "resp_1") is None
    assert await store.delete("alpha", "resp_1") is False


async def test_entries_expire_after_the_ttl(subject: tuple[ResponseStore, Advance]) -> None:
    store, advance = subject
    await store.put(stored())
    await advance(TTL - 1)
    assert await store.get("alpha", "resp_1") is not None
    await advance(2)
    assert await store.get("alpha", "resp_1") is None


async def test_the_memory_store_drops_the_oldest_past_its_bound() -> None:
    store = MemoryResponseStore(TTL, max_entries=2)
    for i in range(3):
        await store.put(stored(f"resp_{i}"))
    assert await store.get("alpha", "resp_0") is None
    assert await store.get("alpha", "resp_2") is not None


@pytest.mark.redis
async def test_redis_expires_an_entry_itself(redis_url: str) -> None:
    ns = connect(redis_url, "test")
    try:
        store = RedisResponseStore(ns, 0.2)
        await store.put(stored())
        assert await store.get("alpha", "resp_1") is not None

        async def gone() -> bool:
            return await store.get("alpha", "resp_1") is None

        await eventually(gone, within=5)
    finally:
        await ns.aclose()
