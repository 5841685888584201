"""One contract suite for `UsageStore`: in-process, in-process with its shared file, Redis."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import date
from pathlib import Path

import pytest

from gateway.stores.redis_base import connect
from gateway.stores.usage import (
    MemoryUsageStore,
    RedisUsageStore,
    UsageDelta,
    UsageStore,
    read_usage_file,
)

D1, D2, D3 = date(2026, 11, 1), date(2026, 11, 2), date(2026, 11, 3)


@pytest.fixture(params=["memory", "file", pytest.param("redis", marks=pytest.mark.redis)])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[UsageStore]:
    if request.param == "memory":
        yield MemoryUsageStore()
        return
    if request.param == "file":
        yield MemoryUsageStore(tmp_path / "var" / "usage.jsonl")
        return
    ns = connect(request.getfixturevalue("redis_proc").url, "test")
    await ns.client.flushall()
    try:
        yield RedisUsageStore(ns)
    finally:
        await ns.client.aclose()


def delta(day: date = D1, team: str = "alpha", key: str = "k1", model: str = "qa",
          **counts: int) -> UsageDelta:
    return UsageDelta(day, team, key, model, **counts)


async def test_increments_add_up_per_cell(store: UsageStore) -> None:
    await store.add([delta(requests=1, prompt_tokens=10, completion_tokens=5)])
    await store.add([delta(requests=2, prompt_tokens=3, errors=1, cached=1, estimated=1),
                     delta(model="rag", requests=1, completion_tokens=7)])
    rows = await store.query("alpha", D1, D1)
    assert rows == [
        delta(requests=3, prompt_tokens=13, completion_tokens=5, errors=1, cached=1,
              estimated=1),
        delta(model="rag", requests=1, completion_tokens=7),
    ]


async def test_repeated_cells_in_one_batch_are_summed(store: UsageStore) -> None:
    await store.add([delta(requests=1, prompt_tokens=2)] * 5)
    assert await store.query(None, D1, D1) == [delta(requests=5, prompt_tokens=10)]


async def test_query_filters_team_and_day_range(store: UsageStore) -> None:
    await store.add([delta(D1, requests=1), delta(D2, requests=2), delta(D3, requests=3),
                     delta(D2, team="beta", key="k9", requests=4)])
    assert [(r.day, r.team, r.requests) for r in await store.query(None, D2, D3)] == [
        (D2, "alpha", 2), (D2, "beta", 4), (D3, "alpha", 3)]
    assert [r.requests for r in await store.query("alpha", D1, D2)] == [1, 2]
    assert await store.query("gamma", D1, D3) == []
    assert await store.query(None, date(2026, 12, 1), date(2026, 12, 31)) == []


async def test_keys_are_kept_apart(store: UsageStore) -> None:
    await store.add([delta(key="k1", requests=1), delta(key="k2", requests=2)])
    rows = await store.query("alpha", D1, D1)
    assert {(r.key_id, r.requests) for r in rows} == {("k1", 1), ("k2", 2)}


async def test_empty_add_is_a_no_op(store: UsageStore) -> None:
    await store.add([])
    assert await store.query(None, D1, D3) == []


async def test_file_is_shared_by_processes_and_skips_a_torn_line(tmp_path: Path) -> None:
    path = tmp_path / "usage.jsonl"
    one, two = MemoryUsageStore(path), MemoryUsageStore(path)
    await one.add([delta(requests=1, prompt_tokens=4)])
    await two.add([delta(requests=1, prompt_tokens=6)])
    with path.open("ab") as f:
        f.write(b'{"day":"2026-11-01","team":"alpha","key_id":"k1","model":"qa","requ')
    assert await MemoryUsageStore(path).query("alpha", D1, D1) == [
        delta(requests=2, prompt_tokens=10)]
    assert len(read_usage_file(path)) == 2


@pytest.mark.redis
async def test_redis_add_is_one_pipeline_round_trip(redis_url: str) -> None:
    ns = connect(redis_url, "test")
    try:
        store = RedisUsageStore(ns)
        calls: list[int] = []
        real = ns.client.pipeline

        def counting(*args: object, **kw: object) -> object:
            pipe = real(*args, **kw)  # type: ignore[arg-type]
            execute = pipe.execute

            async def run(*a: object, **k: object) -> object:
                calls.append(len(pipe.command_stack))
                return await execute(*a, **k)  # type: ignore[arg-type]

            pipe.execute = run  # type: ignore[assignment,method-assign]
            return pipe

        ns.client.pipeline = counting  # type: ignore[assignment,method-assign]
        await store.add([delta(team=f"t{i}", requests=1, prompt_tokens=i) for i in range(50)])
        assert len(calls) == 1 and calls[0] > 50
        keys = await ns.client.keys("*")
        assert all(b"{" in k for k in keys)  # every key carries a hash tag
    finally:
        await ns.client.aclose()
