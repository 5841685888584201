"""Analytics delivery through a Redis outage with a real `gateway serve` and a real
redis-server: every exchange reaches the sink exactly once, whether Redis was away when the
exchange finished, came back empty, or the gateway was killed while records waited in its
local spool."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.stores.fallback_outbox import FORWARD, FallbackOutbox
from gateway.stores.outbox import RedisOutbox
from gateway.stores.redis_base import connect
from gateway.stores.spool import SpoolOutbox
from gateway.testing.configs import config_yaml, static_key
from gateway.testing.fake_analytics import AnalyticsState, create_fake_analytics_app
from gateway.testing.fake_inkeep import create_fake_inkeep_app
from gateway.testing.process import run_gateway
from gateway.testing.redis_server import RedisServer, redis_server
from gateway.testing.server import run_server
from tests.eventually import eventually

pytestmark = [pytest.mark.slow, pytest.mark.redis]

KEY = "sk-outbox-incidents"


@pytest.fixture
async def upstreams() -> AsyncIterator[tuple[str, str, AnalyticsState]]:
    sink = create_fake_analytics_app()
    async with run_server(create_fake_inkeep_app()) as inkeep, run_server(sink) as hook:
        yield inkeep, hook, sink.state.analytics


@pytest.fixture
def redis() -> Any:
    with redis_server() as server:
        yield server


def write_config(tmp_path: Path, redis: RedisServer, inkeep: str, hook: str) -> Path:
    path = tmp_path / "gateway.yaml"
    path.write_text(config_yaml(
        store=redis.url,
        backends={"inkeep": {"kind": "inkeep", "base_url": f"{inkeep}/v1",
                             "requires_key": False}},
        models={"qa": {"backend": "inkeep"}},
        keys=[static_key(KEY, id="t", team="alpha")],
        sinks=[{"name": "hook", "kind": "webhook", "url": f"{hook}/hook"}],
        extra={"server": {"log_level": "warning"},
               "analytics": {"outbox": {"spool_dir": str(tmp_path / "outbox"),
                                        "claim_idle_seconds": 1}}}))
    return path


async def ask(client: httpx.AsyncClient, url: str, request_id: str) -> None:
    reply = await client.post(f"{url}/v1/chat/completions",
                              headers={"authorization": f"Bearer {KEY}",
                                       "x-request-id": request_id},
                              json={"model": "qa", "messages": [
                                  {"role": "user", "content": f"question {request_id}"}]})
    assert reply.status_code == 200, reply.text


def delivered(state: AnalyticsState) -> Counter[str]:
    return Counter(r.body["request_id"] for r in state.on("/hook"))


async def test_redis_away_then_back_empty_loses_nothing_and_repeats_nothing(
        tmp_path: Path, redis: RedisServer, upstreams: tuple[str, str, AnalyticsState]) -> None:
    inkeep, hook, sink = upstreams
    sent: list[str] = []
    with run_gateway(write_config(tmp_path, redis, inkeep, hook)) as gateway:
        async with httpx.AsyncClient(timeout=30) as client:
            for i in range(20):  # Redis up
                sent.append(f"up-{i}")
                await ask(client, gateway.url, sent[-1])
            await asyncio.to_thread(redis.stop)
            for i in range(20):  # Redis away: answered, spooled locally
                sent.append(f"away-{i}")
                await ask(client, gateway.url, sent[-1])
            await asyncio.to_thread(redis.start_again)  # back, and empty
            for i in range(20):
                sent.append(f"back-{i}")
                await ask(client, gateway.url, sent[-1])
            await eventually(lambda: set(delivered(sink)) >= set(sent), within=30)
        log = gateway.log()
    counts = delivered(sink)
    assert sorted(counts) == sorted(sent)
    assert [rid for rid, n in counts.items() if n > 1] == []
    assert "NOGROUP" not in log


async def test_records_spooled_by_a_killed_gateway_are_delivered_by_the_next(
        tmp_path: Path, redis: RedisServer, upstreams: tuple[str, str, AnalyticsState]) -> None:
    inkeep, hook, sink = upstreams
    config = write_config(tmp_path, redis, inkeep, hook)
    sent = [f"spooled-{i}" for i in range(15)]
    with run_gateway(config) as gateway:
        await asyncio.to_thread(redis.stop)
        async with httpx.AsyncClient(timeout=30) as client:
            for request_id in sent:
                await ask(client, gateway.url, request_id)

        def spooled() -> bool:  # the put lines are in the spool file
            files = list((tmp_path / "outbox" / "redis-fallback").glob("outbox-*.log"))
            return sum(f.read_bytes().count(b'"op":"put"') for f in files) >= len(sent)

        await eventually(spooled, within=10)
        gateway.kill()
    await asyncio.to_thread(redis.start_again)
    with run_gateway(config):
        await eventually(lambda: set(delivered(sink)) >= set(sent), within=30)
    counts = delivered(sink)
    assert sorted(counts) == sorted(sent)
    assert max(counts.values()) == 1


async def test_a_queue_lost_by_redis_is_put_back_without_what_is_held(
        tmp_path: Path, redis: RedisServer) -> None:
    """Redis comes back empty while this process holds some records and others wait in
    the stream: the waiting ones are put back once, the held ones are not."""
    ns = connect(redis.url, "t")
    box = FallbackOutbox(RedisOutbox(ns, ["a", "b"]), SpoolOutbox(tmp_path, [FORWARD]))
    try:
        await box.start()
        await box.put([(b'{"n":%d}' % i, f"k{i}") for i in range(6)])
        held = await box.claim("a", 2, "c1")
        done = await box.claim("b", 6, "c1")
        await box.ack(done)  # sink b has everything: nothing of it is owed
        await ns.client.flushall()  # the restart that lost everything
        again = await box.claim("a", 10, "c1")
        assert [i.key for i in again] == ["k2", "k3", "k4", "k5"]
        assert await box.claim("b", 10, "c1") == []
        await box.ack(held + again)  # held ones are delivered by their worker as before
        assert await box.depth() == {"a": 0, "b": 0}
    finally:
        await box.close()
        await ns.aclose()


async def test_records_waiting_in_the_spool_are_pending_for_every_sink(
        tmp_path: Path, redis: RedisServer) -> None:
    spool = SpoolOutbox(tmp_path, [FORWARD])  # what a process left while Redis was away
    await spool.put([(b'{"n":1}', "k1")])
    [spooled_at] = (await spool.oldest_pending()).values()
    await spool.close()
    ns = connect(redis.url, "t")
    box = FallbackOutbox(RedisOutbox(ns, ["a", "b"]), SpoolOutbox(tmp_path, [FORWARD]))
    try:  # not started: nothing forwarded yet
        await box.put([(b'{"n":2}', "k2")], ["a"])
        assert await box.oldest_pending() == {"a": spooled_at, "b": spooled_at}
        assert await box.depth() == {"a": 2, "b": 1}
    finally:
        await box.close()
        await ns.aclose()
