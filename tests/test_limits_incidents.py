"""Rate limits through a store incident, with real `gateway serve` processes and a real
redis-server: a key of rpm 60 under 50 requests per second for 5 s, Redis killed at 1.5 s and
back empty at 3 s, failing open. The limit allows 60 + 5 requests in that window; the
gateway may admit at most 1.5 times that, with one replica or three."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
import redis.asyncio as aioredis

from gateway.testing.configs import config_yaml, static_key
from gateway.testing.fake_inkeep import create_fake_inkeep_app
from gateway.testing.process import run_gateways
from gateway.testing.redis_server import RedisServer, redis_server
from gateway.testing.server import run_server
from tests.eventually import eventually

pytestmark = [pytest.mark.slow, pytest.mark.redis]

KEY = "sk-limits-incidents"
RPM = 60
RATE = 50  # requests per second, spread over the replicas
SECONDS = 5.0
KILLED_AT, BACK_AT = 1.5, 3.0
ALLOWED = RPM + RPM * SECONDS / 60


@pytest.fixture
async def upstream() -> AsyncIterator[str]:
    async with run_server(create_fake_inkeep_app()) as url:
        yield url


@pytest.fixture
def redis() -> Iterator[RedisServer]:
    with redis_server() as server:
        yield server


async def load(replicas: list[str], redis: RedisServer) -> list[int]:
    """`RATE` requests a second for `SECONDS`, round robin; Redis dies and comes back empty
    on the way. The statuses, in order."""
    async with httpx.AsyncClient(timeout=30) as client:
        async def one(i: int, at: float) -> int:
            await asyncio.sleep(max(0.0, at - time.monotonic()))
            reply = await client.post(
                f"{replicas[i % len(replicas)]}/v1/chat/completions",
                headers={"authorization": f"Bearer {KEY}"},
                json={"model": "qa", "max_tokens": 8,
                      "messages": [{"role": "user", "content": f"q{i}"}]})
            return reply.status_code

        async def incident(start: float) -> None:
            await asyncio.sleep(max(0.0, start + KILLED_AT - time.monotonic()))
            await asyncio.to_thread(redis.stop)
            await asyncio.sleep(max(0.0, start + BACK_AT - time.monotonic()))
            await asyncio.to_thread(redis.start_again)  # empty: it keeps nothing on disk

        start = time.monotonic()
        requests = [one(i, start + i / RATE) for i in range(int(RATE * SECONDS))]
        statuses = await asyncio.gather(incident(start), *requests)
    return [s for s in statuses if s is not None]


@pytest.mark.parametrize("replicas", [1, 3])
async def test_an_outage_does_not_hand_out_fresh_bursts(
        tmp_path: Path, redis: RedisServer, upstream: str, replicas: int) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text(config_yaml(
        store=redis.url,
        backends={"inkeep": {"kind": "inkeep", "base_url": f"{upstream}/v1",
                             "requires_key": False}},
        models={"qa": {"backend": "inkeep"}},
        keys=[static_key(KEY, id="burst", team="alpha", rpm=RPM)],
        extra={"server": {"log_level": "warning"}}))
    with run_gateways(config, replicas) as gateways:
        client = aioredis.Redis.from_url(redis.url)
        try:  # every replica has said it is live, so each knows its share
            await eventually(lambda: _live(client, replicas), within=10)
        finally:
            await client.aclose()
        statuses = await load([g.url for g in gateways], redis)
    admitted = statuses.count(200)
    assert set(statuses) <= {200, 429}, statuses
    assert RPM <= admitted <= 1.5 * ALLOWED, admitted


async def _live(client: aioredis.Redis, replicas: int) -> bool:
    return bool(await client.zcard("gw:{replicas}:live") >= replicas)
