"""The usage meter: totals equal the sum of the records, written in one pipelined flush."""

from __future__ import annotations

import asyncio
import random
from datetime import date

import pytest
from prometheus_client import CollectorRegistry

from gateway.analytics.metering import Meter, MeterCounters
from gateway.exchange import ExchangeRecord, Outcome
from gateway.metrics import Metrics
from gateway.stores.redis_base import connect
from gateway.stores.series import HOUR, MINUTE, MemorySeriesStore, SeriesRow
from gateway.stores.usage import MemoryUsageStore, RedisUsageStore, UsageDelta, UsageStore
from tests.analytics_records import record

DAY = date(2025, 11, 23)


def mixed_run(n: int, seed: int = 7) -> list[ExchangeRecord]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        outcomes: list[Outcome] = ["completed", "completed", "error", "client_disconnected"]
        outcome = rng.choice(outcomes)
        out.append(record(team=rng.choice(["alpha", "beta"]), key_id=rng.choice(["k1", "k2"]),
                          model=rng.choice(["qa", "rag"]), prompt=rng.randint(0, 50),
                          completion=rng.randint(0, 80), cached=rng.random() < 0.2,
                          estimated=rng.random() < 0.3, outcome=outcome,
                          status=502 if outcome == "error" else 200,
                          time=1_763_856_000.0 + rng.randint(0, 86399)))
    return out


class CountingStore:
    """Counts writes (`written` is set at each one) and fails them on demand."""

    def __init__(self, inner: UsageStore) -> None:
        self.inner = inner
        self.calls: list[int] = []
        self.fail = False
        self.written = asyncio.Event()

    async def add(self, rows: list[UsageDelta]) -> None:
        self.calls.append(len(rows))
        self.written.set()
        if self.fail:
            raise ConnectionError("store down")
        await self.inner.add(rows)

    async def query(self, team: str | None, since: date, until: date) -> list[UsageDelta]:
        return await self.inner.query(team, since, until)


def totals(rows: list[UsageDelta]) -> dict[str, int]:
    return {name: sum(getattr(r, name) for r in rows)
            for name in ("requests", "prompt_tokens", "completion_tokens", "errors", "cached",
                         "estimated")}


async def test_what_one_record_adds() -> None:
    store = MemoryUsageStore()
    meter = Meter(store)
    meter.exchange_finished(record(prompt=3, completion=4, cached=True, estimated=True,
                                   outcome="error"))
    await meter.flush()
    [d] = await store.query(None, DAY, DAY)
    assert (d.day, d.team, d.key_id, d.model) == (DAY, "alpha", "key_1", "qa")
    assert d.counts() == {"requests": 1, "prompt_tokens": 3, "completion_tokens": 4,
                          "errors": 1, "cached": 1, "estimated": 1}


@pytest.mark.parametrize("backend", ["memory", pytest.param("redis", marks=pytest.mark.redis)])
async def test_totals_equal_the_sum_of_the_records(
        backend: str, request: pytest.FixtureRequest) -> None:
    ns = None
    inner: UsageStore = MemoryUsageStore()
    if backend == "redis":
        ns = connect(request.getfixturevalue("redis_proc").url, "test")
        await ns.client.flushall()
        inner = RedisUsageStore(ns)
    store = CountingStore(inner)
    meter = Meter(store, flush_interval=3600, max_pending=50)
    meter.start()
    records = mixed_run(400)
    try:
        for i, rec in enumerate(records):
            meter.exchange_finished(rec)
            if i % 50 == 49:  # a background flush is due: the next records come while it writes
                store.written.clear()
                await asyncio.wait_for(store.written.wait(), 5)
    finally:
        await meter.stop()
        rows = await store.query(None, DAY, DAY)
        if ns is not None:
            await ns.client.aclose()
    # the flusher is gone, though stop() came as a Redis write was answered
    assert [t for t in asyncio.all_tasks() if t.get_name() == "usage-meter"] == []
    assert totals(rows) == {
        "requests": 400,
        "prompt_tokens": sum(r.prompt_tokens for r in records),
        "completion_tokens": sum(r.completion_tokens for r in records),
        "errors": sum(r.outcome == "error" for r in records),
        "cached": sum(r.cached for r in records),
        "estimated": sum(r.estimated for r in records),
    }
    by_team = {t: totals([r for r in rows if r.team == t]) for t in ("alpha", "beta")}
    assert by_team["alpha"]["requests"] == sum(r.team == "alpha" for r in records)
    assert meter.pending == 0


async def test_one_store_write_per_flush_with_cells_summed() -> None:
    store = CountingStore(MemoryUsageStore())
    meter = Meter(store, flush_interval=3600)
    for _ in range(100):
        meter.exchange_finished(record(team="alpha"))
        meter.exchange_finished(record(team="beta"))
    await meter.flush()
    assert store.calls == [2]  # 200 records, two cells, one write
    await meter.flush()
    assert store.calls == [2]  # nothing pending: no write


async def test_flushes_early_once_max_pending_records_wait() -> None:
    store = CountingStore(MemoryUsageStore())
    meter = Meter(store, flush_interval=3600, max_pending=10)
    meter.start()
    try:
        for _ in range(10):
            meter.exchange_finished(record())
        await asyncio.wait_for(store.written.wait(), 5)  # not the hour of `flush_interval`
        assert store.calls == [1]
    finally:
        await meter.stop()


async def test_a_failed_flush_keeps_the_sums_for_the_next() -> None:
    store = CountingStore(MemoryUsageStore())
    meter = Meter(store, flush_interval=3600)
    meter.exchange_finished(record(prompt=1))
    store.fail = True
    with pytest.raises(ConnectionError):
        await meter.flush()
    meter.exchange_finished(record(prompt=2))
    store.fail = False
    await meter.stop()
    [row] = await store.query(None, DAY, DAY)
    assert (row.requests, row.prompt_tokens) == (2, 3)


async def test_prometheus_counters_use_bounded_labels() -> None:
    metrics = Metrics(CollectorRegistry())
    meter = Meter(MemoryUsageStore(), MeterCounters(metrics.tally(metrics.tokens),
                                                    metrics.tally(metrics.team_requests)))
    meter.exchange_finished(record(prompt=7, completion=3, key_id="secret-key-id"))
    meter.exchange_finished(record(prompt=1, completion=0, cached=True))
    metrics.sample()  # what /metrics does before rendering
    r = metrics.registry
    labels = {"team": "alpha", "model": "qa", "backend": "inkeep"}
    assert r.get_sample_value("gateway_tokens_total", {**labels, "kind": "prompt"}) == 8
    assert r.get_sample_value("gateway_tokens_total", {**labels, "kind": "completion"}) == 3
    assert r.get_sample_value("gateway_team_requests_total",
                              {**labels, "status": "200", "cached": "true"}) == 1
    exposed = b"".join(s.name.encode() + repr(s.labels).encode()
                       for m in r.collect() for s in m.samples)
    assert b"secret-key-id" not in exposed


async def test_a_broken_record_never_raises() -> None:
    meter = Meter(MemoryUsageStore())
    bad = record()
    object.__setattr__(bad, "usage", {"prompt_tokens": "lots"})
    meter.exchange_finished(bad)  # logged, not raised
    assert meter.pending == 0


class FailingSeries(MemorySeriesStore):
    def __init__(self) -> None:
        super().__init__(keep_days=30, clock=lambda: 1_763_856_000.0 + 3600)  # records' time
        self.fail = False

    async def add(self, rows: list[SeriesRow]) -> None:
        if self.fail:
            raise ConnectionError("series store down")
        await super().add(rows)


async def test_records_feed_the_series_by_minute_with_histograms() -> None:
    series = FailingSeries()
    meter = Meter(MemoryUsageStore(), series=series, flush_interval=3600)
    start = 1_763_856_000
    meter.exchange_finished(record(prompt=3, completion=4, time=start + 5.0))
    meter.exchange_finished(record(prompt=1, completion=1, time=start + 59.9, outcome="error",
                                   status=502, latency_ms=30_000.0, ttft_ms=None))
    meter.exchange_finished(record(time=start + 61.0, cached=True, key_id="other"))
    await meter.flush()
    first, second = await series.query(MINUTE, start, start + 120)
    assert (first.start, first.cell) == (start, ("alpha", "qa", "inkeep"))
    assert [first.get(n) for n in ("requests", "errors", "prompt_tokens",
                                   "completion_tokens", "cached")] == [2, 1, 4, 5, 0]
    # 12.5 ms is counted up to the bound 25 ms, 30 s on the bound 30 s; ttft 3 ms up to 5 ms
    assert first.latency[2] == 1 and first.latency[11] == 1 and sum(first.latency) == 2
    assert first.ttft[0] == 1 and sum(first.ttft) == 1
    assert (second.get("requests"), second.get("cached"), sum(second.ttft)) == (1, 1, 0)
    [hour] = await series.query(HOUR, start, start + 3600)
    assert hour.get("requests") == 3


async def test_a_failed_series_write_is_retried_without_counting_usage_twice() -> None:
    series = FailingSeries()
    usage = CountingStore(MemoryUsageStore())
    meter = Meter(usage, series=series, flush_interval=3600)
    meter.exchange_finished(record(prompt=2))
    series.fail = True
    with pytest.raises(ConnectionError):
        await meter.flush()
    series.fail = False
    meter.exchange_finished(record(prompt=5))
    await meter.stop()
    [row] = await usage.query(None, DAY, DAY)
    assert (row.requests, row.prompt_tokens) == (2, 7)
    [point] = await series.query(MINUTE, 1_763_856_000, 1_763_856_060)
    assert (point.get("requests"), point.get("prompt_tokens")) == (2, 7)
