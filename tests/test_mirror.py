"""Analytics mirroring against the fake Analytics API on a real uvicorn: faults then recovery,
exactly once per idempotency key, in order per conversation, dead letters and replay, a spool
that survives a restart, and records a dead Redis consumer left behind."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from prometheus_client import CollectorRegistry

from gateway.analytics.mirror import Backoff, Mirror
from gateway.analytics.sinks import Sink, idempotency_key, make_sinks
from gateway.components import make_outbox
from gateway.config import GatewayConfig
from gateway.metrics import Metrics
from gateway.stores.outbox import Outbox, OutboxItem, RedisOutbox
from gateway.stores.redis_base import RedisNamespace, connect
from gateway.stores.spool import SpoolOutbox
from gateway.testing.fake_analytics import AnalyticsState, create_fake_analytics_app
from gateway.testing.server import run_server
from tests.analytics_records import record
from tests.eventually import eventually

API_KEY = "analytics-key"
FAST = Backoff(initial=0.01, factor=2.0, cap=0.1)


@pytest.fixture
async def analytics() -> AsyncIterator[tuple[str, AnalyticsState]]:
    app = create_fake_analytics_app(API_KEY)
    async with run_server(app) as url:
        yield url, app.state.analytics


def make_config(tmp_path: Path, url: str, *, store: str = "memory", key: str = API_KEY,
                webhook: bool = False, batch: int = 1, **outbox: Any) -> GatewayConfig:
    sinks: list[dict[str, Any]] = [{"name": "ink", "kind": "inkeep", "url": url,
                                    "api_key": key, "timeout": 1.0}]
    if webhook:
        sinks.append({"name": "hook", "kind": "webhook", "url": url + "/hook",
                      "secret": "s", "timeout": 1.0, "batch": batch})
    box = {"spool_dir": str(tmp_path / "outbox"), "shutdown_grace": 2.0,
           "claim_idle_seconds": 0.3, **outbox}
    return GatewayConfig.model_validate({"store": store, "base_dir": tmp_path,
                                         "analytics": {"sinks": sinks, "outbox": box}})


def build(config: GatewayConfig, ns: RedisNamespace | None = None,
          metrics: Metrics | None = None, **kw: Any) -> Mirror:
    outbox: Outbox = make_outbox(config, ns)
    sinks: list[Sink] = make_sinks(config.analytics.sinks)
    return Mirror(config, outbox, sinks, metrics, backoff=FAST, poll_interval=0.05, **kw)


class WatchedSpool(SpoolOutbox):
    """A spool that reports the number of records in each write."""

    def __init__(self, directory: Path, sinks: list[str]) -> None:
        super().__init__(directory, sinks)
        self.writes: asyncio.Queue[int] = asyncio.Queue()

    async def put(self, entries: list[tuple[bytes, str]]) -> None:
        await super().put(entries)
        self.writes.put_nowait(len(entries))


class WatchedRedisOutbox(RedisOutbox):
    """Redis streams that report the number of records each claim took."""

    def __init__(self, ns: RedisNamespace, sinks: list[str], *,
                 claim_idle_seconds: float) -> None:
        super().__init__(ns, sinks, claim_idle_seconds=claim_idle_seconds)
        self.claims: asyncio.Queue[int] = asyncio.Queue()

    async def claim(self, sink: str, n: int, consumer: str,
                    block_ms: int | None = None) -> list[OutboxItem]:
        items = await super().claim(sink, n, consumer, block_ms)
        self.claims.put_nowait(len(items))
        return items


def conversation_turns(n_convs: int, turns: int) -> list[Any]:
    """Records of `n_convs` conversations, turns interleaved, each turn's history growing."""
    out = []
    for t in range(turns):
        for c in range(n_convs):
            history: list[dict[str, Any]] = []
            for prev in range(t):
                history += [{"role": "user", "content": f"q{prev}"},
                            {"role": "assistant", "content": f"a{prev}"}]
            history.append({"role": "user", "content": f"q{t}"})
            out.append(record(request_id=f"c{c}-t{t}", conversation_id=f"conv-{c}",
                              messages=history, answer=f"a{t}"))
    return out


def check_exactly_once_in_order(state: AnalyticsState, records: list[Any], path: str) -> None:
    by_key = state.by_key(path)
    assert set(by_key) == {idempotency_key(r) for r in records}
    assert all(len(got) == 1 for got in by_key.values()), "a record arrived twice"
    seen: dict[str, list[str]] = {}
    for got in state.on(path):
        body = got.body
        conv = body["id"] if path == "/conversations" else body["conversation_id"]
        rid = body["properties"]["request_id"] if path == "/conversations" else body[
            "request_id"]
        seen.setdefault(conv, []).append(rid)
    for conv, rids in seen.items():
        assert rids == sorted(rids, key=lambda r: int(r.split("-t")[1])), conv


async def test_batched_webhook_delivers_each_record_once_in_order_through_faults(
        analytics: tuple[str, AnalyticsState], tmp_path: Path) -> None:
    url, state = analytics
    config = make_config(tmp_path, url, webhook=True, batch=8)
    config = config.model_copy(update={"analytics": config.analytics.model_copy(
        update={"sinks": config.analytics.sinks[1:]})})  # the webhook alone
    mirror = build(config)
    await mirror.start()
    records = conversation_turns(12, 4)
    try:
        state.faults.fail_next(3, 500)
        for rec in records:
            mirror.exchange_finished(rec)
        await eventually(lambda: len(state.by_key("/hook")) >= len(records))
    finally:
        await mirror.stop()
    assert state.refused == 3
    assert max(state.batches) > 1 and max(state.batches) <= 8
    assert all(r.headers["x-gateway-batch"] == str(len(orjson.loads(r.raw)))
               for r in state.on("/hook"))
    check_exactly_once_in_order(state, records, "/hook")


async def test_batches_fill_up_while_one_is_in_flight(
        analytics: tuple[str, AnalyticsState], tmp_path: Path) -> None:
    """A lone record goes at once; the records that arrive while its POST is in flight go
    together in the next one, not one POST per outbox write."""
    url, state = analytics
    state.delay = 0.4
    config = make_config(tmp_path, url, webhook=True, batch=8)
    config = config.model_copy(update={"analytics": config.analytics.model_copy(
        update={"sinks": config.analytics.sinks[1:]})})  # the webhook alone
    box = WatchedSpool(tmp_path / "outbox", ["hook"])
    mirror = Mirror(config, box, make_sinks(config.analytics.sinks), backoff=FAST,
                    poll_interval=0.05)
    await mirror.start()
    records = [record(request_id=f"c{i}-t0", conversation_id=f"conv-{i}") for i in range(8)]
    try:
        started = time.monotonic()
        for rec in records:  # one outbox write each, the first one's POST already sent
            mirror.exchange_finished(rec)
            assert await asyncio.wait_for(box.writes.get(), 5) == 1
        await eventually(lambda: len(state.by_key("/hook")) >= len(records))
        elapsed = time.monotonic() - started
    finally:
        await mirror.stop()
    assert state.batches == [1, 7]
    assert elapsed < 1.2  # two POSTs one after the other, not eight
    check_exactly_once_in_order(state, records, "/hook")


async def test_deliveries_do_not_stall_between_rounds(
        analytics: tuple[str, AnalyticsState], tmp_path: Path) -> None:
    """More records than the delivery concurrency: each finished delivery starts the next at
    once (a worker that waited for its poll interval between rounds took seconds here)."""
    url, state = analytics
    config = make_config(tmp_path, url)
    mirror = Mirror(config, make_outbox(config, None), make_sinks(config.analytics.sinks),
                    backoff=FAST, poll_interval=1.0, concurrency=4)
    await mirror.start()
    records = [record(request_id=f"r{i}") for i in range(40)]
    started = time.monotonic()
    try:
        for rec in records:
            mirror.exchange_finished(rec)
        await eventually(lambda: len(state.by_key("/conversations")) == len(records), within=20)
    finally:
        await mirror.stop()
    # 10 rounds of 4: with a stall of one poll interval per round this takes over 9 s
    assert time.monotonic() - started < 5.0


@pytest.mark.parametrize("store", ["memory", pytest.param("redis", marks=pytest.mark.redis)])
async def test_faults_then_recovery_deliver_everything_once_in_order(
        store: str, analytics: tuple[str, AnalyticsState], tmp_path: Path,
        request: pytest.FixtureRequest) -> None:
    url, state = analytics
    ns = None
    if store == "redis":
        ns = connect(request.getfixturevalue("redis_proc").url, "test")
        await ns.client.flushall()
    config = make_config(tmp_path, url, store="memory", webhook=True)
    metrics = Metrics(CollectorRegistry())
    mirror = build(config, ns, metrics)
    await mirror.start()
    records = conversation_turns(5, 6)
    try:
        state.faults.fail_next(30, 500)  # more than one per delivery: retries fail too
        for i, rec in enumerate(records):
            mirror.exchange_finished(rec)
            if i == 10:
                await eventually(lambda: state.faults.next_n == 0)  # the 500s were all served
                state.faults.fail_next(6, 500, hang=1.5)  # past the sink's 1 s timeout
            if i == 20:
                await eventually(lambda: state.faults.next_n == 0)  # the hangs were all served
                state.faults.fail_next(4, 429)
        await eventually(lambda: len(state.by_key("/conversations")) == len(records)
                         and len(state.by_key("/hook")) == len(records), within=20)
    finally:
        await mirror.stop()
        if ns is not None:
            await ns.client.aclose()
    assert state.refused > 0 and state.hung == 6  # 500s, timeouts and 429s
    check_exactly_once_in_order(state, records, "/conversations")
    check_exactly_once_in_order(state, records, "/hook")
    # the last upsert of each conversation holds its full history plus the answer
    last = state.conversations["conv-3"]["messages"]
    assert [m["content"] for m in last][-3:] == ["a4", "q5", "a5"]
    r = metrics.registry
    assert r.get_sample_value("gateway_outbox_deliveries_total",
                              {"sink": "ink", "result": "delivered"}) == len(records)
    assert (r.get_sample_value("gateway_outbox_deliveries_total",
                               {"sink": "ink", "result": "retried"}) or 0) > 0


async def test_refused_and_expired_records_are_dead_lettered_then_replayed(
        analytics: tuple[str, AnalyticsState], tmp_path: Path) -> None:
    url, state = analytics
    mirror = build(make_config(tmp_path, url, key="wrong-key"))
    await mirror.start()
    try:
        mirror.exchange_finished(record(request_id="refused"))  # 401: dead at once
        await until_dead(mirror.outbox, 1)
    finally:
        await mirror.stop()
    mirror = build(make_config(tmp_path, url, dead_letter_after=0.3))
    await mirror.start()
    try:
        [refused] = await mirror.outbox.list_dead()
        assert refused.key == "gw-refused" and "401" in refused.reason
        state.faults.fail_for(30, 503)
        mirror.exchange_finished(record(request_id="expired"))  # 503 for longer than 0.3 s
        await until_dead(mirror.outbox, 2)
        reasons = {d.key: d.reason for d in await mirror.outbox.list_dead()}
        assert reasons["gw-expired"].startswith("kept failing")
        assert state.accepted == [] and await mirror.outbox.depth() == {"ink": 0}
        state.faults.clear()
        assert await mirror.outbox.replay_dead() == 2
        await eventually(lambda: len(state.by_key("/conversations")) == 2)
    finally:
        await mirror.stop()
    assert set(state.by_key("/conversations")) == {"gw-refused", "gw-expired"}


async def until_dead(outbox: Outbox, n: int) -> None:
    async def enough() -> bool:
        return len(await outbox.list_dead()) >= n

    await eventually(enough, within=5.0)


async def test_the_spool_survives_a_restart(
        analytics: tuple[str, AnalyticsState], tmp_path: Path) -> None:
    url, state = analytics
    config = make_config(tmp_path, url, shutdown_grace=0.2)
    state.faults.fail_for(60, 500)
    first = build(config)
    await first.start()
    records = [record(request_id=f"s{i}") for i in range(20)]
    for rec in records:
        first.exchange_finished(rec)
    await first.stop()  # nothing could be delivered: everything stays in the spool
    assert state.accepted == []
    state.faults.clear()
    second = build(config)  # a new process on the same directory
    await second.start()
    try:
        await eventually(lambda: len(state.by_key("/conversations")) == 20)
    finally:
        await second.stop()
    assert all(len(v) == 1 for v in state.by_key("/conversations").values())
    assert await build(config).outbox.depth() == {"ink": 0}


async def test_accepting_never_waits_on_a_sink(
        analytics: tuple[str, AnalyticsState], tmp_path: Path) -> None:
    url, state = analytics
    state.faults.fail_for(60, 500, hang=5)
    mirror = build(make_config(tmp_path, url, shutdown_grace=0.1))
    await mirror.start()
    started = time.perf_counter()
    for i in range(2000):
        mirror.exchange_finished(record(request_id=f"n{i}"))
    elapsed = time.perf_counter() - started
    await mirror.stop()
    assert elapsed < 0.5  # ~ tens of microseconds per record
    again = build(make_config(tmp_path, url))
    assert await again.outbox.depth() == {"ink": 2000}
    await again.outbox.close()


@pytest.mark.redis
async def test_records_a_crashed_replica_claimed_are_delivered_by_another(
        analytics: tuple[str, AnalyticsState], tmp_path: Path, redis_url: str) -> None:
    url, state = analytics
    config = make_config(tmp_path, url, claim_idle_seconds=0.3)
    dead_ns, live_ns = connect(redis_url, "test"), connect(redis_url, "test")
    try:
        crashed = RedisOutbox(dead_ns, ["ink"], claim_idle_seconds=0.3)
        records = [record(request_id=f"x{i}") for i in range(5)]
        await crashed.put([(orjson.dumps(r.to_dict()), idempotency_key(r))
                                for r in records])
        assert len(await crashed.claim("ink", 10, "replica-that-died")) == 5  # never acked
        box = WatchedRedisOutbox(live_ns, ["ink"], claim_idle_seconds=0.3)
        survivor = Mirror(config, box, make_sinks(config.analytics.sinks), backoff=FAST,
                          poll_interval=0.05)
        await survivor.start()
        try:
            # the survivor's first look: there, but not idle long enough to be taken yet
            assert await asyncio.wait_for(box.claims.get(), 5) == 0
            assert state.accepted == []
            await eventually(lambda: len(state.by_key("/conversations")) == 5)
        finally:
            await survivor.stop()
        assert await RedisOutbox(live_ns, ["ink"]).depth() == {"ink": 0}
    finally:
        await dead_ns.client.aclose()
        await live_ns.client.aclose()
