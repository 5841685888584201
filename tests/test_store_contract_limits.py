"""One contract suite for `LimitStore`, run against the in-process and the Redis store, on a
clock the tests move (no sleeps)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from gateway.stores.limits import (
    AcquireRequest,
    Bucket,
    Budget,
    Concurrency,
    LimitStore,
    MemoryLimitStore,
    RedisLimitStore,
)
from gateway.stores.redis_base import connect


class Clock:
    """Wall-clock seconds that only move when a test moves them."""

    def __init__(self) -> None:
        self.now = 1_764_806_400.0  # near 1.7e12 ms, where floating point rounds coarsely

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
async def store(request: pytest.FixtureRequest, clock: Clock) -> AsyncIterator[LimitStore]:
    if request.param == "memory":
        yield MemoryLimitStore(clock)
        return
    # the `redis_url` fixture, inlined: async fixtures cannot be requested dynamically
    url = request.getfixturevalue("redis_proc").url
    ns = connect(url, "test")
    await ns.client.flushall()
    try:
        yield RedisLimitStore(ns, clock=clock)
    finally:
        await ns.aclose()


async def settle(store: LimitStore, request: AcquireRequest, delta_tokens: int) -> None:
    """`store.settle`, then wait until it has reached the store: it has in memory; Redis
    sends it with its next pipeline, where a first call after a script flush may come after
    a later acquire."""
    store.settle(request, delta_tokens)
    if isinstance(store, RedisLimitStore):
        await store.ns.batch.drain()


def rpm(limit: int, scope: str = "k:a:rpm", name: str = "key_rpm") -> Bucket:
    return Bucket(name, scope, "requests", limit)


def tpm(limit: int, scope: str = "k:a:tpm", name: str = "key_tpm") -> Bucket:
    return Bucket(name, scope, "tokens", limit)


async def test_burst_up_to_the_limit_then_denied_with_retry_after(store: LimitStore) -> None:
    req = AcquireRequest("alpha", (rpm(5),))
    decisions = [await store.acquire(req) for _ in range(6)]
    assert [d.admitted for d in decisions] == [True] * 5 + [False]
    assert [d.figures[0].remaining for d in decisions[:5]] == [4, 3, 2, 1, 0]
    denied = decisions[5]
    assert denied.denied == "key_rpm"
    assert denied.retry_after == 12  # one emission interval: 60 s / 5
    assert denied.figures[0].limit == 5


@pytest.mark.parametrize("limit", [7, 13, 17, 99, 106, 997, 3001])
async def test_a_full_burst_at_one_instant_is_admitted_whole(store: LimitStore,
                                                             limit: int) -> None:
    # `limit` intervals of 60000 / limit ms can sum to a hair over the minute
    req = AcquireRequest("alpha", (rpm(limit),))
    decisions = [await store.acquire(req) for _ in range(limit + 1)]
    assert [d.admitted for d in decisions] == [True] * limit + [False]
    assert [d.figures[0].remaining for d in decisions[:limit]] == list(range(limit))[::-1]


async def test_gcra_admits_again_smoothly(store: LimitStore, clock: Clock) -> None:
    # 60,000 tokens per minute = one token per millisecond; fill the bucket, then wait for 50
    full = AcquireRequest("alpha", (tpm(60_000),), tokens=60_000)
    assert (await store.acquire(full)).admitted
    small = AcquireRequest("alpha", (tpm(60_000),), tokens=50)
    denied = await store.acquire(small)
    assert not denied.admitted and denied.retry_after == 0.05
    clock.now += 0.049
    assert not (await store.acquire(small)).admitted
    clock.now += 0.001
    assert (await store.acquire(small)).admitted


async def test_all_or_nothing(store: LimitStore) -> None:
    # the team limit refuses, so the key bucket must not have been charged
    key, team = rpm(10), rpm(1, "t:rpm", "team_rpm")
    assert (await store.acquire(AcquireRequest("alpha", (key, team)))).admitted
    refused = await store.acquire(AcquireRequest("alpha", (key, team)))
    assert not refused.admitted and refused.denied == "team_rpm"
    alone = await store.acquire(AcquireRequest("alpha", (key,)))
    assert alone.figures[0].remaining == 8  # 10 - the first - this one


async def test_tags_are_separate(store: LimitStore) -> None:
    assert (await store.acquire(AcquireRequest("alpha", (rpm(1),)))).admitted
    assert (await store.acquire(AcquireRequest("beta", (rpm(1),)))).admitted
    assert not (await store.acquire(AcquireRequest("alpha", (rpm(1),)))).admitted


async def test_settle_returns_unused_tokens(store: LimitStore) -> None:
    req = AcquireRequest("alpha", (tpm(1000),), tokens=800)
    first = await store.acquire(req)
    assert first.admitted and first.figures[0].remaining == 200
    assert not (await store.acquire(req)).admitted
    await settle(store, req, -700)  # used 100 of the 800 reserved
    second = await store.acquire(req)
    assert second.admitted and second.figures[0].remaining == 100


async def test_settle_charges_overruns(store: LimitStore) -> None:
    req = AcquireRequest("alpha", (tpm(1000),), tokens=100)
    assert (await store.acquire(req)).admitted
    await settle(store, req, 850)  # used 950: another 100 no longer fits
    refused = await store.acquire(req)
    assert not refused.admitted and refused.figures[0].remaining == 50


async def test_budget_reserves_settles_and_reports_reset(store: LimitStore) -> None:
    budget = Budget("daily_budget", "budget:d:20250101", 1000, ttl=3600)
    req = AcquireRequest("alpha", budgets=(budget,), tokens=600)
    first = await store.acquire(req)
    assert first.admitted and first.figures[0].remaining == 400
    assert first.figures[0].reset == 3600
    refused = await store.acquire(req)
    assert not refused.admitted and refused.denied == "daily_budget"
    assert refused.retry_after == 3600 and refused.figures[0].remaining == 400
    await settle(store, req, -500)  # used 100
    assert (await store.acquire(req)).figures[0].remaining == 300


async def test_concurrency_leases(store: LimitStore) -> None:
    def req(lease: str) -> AcquireRequest:
        return AcquireRequest("alpha", concurrency=Concurrency("conc:a", 2, 60), lease=lease)

    assert (await store.acquire(req("1"))).admitted
    assert (await store.acquire(req("2"))).admitted
    third = await store.acquire(req("3"))
    assert not third.admitted and third.denied == "concurrency" and third.retry_after == 1
    await settle(store, req("1"), 0)
    assert (await store.acquire(req("4"))).admitted
    assert not (await store.acquire(req("5"))).admitted


async def test_expired_leases_free_their_slot(store: LimitStore, clock: Clock) -> None:
    conc = Concurrency("conc:a", 1, 30)
    assert (await store.acquire(AcquireRequest("alpha", concurrency=conc, lease="dead"))).admitted
    clock.now += 29.999
    assert not (await store.acquire(AcquireRequest("alpha", concurrency=conc, lease="x"))).admitted
    clock.now += 0.001  # the replica holding "dead" never settled
    assert (await store.acquire(AcquireRequest("alpha", concurrency=conc, lease="y"))).admitted


async def test_oversized_token_request_fits_an_idle_bucket_once(store: LimitStore) -> None:
    big = AcquireRequest("alpha", (tpm(100),), tokens=500)
    assert (await store.acquire(big)).admitted
    assert not (await store.acquire(AcquireRequest("alpha", (tpm(100),), tokens=1))).admitted


async def test_refused_by_concurrency_charges_nothing(store: LimitStore) -> None:
    budget = Budget("daily_budget", "b:d:20000101", 100, 3600)

    def request(lease: str) -> AcquireRequest:
        return AcquireRequest("alpha", (rpm(10), tpm(1000)), (budget,),
                              Concurrency("c:a", 1, 60), lease, tokens=10)

    assert (await store.acquire(request("first"))).admitted
    refused = await store.acquire(request("second"))
    assert not refused.admitted and refused.denied == "concurrency"
    after = await store.acquire(AcquireRequest("alpha", (rpm(10), tpm(1000)), (budget,),
                                               tokens=10))
    assert [f.remaining for f in after.figures] == [8, 980, 80]
