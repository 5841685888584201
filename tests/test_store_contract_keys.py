"""One contract suite for `KeyStore`, run against the file-backed and the Redis store."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.stores.keys import (
    KeyRecord,
    KeyStore,
    MemoryKeyStore,
    ModelLimit,
    RedisKeyStore,
    TeamRecord,
)
from gateway.stores.redis_base import connect


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[KeyStore]:
    if request.param == "memory":
        yield MemoryKeyStore(tmp_path / "keys.json")
        return
    # the `redis_url` fixture, inlined: async fixtures cannot be requested dynamically
    ns = connect(request.getfixturevalue("redis_proc").url, "test")
    await ns.client.flushall()
    try:
        yield RedisKeyStore(ns)
    finally:
        await ns.client.aclose()


def record(key_id: str = "abc", team: str = "alpha", **kw: object) -> KeyRecord:
    return KeyRecord(id=key_id, team=team, hash="0" * 64, created=1000.0, **kw)  # type: ignore[arg-type]


async def test_put_get_round_trip(store: KeyStore) -> None:
    rec = record(name="ci", models=("qa", "rag"), rpm=5, tpm=100, max_concurrent=2,
                 expires=2000.0)
    await store.put_key(rec)
    assert await store.get_key("abc") == rec
    assert await store.get_key("nope") is None


async def test_list_by_team(store: KeyStore) -> None:
    await store.put_key(record("b1", "beta"))
    await store.put_key(record("a1", "alpha"))
    await store.put_key(record("a2", "alpha"))
    assert [r.id for r in await store.list_keys()] == ["a1", "a2", "b1"]
    assert [r.id for r in await store.list_keys("alpha")] == ["a1", "a2"]
    assert await store.list_keys("gamma") == []


async def test_revoke(store: KeyStore) -> None:
    await store.put_key(record())
    assert await store.revoke_key("abc") is True
    found = await store.get_key("abc")
    assert found is not None and found.revoked
    assert await store.revoke_key("missing") is False


async def test_touch_records_last_used(store: KeyStore) -> None:
    await store.put_key(record())
    await store.touch({"abc": 1234.5, "missing": 1.0})
    found = await store.get_key("abc")
    assert found is not None and found.last_used == 1234.5
    assert (await store.list_keys())[0].last_used == 1234.5
    assert await store.get_key("missing") is None


async def test_teams(store: KeyStore) -> None:
    team = TeamRecord("alpha", rpm=10, daily_token_budget=5000,
                      models={"qa": ModelLimit(rpm=2, tpm=None)})
    await store.put_team(team)
    await store.put_team(TeamRecord("beta", tpm=99))
    assert await store.get_team("alpha") == team
    assert await store.get_team("gamma") is None
    assert [t.name for t in await store.list_teams()] == ["alpha", "beta"]


@pytest.mark.redis
async def test_redis_watch_announces_changes_from_another_connection(redis_url: str) -> None:
    """Redis announces changes (the file store is re-read when its mtime moves, below)."""
    ns = connect(redis_url, "test")
    store = RedisKeyStore(ns)
    seen: list[str] = []
    subscribed, both = asyncio.Event(), asyncio.Event()

    def invalidate(key_id: str) -> None:
        seen.append(key_id)
        if key_id == "*":  # what a (re)subscription announces: changes may have been missed
            subscribed.set()
        if seen.count("k9") >= 2:
            both.set()

    watcher = asyncio.create_task(store.watch(invalidate))
    try:
        await asyncio.wait_for(subscribed.wait(), 5)
        other_ns = connect(redis_url, "test")
        other = RedisKeyStore(other_ns)
        await other.put_key(record("k9"))
        await other.revoke_key("k9")
        await other_ns.client.aclose()
        await asyncio.wait_for(both.wait(), 1)
        assert seen.count("k9") == 2
    finally:
        watcher.cancel()
        with pytest.raises(asyncio.CancelledError):
            await watcher
        await ns.aclose()


def _leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.suffix == ".tmp"]


async def test_file_store_sees_other_processes_and_writes_atomically(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    server, cli = MemoryKeyStore(path), MemoryKeyStore(path)
    assert await server.get_key("abc") is None
    await cli.put_key(record())
    assert await server.get_key("abc") == record()  # re-read after the mtime changed
    await server.touch({"abc": 5.0})
    await cli.revoke_key("abc")  # must not lose the server's write
    found = await server.get_key("abc")
    assert found is not None and found.revoked and found.last_used == 5.0
    data = json.loads(path.read_text())
    assert set(data) == {"keys", "teams"}
    assert _leftovers(tmp_path) == []
    assert path.stat().st_mode & 0o077 == 0
