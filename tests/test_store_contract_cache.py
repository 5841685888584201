"""One contract suite for `CacheStore`, run against the in-process and the Redis store.

Time moves by `advance`: the memory store's injected clock, and on Redis every key's TTL
shortened by as much, so that no test sleeps for an expiry."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import redis.asyncio as aioredis

from gateway.errors import ServiceUnavailable
from gateway.stores.cache import (
    ENTRY_OVERHEAD,
    CacheStore,
    MemoryCacheStore,
    RedisCacheStore,
)
from gateway.stores.redis_base import connect

MAX_ENTRY = 1000
Advance = Callable[[float], Awaitable[None]]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    async def advance(self, seconds: float) -> None:
        self.now += seconds


async def shorten_ttls(client: aioredis.Redis, seconds: float) -> None:
    """As if `seconds` passed on the Redis server: every key expiring sooner is gone."""
    elapsed = int(seconds * 1000)
    async for key in client.scan_iter():
        left = await client.pttl(key)
        if 0 <= left <= elapsed:
            await client.delete(key)
        elif left > elapsed:
            await client.pexpire(key, left - elapsed)


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
async def subject(request: pytest.FixtureRequest) -> AsyncIterator[tuple[CacheStore, Advance]]:
    if request.param == "memory":
        clock = Clock()
        yield MemoryCacheStore(100_000, MAX_ENTRY, clock=clock), clock.advance
        return
    url = request.getfixturevalue("redis_proc").url
    ns = connect(url, "test")
    await ns.client.flushall()

    async def advance(seconds: float) -> None:
        await shorten_ttls(ns.client, seconds)

    try:
        yield RedisCacheStore(ns, MAX_ENTRY), advance
    finally:
        await ns.aclose()


@pytest.fixture
def store(subject: tuple[CacheStore, Advance]) -> CacheStore:
    return subject[0]


@pytest.fixture
def advance(subject: tuple[CacheStore, Advance]) -> Advance:
    return subject[1]


async def test_get_set_and_overwrite(store: CacheStore) -> None:
    assert await store.get("a") is None
    assert await store.set("a", b"one", 10)
    assert await store.get("a") == b"one"
    assert await store.set("a", b"two", 10)
    assert await store.get("a") == b"two"


async def test_entries_expire_after_their_ttl(store: CacheStore, advance: Advance) -> None:
    assert await store.set("short", b"x", 5)
    assert await store.set("long", b"y", 60)
    await advance(4)
    assert await store.get("short") == b"x"
    await advance(2)
    assert await store.get("short") is None
    assert await store.get("long") == b"y"


async def test_oversize_entries_are_refused(store: CacheStore) -> None:
    assert not await store.set("big", b"x" * (MAX_ENTRY + 1), 10)
    assert await store.get("big") is None
    assert await store.set("fits", b"x" * MAX_ENTRY, 10)
    assert store.stats().refused == 1


async def test_lock_is_exclusive_until_unlocked_or_expired(store: CacheStore,
                                                          advance: Advance) -> None:
    assert await store.lock("k", 10)
    assert not await store.lock("k", 10)
    store.unlock("k")
    assert await store.wait("k", 1) is None  # returns once the lock is free
    assert await store.lock("k", 5)
    await advance(4)
    assert not await store.lock("k", 10)
    await advance(2)
    assert await store.lock("k", 10)  # the first holder's lock expired


async def test_unlock_without_a_lock_is_harmless(store: CacheStore) -> None:
    store.unlock("nobody")
    store.unlock("nobody")
    assert await store.wait("nobody", 1) is None
    assert await store.lock("nobody", 10)


async def test_wait_without_a_lock_returns_at_once(store: CacheStore) -> None:
    assert await asyncio.wait_for(store.wait("k", 5), 1) is None
    await store.set("k", b"v", 10)
    assert await asyncio.wait_for(store.wait("k", 5), 1) == b"v"


async def test_waiter_wakes_when_the_leader_stores(store: CacheStore) -> None:
    assert await store.lock("k", 10)
    waiter = asyncio.create_task(store.wait("k", 5))
    await asyncio.sleep(0)  # it waits now
    assert not waiter.done()
    assert await store.set("k", b"answer", 10)
    store.unlock("k")
    assert await asyncio.wait_for(waiter, 1) == b"answer"


async def test_waiter_wakes_when_the_leader_gives_up(store: CacheStore) -> None:
    assert await store.lock("k", 10)
    waiters = [asyncio.create_task(store.wait("k", 5)) for _ in range(3)]
    await asyncio.sleep(0)
    store.unlock("k")
    assert await asyncio.wait_for(asyncio.gather(*waiters), 1) == [None] * 3
    assert await store.lock("k", 10)  # and one waiter can lead next


async def test_wait_is_bounded_by_its_timeout(store: CacheStore) -> None:
    assert await store.lock("k", 10)
    started = time.monotonic()
    assert await store.wait("k", 0.05) is None  # a real timeout: short
    assert 0.04 <= time.monotonic() - started < 0.5
    store.unlock("k")
    # on Redis, this wait shares the poller the first one left (if it still runs) and ends
    # with it: nothing polls after the test
    assert await store.wait("k", 1) is None


async def test_wait_ends_when_a_dead_leaders_lock_expires(store: CacheStore,
                                                          advance: Advance) -> None:
    assert await store.lock("k", 5)
    await advance(6)
    assert await asyncio.wait_for(store.wait("k", 5), 1) is None


async def test_memory_store_evicts_least_recently_used_by_bytes() -> None:
    store = MemoryCacheStore(303, 200, entry_overhead=0)  # keys' and values' bytes alone
    await store.set("a", b"a" * 100, 10)
    await store.set("b", b"b" * 100, 10)
    await store.set("c", b"c" * 100, 10)
    assert await store.get("a") is not None  # a is now the most recently used
    await store.set("d", b"d" * 150, 10)  # 454 bytes: b then c must go
    assert await store.get("b") is None
    assert await store.get("c") is None
    assert await store.get("a") is not None
    assert await store.get("d") is not None
    stats = store.stats()
    assert (stats.entries, stats.bytes, stats.evictions) == (2, 252, 2)
    await store.set("a", b"A" * 10, 10)  # overwrite counts the new size only
    assert store.stats().bytes == 162
    await store.set("k" * 100, b"v" * 100, 10)  # a key's bytes count like a value's:
    assert store.stats().bytes == 11 + 200  # 162 + 200 > 303, so "d" (least recent) went
    assert await store.get("d") is None and await store.get("k" * 100) == b"v" * 100


async def test_memory_bound_counts_what_each_entry_costs_beyond_its_value() -> None:
    store = MemoryCacheStore(1000, 500, entry_overhead=199)
    for key in "abcd":
        await store.set(key, b"x" * 100, 10)
    # 300 bytes each (key, value, overhead): the fourth entry pushes the first out
    assert (store.stats().entries, store.stats().bytes) == (3, 900)
    assert await store.get("a") is None
    assert MemoryCacheStore(1, 1).entry_overhead == ENTRY_OVERHEAD > 0


async def test_memory_store_counts_an_expired_entry_out_when_read() -> None:
    clock = Clock()
    store = MemoryCacheStore(100_000, MAX_ENTRY, clock=clock, entry_overhead=0)
    await store.set("k", b"v" * 10, 5)
    await clock.advance(6)
    assert await store.get("k") is None
    assert (store.stats().entries, store.stats().bytes) == (0, 0)


@pytest.mark.redis
async def test_redis_store_frees_only_its_own_lock(redis_url: str) -> None:
    one, two = connect(redis_url, "test"), connect(redis_url, "test")
    try:
        first, second = RedisCacheStore(one, MAX_ENTRY), RedisCacheStore(two, MAX_ENTRY)
        assert await first.lock("k", 5)
        await shorten_ttls(one.client, 6)  # first's lock expired; the second replica leads
        assert await second.lock("k", 10)
        first.unlock("k")  # a late release must not free the second's lock
        await one.batch.drain()  # (sent without waiting: wait for it here)
        assert not await first.lock("k", 10)
        second.unlock("k")
        await two.batch.drain()
        assert await first.lock("k", 10)
    finally:
        await one.aclose()
        await two.aclose()


@pytest.mark.redis
async def test_redis_errors_are_translated(redis_url: str) -> None:
    ns = connect("redis://127.0.0.1:1/0", "test")
    store = RedisCacheStore(ns, MAX_ENTRY)
    try:
        for call in (store.get("k"), store.set("k", b"v", 1), store.lock("k", 1),
                     store.wait("k", 1)):
            with pytest.raises(ServiceUnavailable):
                await call
        failed: asyncio.Future[ServiceUnavailable] = asyncio.get_running_loop().create_future()
        store.unlock("k", failed.set_result)  # fire and forget: the error is handed over
        assert isinstance(await asyncio.wait_for(failed, 5), ServiceUnavailable)
    finally:
        await ns.aclose()
