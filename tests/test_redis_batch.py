"""The Redis seam on a real redis-server: the blocking pool under a burst, hiredis packing,
and auto-pipelining (one pipeline per loop turn, NOSCRIPT recovery, errors, cancellation)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.asyncio.connection import Connection
from redis.exceptions import RedisError, ResponseError

from gateway.stores.redis_base import PackedConnection, connect
from gateway.stores.redis_batch import Batcher
from gateway.testing.redis_server import redis_server

pytestmark = pytest.mark.redis

ECHO = "return {KEYS[1], ARGV[1]}"


def test_hiredis_packing_matches_redis_py() -> None:
    plain, packed = Connection(), PackedConnection()
    for args in [("SET", "k", "é", "PX", 1500), ("EVALSHA", "abc", 1, b"k", 1.5, -3, 10**12),
                 ("SCRIPT LOAD", "return 1"), (b"CONFIG GET", b"maxmemory")]:
        assert packed.pack_command(*args) == [b"".join(plain.pack_command(*args))]


async def test_a_burst_beyond_the_pool_waits_for_connections(redis_url: str) -> None:
    """redis-py's default pool raises MaxConnectionsError past its size; ours waits."""
    ns = connect(redis_url, "test", max_connections=4)
    try:
        results = await asyncio.gather(*(ns.client.incr("n") for _ in range(300)))
        assert sorted(results) == list(range(1, 301))
    finally:
        await ns.aclose()


class Counting(Batcher):
    def __init__(self, client: aioredis.Redis) -> None:
        super().__init__(client)
        self.pipelines: list[int] = []

    async def _execute(self, calls: list[Any]) -> list[Any]:
        self.pipelines.append(len(calls))
        return await super()._execute(calls)


async def test_calls_of_one_loop_turn_share_one_pipeline(redis_url: str) -> None:
    ns = connect(redis_url, "test")
    batch = Counting(ns.client)
    script = ns.client.register_script(ECHO)
    try:
        replies = await asyncio.gather(*(batch.run_script(script, [f"k{i}"], [i])
                                         for i in range(100)))
        assert replies == [[f"k{i}".encode(), str(i).encode()] for i in range(100)]
        # the first pipeline found the script missing: it was loaded and those calls re-sent
        assert batch.pipelines == [100, 100]
        batch.pipelines.clear()
        assert await batch.call("SET", "a", "1") is True
        assert await batch.call("GET", "a") == b"1"
        assert batch.pipelines == [1, 1]
    finally:
        await ns.aclose()


async def test_a_flushed_script_is_loaded_again(redis_url: str) -> None:
    ns = connect(redis_url, "test")
    script = ns.client.register_script(ECHO)
    try:
        assert await ns.batch.run_script(script, ["a"], [1]) == [b"a", b"1"]
        await ns.client.script_flush()
        assert await ns.batch.run_script(script, ["b"], [2]) == [b"b", b"2"]
    finally:
        await ns.aclose()


async def test_errors_reach_their_own_callers_only(redis_url: str) -> None:
    ns = connect(redis_url, "test")
    failures: list[BaseException] = []
    try:
        await ns.client.set("text", "not a number")
        good = ns.batch.call("INCR", "counter")
        bad = ns.batch.call("INCR", "text")
        ns.batch.cast("INCR", "text", failed=failures.append)
        assert await good == 1
        with pytest.raises(ResponseError):
            await bad
        await ns.batch.drain()
        assert len(failures) == 1 and isinstance(failures[0], ResponseError)
    finally:
        await ns.aclose()


async def test_a_dead_server_fails_every_call_of_the_batch() -> None:
    ns = connect("redis://127.0.0.1:1/0", "test", timeout=0.5)
    try:
        calls = [ns.batch.call("GET", "k") for _ in range(3)]
        for call in calls:
            with pytest.raises((RedisError, OSError)):
                await call
    finally:
        await ns.aclose()


async def test_a_reply_for_a_cancelled_caller_goes_to_abandoned(redis_url: str) -> None:
    ns = connect(redis_url, "test")
    abandoned: list[Any] = []
    try:
        waiting = asyncio.ensure_future(ns.batch.call("INCR", "n", abandoned=abandoned.append))
        await asyncio.sleep(0)  # one loop turn, not a wait: the batch's task sends the call
        waiting.cancel()
        await ns.batch.drain()
        assert abandoned == [1]  # the command ran: the callback may undo it
    finally:
        await ns.aclose()


async def test_pooled_connections_survive_a_redis_restart() -> None:
    """Connections pooled before a restart are dead: the first command on each is retried
    once on a new connection instead of failing the request that drew it."""
    with redis_server() as server:
        ns = connect(server.url, "test", max_connections=4)
        try:
            script = ns.client.register_script(ECHO)
            await asyncio.gather(*(ns.client.incr("n") for _ in range(8)))  # fill the pool
            assert await ns.batch.call("INCR", "n") == 9
            assert await ns.batch.run_script(script, ["a"], [1]) == [b"a", b"1"]
            server.start_again()  # empty again: nothing saved, no script loaded
            assert await ns.batch.call("INCR", "n") == 1  # a pipeline on a dead connection
            assert await ns.batch.run_script(script, ["b"], [2]) == [b"b", b"2"]
            assert sorted(await asyncio.gather(*(ns.client.incr("n") for _ in range(8)))) \
                == list(range(2, 10))
        finally:
            await ns.aclose()
