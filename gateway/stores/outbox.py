"""The analytics outbox: finished-exchange records waiting for delivery, per sink.

Every record `put` into the outbox is delivered to every sink once (at least once, with the
record's idempotency key so receivers can drop repeats). Delivery state is per sink: each sink
has its own queue (spool) or stream (Redis), so a slow sink never holds up another.

    put ───────────► [sink A queue] ─ claim ─► worker A ─ ack ───────────► gone
                      [sink B queue] ─ claim ─► worker B ─ nack (retry) ─► still claimed
                                                          └ dead_letter ─► dead letters
                                                                  replay_dead ─┘ (back in A/B)

Implementations: `gateway.stores.spool.SpoolOutbox` (in-process, an append-only file under
``analytics.outbox.spool_dir``) and `RedisOutbox` here (one stream + consumer group per sink,
XAUTOCLAIM of entries a crashed replica left pending for ``claim_idle_seconds``, and of
released ones at once).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import redis.exceptions

from gateway.errors import QueueLost
from gateway.stores.redis_base import RedisNamespace, unavailable

GROUP = "delivery"


@dataclass(slots=True)
class OutboxItem:
    """One record claimed for one sink. `attempts` counts failed deliveries so far. Treated
    as a value (`nack` returns a new one)."""

    id: str
    sink: str
    key: str  # the idempotency key
    data: bytes  # the serialised ExchangeRecord (orjson)
    attempts: int = 0
    first_failure: float | None = None  # unix time of the first failed delivery


@dataclass(frozen=True, slots=True)
class DeadLetter:
    id: str  # pass to replay_dead
    sink: str
    key: str
    data: bytes
    reason: str
    time: float
    attempts: int


class Outbox(Protocol):
    """What the mirror calls: records in, claimed per sink, acked or given back."""

    sinks: tuple[str, ...]

    async def start(self) -> None:
        """Begin any background work of the store (before the first put or claim)."""
        ...

    async def put(self, entries: list[tuple[bytes, str]],
                  sinks: Sequence[str] | None = None) -> None:
        """Add records (the record's JSON, its idempotency key) for every sink (or those of
        `sinks`); durable when this returns."""
        ...

    async def claim(self, sink: str, n: int, consumer: str) -> list[OutboxItem]:
        """Up to `n` records for `sink`, oldest first, including records another consumer
        claimed and abandoned (Redis: idle longer than ``claim_idle_seconds``)."""
        ...

    async def ack(self, items: list[OutboxItem]) -> None:
        """Delivered: forget the records, each for its own sink (one write, one round trip)."""
        ...

    async def nack(self, item: OutboxItem, now: float | None = None) -> OutboxItem:
        """A failed attempt: returns the item with attempts + 1 and the first failure time
        recorded (durably, so another consumer continues the dead-letter clock). The item
        stays claimed by the caller, who retries it after its backoff."""
        ...

    async def touch(self, items: list[OutboxItem], consumer: str) -> None:
        """Keep claims alive while the caller holds them (Redis: resets their idle time)."""
        ...

    async def release(self, items: list[OutboxItem], consumer: str) -> None:
        """Give records `consumer` claimed back undelivered (shutdown): the next claim, by
        any consumer, takes them again, first and in their order."""
        ...

    async def dead_letter(self, item: OutboxItem, reason: str) -> None:
        """Give up on a record for its sink: it moves to the dead letters."""
        ...

    async def depth(self) -> dict[str, int]:
        """Records not yet delivered (nor dead-lettered), per sink."""
        ...

    async def oldest_pending(self) -> dict[str, float | None]:
        """Per sink, when the oldest of those records was put (unix time), None for none."""
        ...

    async def close(self) -> None: ...


class DeadLetters(Protocol):
    """What operators see of the records no sink would take (CLI, admin API)."""

    async def list_dead(self) -> list[DeadLetter]: ...

    async def replay_dead(self, ids: list[str] | None = None) -> int:
        """Put dead letters (all when `ids` is None) back in their sink's queue; the count."""
        ...


class OutboxStore(Outbox, DeadLetters, Protocol):
    """Both sides, as each store implements them."""


def ids_by_sink(items: list[OutboxItem]) -> dict[str, list[Any]]:
    """The items' ids, grouped by sink, in order."""
    by_sink: dict[str, list[Any]] = {}
    for item in items:
        by_sink.setdefault(item.sink, []).append(item.id)
    return by_sink


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class RedisOutbox:
    """One Redis stream per sink with a consumer group; dead letters in one more stream.

    Keys: ``{prefix}:{outbox:<sink>}:stream`` (fields ``k`` idempotency key, ``d`` data),
    ``{prefix}:{outbox:<sink>}:failures`` (hash: entry id -> ``attempts first_failure``),
    ``{prefix}:{outbox:<sink>}:seen:<key>`` (a record was added, for `SEEN_SECONDS`),
    ``{prefix}:{outbox}:dead`` (fields ``s`` sink, ``k``, ``d``, ``r`` reason, ``t``, ``a``).
    Acked entries are XDELeted, so XLEN is the depth.

    A Redis that restarted empty has lost the consumer groups: the first claim that finds
    its group gone (``NOGROUP``) creates it again and raises `QueueLost`, so that whoever
    still holds records for that sink can put them back.
    """

    SEEN_SECONDS = 3600.0  # how long a put remembers an idempotency key

    def __init__(self, ns: RedisNamespace, sinks: list[str], *,
                 claim_idle_seconds: float = 30.0) -> None:
        self.ns = ns
        self.sinks = tuple(sinks)
        self.claim_idle_ms = max(1, int(claim_idle_seconds * 1000))
        self._ready: set[str] = set()
        self._last_autoclaim: dict[str, float] = {}
        self._dead = ns.key("outbox", "dead")
        self._put = ns.script("outbox_put")

    def _stream(self, sink: str) -> str:
        return self.ns.key(f"outbox:{sink}", "stream")

    def _failures(self, sink: str) -> str:
        return self.ns.key(f"outbox:{sink}", "failures")

    async def _ensure(self, sink: str) -> None:
        if sink in self._ready:
            return
        try:
            await self.ns.client.xgroup_create(self._stream(sink), GROUP, id="0", mkstream=True)
        except redis.exceptions.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise unavailable(exc) from exc
        except redis.exceptions.RedisError as exc:
            raise unavailable(exc) from exc
        self._ready.add(sink)

    async def start(self) -> None:
        return None

    async def put(self, entries: list[tuple[bytes, str]],
                  sinks: Sequence[str] | None = None) -> None:
        """For every sink (or those of `sinks`); a record already put within
        `SEEN_SECONDS` is not added again."""
        if not entries:
            return
        ttl = int(self.SEEN_SECONDS * 1000)
        flat: list[bytes | str] = []
        for data, key in entries:
            flat += (key, data)
        targets = self.sinks if sinks is None else sinks
        for sink in targets:
            await self._ensure(sink)
        try:  # one script per sink (a sink's keys share its hash tag), in one round trip
            await asyncio.gather(*(
                self.ns.batch.run_script(self._put, [self._stream(sink)],
                                         [ttl, self.ns.key(f"outbox:{sink}", "seen", ""),
                                          *flat])
                for sink in targets))
        except redis.exceptions.RedisError as exc:
            raise unavailable(exc) from exc

    async def claim(self, sink: str, n: int, consumer: str,
                    block_ms: int | None = None) -> list[OutboxItem]:
        await self._ensure(sink)
        try:
            return await self._claim(sink, n, consumer, block_ms)
        except redis.exceptions.ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise unavailable(exc) from exc
        self._ready.discard(sink)
        await self._ensure(sink)
        raise QueueLost(f"The outbox of sink '{sink}' was gone (Redis restarted empty?); "
                        "it was created again.", sink=sink)

    async def _claim(self, sink: str, n: int, consumer: str,
                     block_ms: int | None) -> list[OutboxItem]:
        client, stream = self.ns.client, self._stream(sink)
        found: list[tuple[Any, dict[Any, Any]]] = []
        try:
            now = time.monotonic()
            if now - self._last_autoclaim.get(sink, 0.0) >= self.claim_idle_ms / 2000:
                self._last_autoclaim[sink] = now
                reply = await client.xautoclaim(stream, GROUP, consumer, self.claim_idle_ms,
                                                "0-0", count=n)
                found.extend(e for e in reply[1] if e[1])
            if len(found) < n:
                read: Any = await client.xreadgroup(GROUP, consumer, {stream: ">"},
                                                    count=n - len(found), block=block_ms)
                for _name, entries in read or []:
                    found.extend(entries)
            if not found:
                return []
            ids = [_text(entry_id) for entry_id, _ in found]
            failures = await client.hmget(self._failures(sink), ids)
        except redis.exceptions.ResponseError:
            raise  # NOGROUP: `claim` recreates the group
        except redis.exceptions.RedisError as exc:
            raise unavailable(exc) from exc
        items = []
        for (entry_id, fields), failure in zip(found, failures, strict=True):
            attempts, first = 0, None
            if failure:
                a, f = _text(failure).split(" ")
                attempts, first = int(a), float(f)
            items.append(OutboxItem(_text(entry_id), sink, _text(fields[b"k"]),
                                    bytes(fields[b"d"]), attempts, first))
        return items

    async def ack(self, items: list[OutboxItem]) -> None:
        if not items:
            return
        pipe = self.ns.client.pipeline(transaction=False)
        for sink, ids in ids_by_sink(items).items():
            stream = self._stream(sink)
            pipe.xack(stream, GROUP, *ids)
            pipe.xdel(stream, *ids)
        failed = ids_by_sink([item for item in items if item.attempts])
        for sink, ids in failed.items():
            pipe.hdel(self._failures(sink), *ids)
        try:
            await pipe.execute()
        except redis.exceptions.RedisError as exc:
            raise unavailable(exc) from exc

    async def nack(self, item: OutboxItem, now: float | None = None) -> OutboxItem:
        first = item.first_failure or (time.time() if now is None else now)
        failed = OutboxItem(item.id, item.sink, item.key, item.data, item.attempts + 1, first)
        try:
            await self.ns.client.hset(self._failures(item.sink), item.id,
                                      f"{failed.attempts} {first}")
        except redis.exceptions.RedisError as exc:
            raise unavailable(exc) from exc
        return failed

    async def touch(self, items: list[OutboxItem], consumer: str) -> None:
        if not items:
            return
        pipe = self.ns.client.pipeline(transaction=False)
        for sink, ids in ids_by_sink(items).items():
            pipe.xclaim(self._stream(sink), GROUP, consumer, 0, ids, justid=True)
        await self._reclaim(pipe)

    async def release(self, items: list[OutboxItem], consumer: str) -> None:
        # Still pending, but idle since 1970 (TIME 0): the next XAUTOCLAIM (this box's next
        # claim, or another replica's) takes them at once; `claim_idle_seconds` is for
        # consumers that died holding records.
        if not items:
            return
        pipe = self.ns.client.pipeline(transaction=False)
        for sink, ids in ids_by_sink(items).items():
            pipe.xclaim(self._stream(sink), GROUP, consumer, 0, ids, time=0, justid=True)
            self._last_autoclaim.pop(sink, None)
        await self._reclaim(pipe)

    async def _reclaim(self, pipe: Any) -> None:
        """XCLAIMs of held records; a group that is gone holds nothing to claim (the next
        `claim` recreates it)."""
        try:
            await pipe.execute()
        except redis.exceptions.ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise unavailable(exc) from exc
        except redis.exceptions.RedisError as exc:
            raise unavailable(exc) from exc

    async def dead_letter(self, item: OutboxItem, reason: str) -> None:
        stream = self._stream(item.sink)
        pipe = self.ns.client.pipeline(transaction=False)
        pipe.xadd(self._dead, {"s": item.sink, "k": item.key, "d": item.data, "r": reason,
                               "t": repr(time.time()), "a": str(item.attempts)})
        pipe.xack(stream, GROUP, item.id)
        pipe.xdel(stream, item.id)
        pipe.hdel(self._failures(item.sink), item.id)
        try:
            await pipe.execute()
        except redis.exceptions.RedisError as exc:
            raise unavailable(exc) from exc

    async def list_dead(self) -> list[DeadLetter]:
        try:
            entries: Any = await self.ns.client.xrange(self._dead)
        except redis.exceptions.RedisError as exc:
            raise unavailable(exc) from exc
        return [DeadLetter(_text(entry_id), _text(f[b"s"]), _text(f[b"k"]), bytes(f[b"d"]),
                           _text(f[b"r"]), float(f[b"t"]), int(f[b"a"]))
                for entry_id, f in entries]

    async def replay_dead(self, ids: list[str] | None = None) -> int:
        dead = await self.list_dead()
        chosen = [d for d in dead if ids is None or d.id in ids]
        if not chosen:
            return 0
        for sink in {d.sink for d in chosen}:
            await self._ensure(sink)
        pipe = self.ns.client.pipeline(transaction=False)
        for d in chosen:
            pipe.xadd(self._stream(d.sink), {"k": d.key, "d": d.data})
            pipe.xdel(self._dead, d.id)
        try:
            await pipe.execute()
        except redis.exceptions.RedisError as exc:
            raise unavailable(exc) from exc
        return len(chosen)

    async def depth(self) -> dict[str, int]:
        pipe = self.ns.client.pipeline(transaction=False)
        for sink in self.sinks:
            pipe.xlen(self._stream(sink))
        try:
            counts = await pipe.execute()
        except redis.exceptions.RedisError as exc:
            raise unavailable(exc) from exc
        return {sink: int(n) for sink, n in zip(self.sinks, counts, strict=True)}

    async def oldest_pending(self) -> dict[str, float | None]:
        """From the first entry's id (its milliseconds are Redis's time of the XADD; a
        replayed dead letter is added anew)."""
        pipe = self.ns.client.pipeline(transaction=False)
        for sink in self.sinks:
            pipe.xrange(self._stream(sink), count=1)
        try:
            firsts = await pipe.execute()
        except redis.exceptions.RedisError as exc:
            raise unavailable(exc) from exc
        return {sink: int(_text(first[0][0]).partition("-")[0]) / 1000 if first else None
                for sink, first in zip(self.sinks, firsts, strict=True)}

    async def close(self) -> None:
        return None
