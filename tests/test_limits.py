"""Limiter: plans, OpenAI headers and errors, exact admission under concurrency on Redis,
token reserve/settle, budgets, and fail_open / fail_closed across a Redis outage."""

from __future__ import annotations

import asyncio
import textwrap
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from gateway.auth import Principal, TeamLimits
from gateway.config import GatewayConfig, parse_config
from gateway.errors import QuotaExceeded, RateLimited, ServiceUnavailable
from gateway.limiter import Admission, Limiter, format_reset
from gateway.stores.keys import ModelLimit
from gateway.stores.limits import (
    AcquireRequest,
    Bucket,
    Budget,
    Concurrency,
    Decision,
    MemoryLimitStore,
    RedisLimitStore,
)
from gateway.stores.redis_base import connect
from gateway.testing.redis_server import redis_server


def config(extra: str = "") -> GatewayConfig:
    return parse_config(textwrap.dedent(extra), base_dir=Path("."), env={})


def principal(**kw: Any) -> Principal:
    return Principal(**{"key_id": "k1", "team": "alpha", **kw})


def text(admission: Admission) -> dict[str, str]:
    """The admission's headers as the client reads them."""
    return {name.decode(): value.decode() for name, value in admission.headers}


class Exploding:
    async def acquire(self, request: AcquireRequest) -> Decision:
        raise AssertionError("no store call expected")

    def settle(self, request: AcquireRequest, delta_tokens: int) -> None:
        raise AssertionError("no store call expected")


def test_format_reset_like_openai() -> None:
    assert format_reset(0.02) == "20ms"
    assert format_reset(1) == "1s"
    assert format_reset(1.5) == "1.5s"
    assert format_reset(360) == "6m0s"
    assert format_reset(3723) == "1h2m3s"


async def test_no_limits_costs_no_store_call() -> None:
    limiter = Limiter(config(), Exploding(), Exploding())
    admission = await limiter.admit(principal(), "qa", 100)
    assert admission.headers == []
    admission.settle(5)


async def test_headers_show_the_tightest_limits() -> None:
    limiter = Limiter(config(), MemoryLimitStore())
    p = principal(rpm=60, tpm=10_000, team_limits=TeamLimits(rpm=5, tpm=100_000))
    admission = await limiter.admit(p, "qa", 1000)
    assert text(admission) == {
        "x-ratelimit-limit-requests": "5",
        "x-ratelimit-remaining-requests": "4",
        "x-ratelimit-reset-requests": "12s",
        "x-ratelimit-limit-tokens": "10000",
        "x-ratelimit-remaining-tokens": "9000",
        "x-ratelimit-reset-tokens": "6s",
    }


async def test_rate_limited_names_the_limit_and_sets_retry_after() -> None:
    limiter = Limiter(config("limits: {key_rpm: 2}\n"), MemoryLimitStore())
    for _ in range(2):
        await limiter.admit(principal(), "qa", 10)
    with pytest.raises(RateLimited) as err:
        await limiter.admit(principal(), "qa", 10)
    exc = err.value
    assert exc.status == 429 and exc.code == "rate_limit_exceeded"
    assert exc.message.startswith(
        "Rate limit reached for requests per minute (rpm) on key k1: limit 2.")
    assert exc.headers["retry-after"] == "30"
    assert 29_000 <= int(exc.headers["retry-after-ms"]) <= 30_000
    assert exc.headers["x-ratelimit-remaining-requests"] == "0"


async def test_team_model_limit_applies_to_that_model_only() -> None:
    limiter = Limiter(config(), MemoryLimitStore())
    p = principal(team_limits=TeamLimits(models={"qa": ModelLimit(rpm=1)}))
    await limiter.admit(p, "qa", 10)
    await limiter.admit(p, "rag", 10)
    with pytest.raises(RateLimited, match="on team alpha for model qa: limit 1"):
        await limiter.admit(p, "qa", 10)


async def test_concurrency_cap_and_release_on_settle() -> None:
    limiter = Limiter(config(), MemoryLimitStore())
    p = principal(max_concurrent=1)
    first = await limiter.admit(p, "qa", 10)
    with pytest.raises(RateLimited, match="Too many concurrent requests on key k1: limit 1"):
        await limiter.admit(p, "qa", 10)
    first.settle(10)
    first.settle(10)  # does nothing: the second request's slot stays held
    second = await limiter.admit(p, "qa", 10)
    with pytest.raises(RateLimited, match="Too many concurrent requests"):
        await limiter.admit(p, "qa", 10)
    second.settle(3)


class Manual:
    def __init__(self) -> None:
        self.now = 946_728_000.0

    def __call__(self) -> float:
        return self.now


async def test_a_sweep_keeps_the_state_of_limits_in_use() -> None:
    """The in-process store drops idle state every 4096 admissions: a key at its limit and
    a held concurrency slot survive it."""
    clock = Manual()  # frozen unless moved: nothing refills on its own
    store = MemoryLimitStore(clock)
    limiter = Limiter(config(), store, clock=clock)
    capped, holding = principal(rpm=2), principal(key_id="k3", max_concurrent=1)
    await limiter.admit(capped, "qa", 1)
    await limiter.admit(capped, "qa", 1)
    await limiter.admit(holding, "qa", 1)
    busy = principal(key_id="k2", rpm=10**9)
    for _ in range(store.SWEEP_EVERY):
        await limiter.admit(busy, "qa", 1)
    with pytest.raises(RateLimited, match="requests per minute"):
        await limiter.admit(capped, "qa", 1)
    with pytest.raises(RateLimited, match="concurrent"):
        await limiter.admit(holding, "qa", 1)
    clock.now += 30  # one emission interval at rpm 2
    assert text(await limiter.admit(capped, "qa", 1))["x-ratelimit-remaining-requests"] == "0"


async def test_tokens_reserved_then_settled_to_actual_usage() -> None:
    clock = Manual()
    limiter = Limiter(config(), MemoryLimitStore(clock), clock=clock)
    p = principal(tpm=1000)
    first = await limiter.admit(p, "qa", 900)
    with pytest.raises(RateLimited, match=r"tokens per minute \(tpm\)"):
        await limiter.admit(p, "qa", 200)
    first.settle(50)  # the answer was short: 850 tokens come back
    second = await limiter.admit(p, "qa", 200)
    assert text(second)["x-ratelimit-remaining-tokens"] == "750"


async def test_budget_exhausted_is_insufficient_quota() -> None:
    noon = 946_728_000.0  # 2000-01-01 12:00Z
    limiter = Limiter(config(), MemoryLimitStore(), clock=lambda: noon)
    p = principal(team_limits=TeamLimits(daily_token_budget=1000, monthly_token_budget=10**6))
    admission = await limiter.admit(p, "qa", 800)
    admission.settle(900)
    with pytest.raises(QuotaExceeded) as err:
        await limiter.admit(p, "qa", 200)
    assert err.value.status == 429 and err.value.code == "insufficient_quota"
    assert "daily token budget of 1000 tokens" in err.value.message
    assert "resets at 2000-01-02T00:00:00Z (in 12h0m0s)" in err.value.message


@pytest.mark.parametrize("rpm", [7, 13, 17, 99])
async def test_a_full_burst_at_one_instant_is_admitted_whole(rpm: int) -> None:
    # `rpm` intervals of 60000 / rpm ms can sum to a hair over the minute in floating point
    def instant() -> float:
        return 1_764_806_400.0

    limiter = Limiter(config(), MemoryLimitStore(instant), clock=instant)
    p = principal(rpm=rpm)
    remaining = [text(await limiter.admit(p, "qa", 10))["x-ratelimit-remaining-requests"]
                 for _ in range(rpm)]
    assert remaining == [str(left) for left in range(rpm - 1, -1, -1)]
    with pytest.raises(RateLimited):
        await limiter.admit(p, "qa", 10)


@pytest.mark.redis
async def test_a_full_burst_within_one_millisecond_is_admitted_whole_on_redis(
        redis_url: str) -> None:
    # 18 checks pipelined in one round trip run within about a millisecond of Redis' clock,
    # where 17 intervals of 60000 / 17 ms sum to a hair over the minute
    ns = connect(redis_url, "gw-burst")
    limiter = Limiter(config(), RedisLimitStore(ns))

    async def admitted(p: Principal) -> bool:
        try:
            await limiter.admit(p, "qa", 10)
            return True
        except RateLimited:
            return False

    try:
        for burst in range(20):
            p = principal(key_id=f"burst-{burst}", rpm=17)
            assert sum(await asyncio.gather(*(admitted(p) for _ in range(18)))) == 17
    finally:
        await ns.aclose()


@pytest.mark.redis
async def test_exactly_n_of_100_concurrent_requests_on_redis(redis_url: str) -> None:
    n = 17
    clients = [connect(redis_url, "gw") for _ in range(5)]
    failed_open: list[int] = []
    limiters = [Limiter(config(), RedisLimitStore(ns),
                        on_unavailable=lambda: failed_open.append(1)) for ns in clients]
    p = principal(rpm=n)

    async def one(i: int) -> bool:
        try:
            await limiters[i % len(limiters)].admit(p, "qa", 10)
            return True
        except RateLimited:
            return False

    try:
        results = await asyncio.gather(*(one(i) for i in range(100)))
        # a check that timed out on Redis is admitted locally (fail_open): say so if it happened
        assert (sum(results), len(failed_open)) == (n, 0)
    finally:
        for ns in clients:
            await ns.aclose()


@pytest.mark.redis
async def test_a_burst_beyond_the_connection_pool_never_fails_open(redis_url: str) -> None:
    """400 requests at once on one replica whose pool holds 4 connections: every check
    reaches Redis (waiting for a connection, never falling back to the local limiter) and
    exactly the limit is admitted."""
    n = 50
    ns = connect(redis_url, "gw", max_connections=4)
    unavailable: list[int] = []
    limiter = Limiter(config(), RedisLimitStore(ns), on_unavailable=lambda: unavailable.append(1))
    p = principal(rpm=n, max_concurrent=1000)

    async def one() -> bool:
        try:
            admission = await limiter.admit(p, "qa", 10)
        except RateLimited:
            return False
        await asyncio.sleep(0)
        admission.settle(10)
        return True

    try:
        with capture_logs() as logs:
            results = await asyncio.gather(*(one() for _ in range(400)))
        assert sum(results) == n
        assert unavailable == [] and not [e for e in logs if "unavailable" in e["event"]]
    finally:
        await ns.aclose()


@pytest.mark.redis
async def test_a_cancelled_check_gives_back_its_reservation(redis_url: str) -> None:
    """A client that goes away while its check is in flight: the check still ran in Redis,
    so its concurrency lease and token reservation are given back at once."""
    ns = connect(redis_url, "gw")
    limiter = Limiter(config(), RedisLimitStore(ns))
    p = principal(max_concurrent=1, tpm=1000)
    try:
        pending = asyncio.ensure_future(limiter.admit(p, "qa", 900))
        await asyncio.sleep(0)  # queued for the next pipeline
        pending.cancel()
        with pytest.raises(asyncio.CancelledError):
            await pending
        await ns.batch.drain()
        await ns.batch.drain()  # the give-back goes out in the pipeline after
        admission = await limiter.admit(p, "qa", 900)  # neither the lease nor tokens held
        assert text(admission)["x-ratelimit-remaining-tokens"] == "100"
    finally:
        await ns.aclose()


@pytest.mark.redis
async def test_token_limit_holds_under_concurrency_on_redis(redis_url: str) -> None:
    clients = [connect(redis_url, "gw") for _ in range(4)]
    limiters = [Limiter(config(), RedisLimitStore(ns)) for ns in clients]
    p = principal(tpm=10_000, max_concurrent=50)

    async def one(i: int) -> int:
        try:
            admission = await limiters[i % 4].admit(p, "qa", 700)
        except RateLimited:
            return 0
        admission.settle(700)
        return 700

    try:
        used = sum(await asyncio.gather(*(one(i) for i in range(60))))
        assert 10_000 - 700 < used <= 10_000
    finally:
        for ns in clients:
            await ns.aclose()


async def test_fail_open_and_recovery_across_a_redis_outage() -> None:
    with redis_server() as server:
        ns = connect(server.url, "gw")
        counted: list[int] = []
        limiter = Limiter(config(), RedisLimitStore(ns), MemoryLimitStore(),
                          on_unavailable=lambda: counted.append(1), retry_interval=0.2)
        p = principal(rpm=1000)
        try:
            await limiter.admit(p, "qa", 10)
            server.stop()
            with capture_logs() as logs:
                admission = await limiter.admit(p, "qa", 10)  # via the local limiter
                await limiter.admit(p, "qa", 10)  # no second Redis attempt in the interval
            assert text(admission)["x-ratelimit-limit-requests"] == "1000"
            assert [e["event"] for e in logs] == ["limits_store_unavailable"]
            assert counted == [1]
            admission.settle(10)  # settles on the store that admitted it
            server.start_again()
            await asyncio.sleep(0.25)
            await limiter.admit(p, "qa", 10)
            assert await ns.client.keys("gw:{lim:alpha}:k:k1:rpm") != []
            assert counted == [1]
        finally:
            await ns.aclose()


async def test_a_settle_that_fails_on_redis_is_logged_and_reported() -> None:
    with redis_server() as server:
        ns = connect(server.url, "gw")
        reported: list[ServiceUnavailable] = []
        done = asyncio.Event()

        def on_error(exc: ServiceUnavailable) -> None:
            reported.append(exc)
            done.set()

        limiter = Limiter(config(), RedisLimitStore(ns, on_error))
        try:
            admission = await limiter.admit(principal(max_concurrent=1), "qa", 10)
            server.stop()
            with capture_logs() as logs:
                admission.settle(5)  # returns at once; the failure comes later
                await asyncio.wait_for(done.wait(), 10)
            assert [e.code for e in reported] == ["store_unavailable"]
            assert [(e["event"], e["error"]) for e in logs] == [
                ("limits_settle_failed", "store_unavailable")]
        finally:
            await ns.aclose()


async def test_fail_closed_is_503_until_redis_returns() -> None:
    with redis_server() as server:
        ns = connect(server.url, "gw")
        limiter = Limiter(config("limits: {fail_mode: fail_closed}\n"), RedisLimitStore(ns),
                          retry_interval=0.1)
        p = principal(rpm=10)
        try:
            server.stop()
            with capture_logs(), pytest.raises(ServiceUnavailable) as err:
                await limiter.admit(p, "qa", 10)
            assert err.value.status == 503 and err.value.code == "store_unavailable"
            assert "127.0.0.1" not in err.value.message
            server.start_again()
            await asyncio.sleep(0.15)
            await limiter.admit(p, "qa", 10)
        finally:
            await ns.aclose()


async def test_memory_store_drops_the_state_of_idle_teams() -> None:
    now = [1_000.0]
    store = MemoryLimitStore(lambda: now[0])
    idle = AcquireRequest("idle", (Bucket("key_rpm", "k:a:rpm", "requests", 60),),
                          (Budget("daily_budget", "b:d:1", 100, 30),),
                          Concurrency("c:a", 5, 60), "lease-1", tokens=10)
    assert (await store.acquire(idle)).admitted
    store.settle(idle, 0)
    now[0] += 3600
    busy = AcquireRequest("busy", (Bucket("key_rpm", "k:b:rpm", "requests", 10**9),))
    for _ in range(4096):  # the store sweeps every 4096 calls
        assert (await store.acquire(busy)).admitted
    assert set(store._tats) == {"busy"} and not store._budgets and not store._leases
