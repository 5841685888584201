"""Micro-benchmark: gateway CPU per limit check on Redis, by how the command is sent.

50 concurrent callers each run the real ``limits_acquire`` script (four GCRA buckets and a
concurrency lease, as in ``make bench``'s Redis variant) against a throw-away redis-server:

* ``one at a time``: ``await script(keys=..., args=...)`` per call, redis-py's default;
* ``auto-pipelined``: `gateway.stores.redis_batch.Batcher`, what the gateway does;

each with redis-py's Python command packing and with hiredis packing (`PackedConnection`).
CPU is this process's (``time.process_time``), so redis-server's own work is not in it.

    .venv/bin/python bench/redis_calls.py
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import redis.asyncio as aioredis  # noqa: E402
from redis.asyncio.connection import Connection  # noqa: E402

from gateway.stores.limits import (  # noqa: E402
    AcquireRequest,
    Bucket,
    Concurrency,
    RedisLimitStore,
)
from gateway.stores.redis_base import PackedConnection, RedisNamespace  # noqa: E402
from gateway.testing.redis_server import redis_server  # noqa: E402

CALLERS = 50
CALLS = 10_000
HUGE = 10**9


def request(i: int) -> AcquireRequest:
    buckets = (Bucket("key_rpm", "k:bench:rpm", "requests", HUGE),
               Bucket("key_tpm", "k:bench:tpm", "tokens", HUGE),
               Bucket("team_rpm", "t:rpm", "requests", HUGE),
               Bucket("team_tpm", "t:tpm", "tokens", HUGE))
    return AcquireRequest("bench", buckets, (), Concurrency("c:bench", 100_000, 360.0),
                          f"lease-{i}", tokens=100)


async def measure(url: str, connection_class: type[Connection], batched: bool) -> float:
    pool = aioredis.BlockingConnectionPool.from_url(url, max_connections=64, timeout=2)
    pool.connection_class = connection_class
    ns = RedisNamespace(aioredis.Redis.from_pool(pool), "bench")
    script = ns.script("limits_acquire")
    store = RedisLimitStore(ns)

    async def direct(req: AcquireRequest) -> None:
        keys = [ns.key("lim:bench", b.scope) for b in req.buckets] + [
            ns.key("lim:bench", "c:bench")]
        args: list[int | str] = [4, 0, 1, req.lease, 360_000, 100_000, ""]
        for b in req.buckets:
            args += [b.limit, req.cost(b)]
        await script(keys=keys, args=args)

    call = store.acquire if batched else direct

    async def caller(offset: int) -> None:
        for i in range(offset, CALLS, CALLERS):
            await call(request(i))

    await asyncio.gather(*(caller(i) for i in range(CALLERS)))  # warm-up, script loaded
    started = time.process_time()
    await asyncio.gather(*(caller(i) for i in range(CALLERS)))
    spent = time.process_time() - started
    await ns.client.flushall()
    await ns.aclose()
    return spent / CALLS * 1e6


async def main(url: str) -> None:
    print(f"{CALLERS} concurrent callers, {CALLS:,} limit checks each way")
    for batched in (False, True):
        for cls, packing in ((Connection, "python packing"), (PackedConnection, "hiredis")):
            mode = "auto-pipelined" if batched else "one at a time"
            us = await measure(url, cls, batched)
            print(f"  {mode:<15} {packing:<15} {us:7.1f} µs CPU per check")


if __name__ == "__main__":
    with redis_server() as server:
        asyncio.run(main(server.url))
