"""One contract suite for the analytics `Outbox`: the spool file and Redis streams."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from gateway.stores.outbox import Outbox, OutboxItem, RedisOutbox
from gateway.stores.redis_base import RedisNamespace, connect
from gateway.stores.spool import SpoolOutbox
from tests.eventually import eventually

SINKS = ["ink", "hook"]
IDLE = 0.05
Make = Callable[[], Awaitable[Outbox]]


@pytest.fixture(params=["spool", pytest.param("redis", marks=pytest.mark.redis)])
async def make(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Make]:
    """Opens outboxes on the same backing store (a second one = a restart or a replica)."""
    opened: list[Outbox] = []
    namespaces: list[RedisNamespace] = []
    url = request.getfixturevalue("redis_proc").url if request.param == "redis" else ""

    async def open_one() -> Outbox:
        box: Outbox
        if request.param == "spool":
            for other in opened:  # one process at a time holds a spool file
                await other.close()
            box = SpoolOutbox(tmp_path / "outbox", SINKS)
        else:
            ns = connect(url, "test")
            if not namespaces:
                await ns.client.flushall()
            namespaces.append(ns)
            # the default 30 s: what comes back here was released, not left by a dead consumer
            box = RedisOutbox(ns, SINKS)
        opened.append(box)
        return box

    try:
        yield open_one
    finally:
        for box in opened:
            await box.close()
        for ns in namespaces:
            await ns.client.aclose()


def recs(n: int, start: int = 0) -> list[tuple[bytes, str]]:
    return [(b'{"n":%d}' % i, f"key-{i}") for i in range(start, start + n)]


async def test_every_sink_gets_every_record_in_order(make: Make) -> None:
    box = await make()
    await box.put(recs(5))
    for sink in SINKS:
        items = await box.claim(sink, 10, "c1")
        assert [i.key for i in items] == [f"key-{n}" for n in range(5)]
        assert items[0].data == b'{"n":0}' and items[0].sink == sink
        assert items[0].attempts == 0 and items[0].first_failure is None
    assert await box.depth() == {"ink": 5, "hook": 5}


async def test_claimed_records_are_not_handed_out_twice(make: Make) -> None:
    box = await make()
    await box.put(recs(4))
    first = await box.claim("ink", 3, "c1")
    second = await box.claim("ink", 3, "c1")
    assert [i.key for i in first] == ["key-0", "key-1", "key-2"]
    assert [i.key for i in second] == ["key-3"]
    assert await box.claim("ink", 3, "c1") == []


async def test_ack_is_per_sink(make: Make) -> None:
    box = await make()
    await box.put(recs(3))
    for item in await box.claim("ink", 2, "c1"):
        await box.ack([item])
    assert await box.depth() == {"ink": 1, "hook": 3}
    assert [i.key for i in await box.claim("ink", 5, "c1")] == ["key-2"]


async def test_nack_counts_attempts_and_keeps_the_first_failure(make: Make) -> None:
    box = await make()
    await box.put(recs(1))
    [item] = await box.claim("ink", 1, "c1")
    once = await box.nack(item, now=1000.0)
    twice = await box.nack(once, now=1010.0)
    assert (once.attempts, once.first_failure) == (1, 1000.0)
    assert (twice.attempts, twice.first_failure) == (2, 1000.0)
    await box.release([twice], "c1")
    [again] = await box.claim("ink", 1, "c2")
    assert (again.key, again.attempts, again.first_failure) == ("key-0", 2, 1000.0)
    await box.ack([again])
    assert (await box.depth())["ink"] == 0


async def test_ack_acks_a_batch_for_its_sink_only(make: Make) -> None:
    box = await make()
    await box.put(recs(4))
    items = await box.claim("ink", 4, "c1")
    failed = await box.nack(items[1], now=1000.0)
    await box.ack([items[0], failed, items[3]])
    await box.ack([])
    assert (await box.depth())["ink"] == 1
    assert [i.key for i in await box.claim("hook", 10, "c1")] == [f"key-{i}" for i in range(4)]
    again = await make()  # a restart (or another replica): the acked stay gone
    await box.release([items[2]], "c1")
    left = await again.claim("ink", 10, "c2")
    assert [(i.key, i.attempts) for i in left] == [("key-2", 0)]


async def test_released_records_come_back_first_in_their_order(make: Make) -> None:
    box = await make()
    await box.put(recs(6))
    first = await box.claim("ink", 4, "c1")
    await box.ack([first[1]])
    await box.release([first[3], first[0], first[2]], "c1")
    again = await box.claim("ink", 10, "c2")
    assert [i.key for i in again] == ["key-0", "key-2", "key-3", "key-4", "key-5"]


async def test_dead_letters_list_and_replay(make: Make) -> None:
    box = await make()
    await box.put(recs(3))
    items = await box.claim("hook", 3, "c1")
    failed = await box.nack(items[1], now=5.0)
    await box.dead_letter(failed, "HTTP 400")
    await box.dead_letter(items[2], "kept failing")
    await box.ack([items[0]])
    assert (await box.depth())["hook"] == 0
    dead = await box.list_dead()
    assert [(d.key, d.sink, d.reason, d.attempts) for d in dead] == [
        ("key-1", "hook", "HTTP 400", 1), ("key-2", "hook", "kept failing", 0)]
    assert dead[0].data == b'{"n":1}'
    assert await box.replay_dead([dead[1].id]) == 1
    assert [d.key for d in await box.list_dead()] == ["key-1"]
    assert [i.key for i in await box.claim("hook", 5, "c1")] == ["key-2"]
    assert await box.replay_dead() == 1
    assert await box.list_dead() == []
    assert [i.key for i in await box.claim("hook", 5, "c1")] == ["key-1"]
    assert (await box.depth())["ink"] == 3  # the other sink never saw any of this


async def test_records_survive_a_reopen(make: Make) -> None:
    box = await make()
    await box.put(recs(4))
    items = await box.claim("ink", 4, "c1")
    await box.ack([items[0]])
    await box.dead_letter(items[1], "refused")
    await box.nack(items[2], now=42.0)
    await box.release(items[2:], "c1")
    again = await make()
    assert await again.depth() == {"ink": 2, "hook": 4}
    got = await again.claim("ink", 10, "c2")
    assert [(i.key, i.attempts) for i in got] == [("key-2", 1), ("key-3", 0)]
    assert [d.key for d in await again.list_dead()] == ["key-1"]


async def test_oldest_pending_is_when_the_oldest_undelivered_record_was_put(
        make: Make) -> None:
    box = await make()
    assert await box.oldest_pending() == {"ink": None, "hook": None}
    before = time.time()
    await box.put(recs(2))
    after = time.time()
    oldest = await box.oldest_pending()
    for sink in SINKS:  # Redis's own clock, to the millisecond
        assert before - 0.002 <= (oldest[sink] or 0) <= after + 0.002
    await box.put(recs(1, start=2))
    items = await box.claim("ink", 3, "c1")  # claimed is still pending
    assert await box.oldest_pending() == oldest
    await box.ack(items[:2])
    later = await box.oldest_pending()
    assert (later["ink"] or 0) >= (oldest["ink"] or 0) and later["hook"] == oldest["hook"]
    box = await make()  # a reopen
    assert await box.oldest_pending() == later
    await box.ack(items[2:])
    hook = await box.claim("hook", 3, "c1")
    await box.dead_letter(hook[0], "refused")  # dead letters are not pending
    await box.ack(hook[1:])
    assert await box.oldest_pending() == {"ink": None, "hook": None}


async def test_put_with_no_records_is_fine(make: Make) -> None:
    box = await make()
    await box.put([])
    assert await box.depth() == {"ink": 0, "hook": 0}


# -- Redis only: replicas --------------------------------------------------------------------


@pytest.mark.redis
async def test_records_a_dead_consumer_left_pending_go_to_another(redis_url: str) -> None:
    a, b = connect(redis_url, "test"), connect(redis_url, "test")
    try:
        box_a = RedisOutbox(a, SINKS, claim_idle_seconds=IDLE)
        box_b = RedisOutbox(b, SINKS, claim_idle_seconds=IDLE)
        await box_a.put(recs(3))
        taken = await box_a.claim("ink", 3, "replica-a")  # ... and replica a dies
        assert len(taken) == 3
        assert await box_b.claim("ink", 3, "replica-b") == []  # not idle long enough yet
        got = await eventually(lambda: box_b.claim("ink", 3, "replica-b"))
        assert [i.key for i in got] == ["key-0", "key-1", "key-2"]
    finally:
        await a.client.aclose()
        await b.client.aclose()


@pytest.mark.redis
async def test_touch_keeps_held_records_from_being_taken(redis_url: str) -> None:
    a, b = connect(redis_url, "test"), connect(redis_url, "test")
    try:
        # long enough that a touch and the claim right after it never straddle it
        box_a = RedisOutbox(a, SINKS, claim_idle_seconds=0.3)
        box_b = RedisOutbox(b, SINKS, claim_idle_seconds=0.3)
        await box_a.put(recs(2))
        held, dropped = await box_a.claim("ink", 2, "replica-a")

        async def touch_then_take() -> list[OutboxItem]:
            await box_a.touch([held], "replica-a")
            return await box_b.claim("ink", 2, "replica-b")

        # b takes the record a stopped touching once it is idle, never the one a holds
        got = await eventually(touch_then_take)
        assert [i.key for i in got] == [dropped.key] == ["key-1"]
    finally:
        await a.client.aclose()
        await b.client.aclose()


async def test_spool_spills_data_beyond_max_resident_and_reads_it_back(tmp_path: Path) -> None:
    box = SpoolOutbox(tmp_path, ["ink"], max_resident=2)
    await box.put(recs(5))
    items = await box.claim("ink", 5, "c")
    assert [i.data for i in items] == [b'{"n":%d}' % i for i in range(5)]
    await box.close()


async def test_spool_takes_an_ack_of_a_record_back_in_line(tmp_path: Path) -> None:
    box = SpoolOutbox(tmp_path, ["ink"])
    await box.put(recs(3))
    [one, _, _] = await box.claim("ink", 3, "c")
    await box.release([one], "c")
    await box.ack([one])  # acked while back in line: it must not be handed out again
    assert [i.key for i in await box.claim("ink", 3, "c")] == []
    assert (await box.depth())["ink"] == 2
    await box.close()


async def test_spool_compacts_acked_records_away(tmp_path: Path) -> None:
    box = SpoolOutbox(tmp_path, ["ink"], compact_bytes=2000)
    for round_ in range(10):
        await box.put(recs(10, round_ * 10))
        for item in await box.claim("ink", 10, "c"):
            if item.key != "key-0":
                await box.ack([item])
    await box.flush()
    assert box.path.stat().st_size < 2000
    await box.close()
    again = SpoolOutbox(tmp_path, ["ink"])
    assert [i.key for i in await again.claim("ink", 10, "c")] == ["key-0"]
    await again.close()


async def test_spool_ignores_a_torn_last_line(tmp_path: Path) -> None:
    box = SpoolOutbox(tmp_path, ["ink"])
    await box.put(recs(2))
    path = box.path
    await box.close()
    with path.open("ab") as f:
        f.write(b'{"op":"put","id":3,"key":"key-')
    again = SpoolOutbox(tmp_path, ["ink"])
    await again.put(recs(1, 7))
    assert [i.key for i in await again.claim("ink", 10, "c")] == ["key-0", "key-1", "key-7"]
    await again.close()
    third = SpoolOutbox(tmp_path, ["ink"])
    assert (await third.depth())["ink"] == 3
    await third.close()


async def test_spool_reads_put_lines_of_older_files_without_a_time(tmp_path: Path) -> None:
    (tmp_path / "outbox-0.log").write_bytes(
        b'{"op":"put","id":1,"key":"old","sinks":["ink"],"data":{"n":1}}\n')
    box = SpoolOutbox(tmp_path, ["ink"])
    assert await box.oldest_pending() == {"ink": None}  # unknown, not 1970
    await box.put(recs(1))
    assert (await box.oldest_pending())["ink"] == pytest.approx(time.time(), abs=5)
    assert [i.key for i in await box.claim("ink", 5, "c")] == ["old", "key-0"]
    await box.close()


async def test_two_spools_in_one_dir_use_two_files(tmp_path: Path) -> None:
    one, two = SpoolOutbox(tmp_path, ["ink"]), SpoolOutbox(tmp_path, ["ink"])
    assert one.path != two.path
    await one.close()
    await two.close()
