"""How fast a coalesced waiter on the Redis cache store wakes, and what it costs Redis:
the store's shared poller against one pub/sub subscription per waiter.

    .venv/bin/python bench/cache_wait.py [--waiters 19] [--trials 3]

Starts a private redis-server, locks a key, lets a leader store the entry after 50 ms, 500 ms
and 2 s, and prints each variant's wake latency after the leader's write (p50, max), the Redis
commands per trial and the connections opened. The numbers behind the choice documented in
gateway/stores/cache.py.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable

import redis.asyncio as aioredis

from gateway.stores.cache import RedisCacheStore
from gateway.stores.redis_base import RedisNamespace
from gateway.testing.redis_server import redis_server

Trial = Callable[[str], Awaitable[list[float]]]


async def poll_trial(store: RedisCacheStore, key: str, leader_ms: int, waiters: int
                     ) -> list[float]:
    assert await store.lock(key, 10)
    written: list[float] = []

    async def leader() -> None:
        await asyncio.sleep(leader_ms / 1000)
        await store.set(key, b"v", 10)
        store.unlock(key)
        written.append(time.perf_counter())

    async def waiter() -> float:
        assert await store.wait(key, 5) == b"v"
        return time.perf_counter()

    task = asyncio.create_task(leader())
    ends = await asyncio.gather(*(waiter() for _ in range(waiters)))
    await task
    return [(end - written[0]) * 1000 for end in ends]


async def pubsub_trial(client: aioredis.Redis, key: str, leader_ms: int, waiters: int
                       ) -> list[float]:
    channel, value_key = f"ch:{key}", f"v:{key}"
    await client.set(f"lock:{key}", b"1", nx=True, px=10_000)
    written: list[float] = []

    async def leader() -> None:
        await asyncio.sleep(leader_ms / 1000)
        await client.set(value_key, b"v", px=10_000)
        await client.delete(f"lock:{key}")
        await client.publish(channel, b"1")
        written.append(time.perf_counter())

    async def waiter() -> float:
        pubsub = client.pubsub()
        await pubsub.subscribe(channel)
        try:
            value = await client.get(value_key)
            while value is None:
                if await pubsub.get_message(ignore_subscribe_messages=True, timeout=5):
                    value = await client.get(value_key)
            return time.perf_counter()
        finally:
            await pubsub.aclose()  # type: ignore[no-untyped-call]

    task = asyncio.create_task(leader())
    ends = await asyncio.gather(*(waiter() for _ in range(waiters)))
    await task
    return [(end - written[0]) * 1000 for end in ends]


async def measure(url: str, waiters: int, trials: int) -> None:
    client = aioredis.Redis.from_url(url, max_connections=waiters * 4)
    store = RedisCacheStore(RedisNamespace(client, "bench"), 1 << 20)
    try:
        for leader_ms in (50, 500, 2000):
            variants: dict[str, Trial] = {
                "poll": lambda key: poll_trial(store, key, leader_ms, waiters),  # noqa: B023
                "pubsub": lambda key: pubsub_trial(client, key, leader_ms, waiters),  # noqa: B023
            }
            for name, trial in variants.items():
                before = await client.info("stats")
                latencies: list[float] = []
                for i in range(trials):
                    latencies += await trial(f"{name}:{leader_ms}:{i}")
                after = await client.info("stats")
                commands = after["total_commands_processed"] - before["total_commands_processed"]
                conns = after["total_connections_received"] - before["total_connections_received"]
                print(f"leader {leader_ms:5d} ms  {name:6s}  wake p50 "
                      f"{statistics.median(latencies):6.2f} ms  max {max(latencies):6.2f} ms  "
                      f"commands/trial {commands / trials:6.0f}  new connections {conns}")
    finally:
        await client.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--waiters", type=int, default=19)
    parser.add_argument("--trials", type=int, default=3)
    args = parser.parse_args()
    with redis_server() as server:
        asyncio.run(measure(server.url, args.waiters, args.trials))


if __name__ == "__main__":
    main()
