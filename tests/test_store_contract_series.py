"""One contract suite for `SeriesStore`: in process and Redis, on a clock the tests move."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from gateway.stores.redis_base import connect
from gateway.stores.series import (
    DAY,
    FIELDS,
    HOUR,
    LATENCY,
    MINUTE,
    TTFT,
    WIDTH,
    MemorySeriesStore,
    RedisSeriesStore,
    SeriesRow,
    SeriesStore,
)

T0 = 1_763_856_000  # 2025-11-23 00:00 UTC: a day, an hour and a minute start
KEEP_DAYS = 3


class Clock:
    """Wall-clock seconds that only move when a test moves them."""

    def __init__(self, now: float = T0 + 3 * 3600) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
async def store(request: pytest.FixtureRequest, clock: Clock) -> AsyncIterator[SeriesStore]:
    if request.param == "memory":
        yield MemorySeriesStore(KEEP_DAYS, clock)
        return
    ns = connect(request.getfixturevalue("redis_proc").url, "test")
    await ns.client.flushall()
    try:
        yield RedisSeriesStore(ns, KEEP_DAYS, clock)
    finally:
        await ns.client.aclose()


def row(start: int = T0, team: str = "alpha", model: str = "qa", backend: str = "inkeep",
        **counts: int) -> SeriesRow:
    values = [0] * WIDTH
    for name, n in counts.items():
        values[FIELDS.index(name)] = n
    return SeriesRow(start, team, model, backend, tuple(values))


def summary(rows: list[SeriesRow]) -> list[tuple[int, str, int]]:
    return [(r.start, r.team, r.get("requests")) for r in rows]


async def test_minute_rows_roll_up_into_hours_and_days(store: SeriesStore) -> None:
    await store.add([row(T0, requests=1), row(T0 + 60, requests=2),
                     row(T0 + 3600, requests=4, errors=1)])
    assert summary(await store.query(MINUTE, T0, T0 + 7200)) == [
        (T0, "alpha", 1), (T0 + 60, "alpha", 2), (T0 + 3600, "alpha", 4)]
    assert summary(await store.query(HOUR, T0, T0 + 7200)) == [
        (T0, "alpha", 3), (T0 + 3600, "alpha", 4)]
    [day] = await store.query(DAY, T0, T0 + 86_400)
    assert (day.start, day.get("requests"), day.get("errors")) == (T0, 7, 1)


async def test_every_counter_and_histogram_adds_up(store: SeriesStore) -> None:
    full = tuple(range(1, WIDTH + 1))
    one = SeriesRow(T0, "alpha", "qa", "inkeep", full)
    await store.add([one, one])
    await store.add([one])
    [found] = await store.query(MINUTE, T0, T0 + 60)
    assert found.values == tuple(3 * v for v in full)
    assert found.latency == tuple(3 * v for v in full[LATENCY:TTFT])
    assert found.ttft == tuple(3 * v for v in full[TTFT:])


async def test_cells_are_kept_apart_and_sorted(store: SeriesStore) -> None:
    await store.add([row(team="beta", requests=1), row(model="rag", requests=2),
                     row(backend="nuclia", requests=3), row(requests=4)])
    found = await store.query(MINUTE, T0, T0 + 60)
    assert [(r.team, r.model, r.backend, r.get("requests")) for r in found] == [
        ("alpha", "qa", "inkeep", 4), ("alpha", "qa", "nuclia", 3),
        ("alpha", "rag", "inkeep", 2), ("beta", "qa", "inkeep", 1)]


async def test_query_takes_buckets_starting_in_the_half_open_range(store: SeriesStore) -> None:
    await store.add([row(T0 + 60 * i, requests=i + 1) for i in range(5)])
    assert [r.start for r in await store.query(MINUTE, T0 + 60, T0 + 180)] == [
        T0 + 60, T0 + 120]
    assert [r.start for r in await store.query(MINUTE, T0 + 30, T0 + 121)] == [
        T0 + 60, T0 + 120]
    assert await store.query(MINUTE, T0 + 600, T0 + 900) == []


async def test_buckets_past_keeping_are_gone(store: SeriesStore, clock: Clock) -> None:
    await store.add([row(T0, requests=1)])
    clock.now = T0 + 86_400 + 120  # minutes are kept a day at most; hours and days longer
    assert await store.query(MINUTE, T0, T0 + 60) == []
    assert summary(await store.query(HOUR, T0, T0 + 3600)) == [(T0, "alpha", 1)]
    clock.now = T0 + (KEEP_DAYS + 1) * 86_400 + 1
    assert await store.query(HOUR, T0, clock.now) == []
    assert await store.query(DAY, T0, clock.now) == []
    await store.add([row(T0, requests=5)])  # too old to keep: dropped
    assert await store.query(DAY, T0, clock.now) == []


async def test_empty_add_is_a_no_op(store: SeriesStore) -> None:
    await store.add([])
    assert await store.query(DAY, T0, T0 + 86_400) == []


@pytest.mark.redis
async def test_redis_add_is_one_pipeline_and_hashes_expire(redis_url: str) -> None:
    ns = connect(redis_url, "test")
    clock = Clock()
    try:
        store = RedisSeriesStore(ns, KEEP_DAYS, clock)
        executed: list[int] = []
        real = ns.client.pipeline

        def counting(*args: object, **kw: object) -> object:
            pipe = real(*args, **kw)  # type: ignore[arg-type]
            execute = pipe.execute

            async def run(*a: object, **k: object) -> object:
                executed.append(len(pipe.command_stack))
                return await execute(*a, **k)  # type: ignore[arg-type]

            pipe.execute = run  # type: ignore[assignment,method-assign]
            return pipe

        ns.client.pipeline = counting  # type: ignore[assignment,method-assign]
        await store.add([row(T0 + 60 * i, team=f"t{i}", requests=1) for i in range(20)])
        assert len(executed) == 1
        keys = await ns.client.keys("*")
        assert keys and all(b"{series}" in k for k in keys)
        minute_ttl = await ns.client.ttl(f"test:{{series}}:minute:{T0}")
        day_ttl = await ns.client.ttl(f"test:{{series}}:day:{T0}")
        # ends a day after it ended (the clock is 3 h past T0); the day bucket KEEP_DAYS after
        assert 86_400 - 3 * 3600 < minute_ttl <= 86_400 - 3 * 3600 + 62
        assert day_ttl > (KEEP_DAYS + 1) * 86_400 - 3 * 3600 - 1
    finally:
        await ns.client.aclose()
