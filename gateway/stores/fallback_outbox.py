"""The Redis outbox with a local spool behind it: nothing accepted is lost while Redis is away
or after it restarts empty.

    put ──► Redis streams ─────────────────────────► claim / ack (the sinks' workers)
     │  (unreachable, or the spool still holds older records)
     └────► local spool ── forwarder, once Redis answers ──┘

- While Redis is unreachable, records go to an append-only spool file (`SpoolOutbox` under
  ``analytics.outbox.spool_dir/redis-fallback``) and a forwarder moves them into Redis, in
  order, once it answers; records that arrive meanwhile queue behind them, so a
  conversation's turns keep their order. A process that dies with records spooled leaves
  them in its file, and the next one forwards them.
- Redis adds each record at most once per idempotency key (`RedisOutbox.put`), so a batch
  forwarded again after a crash, or put again after a lost reply, is not delivered twice.
- This process remembers, per sink, the records it put that the sink has not confirmed. When
  a claim finds that Redis lost a sink's queue (`QueueLost`: it restarted empty), those of
  them that no worker here holds are put back for that sink. A record another replica was
  delivering at that moment may then arrive twice: it carries the same idempotency key.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import OrderedDict
from collections.abc import Sequence

import structlog

from gateway.errors import QueueLost, ServiceUnavailable
from gateway.stores.outbox import DeadLetter, OutboxItem, RedisOutbox
from gateway.stores.spool import SpoolOutbox

log = structlog.get_logger("gateway.stores.fallback_outbox")

FORWARD = "redis"  # the spool's one queue: records waiting to go into Redis
FORWARD_BATCH = 256
RETRY_FIRST, RETRY_MAX = 0.25, 5.0  # seconds between the forwarder's tries while Redis is away


class FallbackOutbox:
    """Implements `OutboxStore` over a `RedisOutbox`, with `spool` for when Redis is away.
    `remember`: how many unconfirmed records per sink it keeps to put back (the oldest
    are forgotten beyond it)."""

    def __init__(self, redis: RedisOutbox, spool: SpoolOutbox, *, remember: int = 10_000
                 ) -> None:
        self.redis = redis
        self.spool = spool
        self.sinks = redis.sinks
        self.remember = remember
        # per sink: idempotency key -> data, put here and not yet acked or dead-lettered
        self._owed: dict[str, OrderedDict[str, bytes]] = {s: OrderedDict() for s in self.sinks}
        self._held: dict[str, set[str]] = {s: set() for s in self.sinks}  # claimed here
        self._spooling = False
        self._forwarder: asyncio.Task[None] | None = None
        self._put_lock = asyncio.Lock()

    async def start(self) -> None:
        """Forward what a previous process left in the spool (the mirror starts it)."""
        if (await self.spool.depth()).get(FORWARD):
            self._spool_from_now()

    # -- putting -----------------------------------------------------------------------------

    async def put(self, entries: list[tuple[bytes, str]],
                  sinks: Sequence[str] | None = None) -> None:
        if not entries:
            return
        if sinks is not None:  # a put for some sinks only: straight to Redis
            await self.redis.put(entries, sinks)
            return
        for sink in self.sinks:
            self._owe(sink, entries)
        async with self._put_lock:  # one writer at a time keeps the records in order
            if not self._spooling:
                try:
                    await self.redis.put(entries)
                    return
                except ServiceUnavailable as exc:
                    log.warning("outbox_spooling", records=len(entries), error=exc.code)
                    self._spool_from_now()
            await self.spool.put(entries)

    def _owe(self, sink: str, entries: list[tuple[bytes, str]]) -> None:
        owed = self._owed[sink]
        for data, key in entries:
            owed[key] = data
        while len(owed) > self.remember:
            owed.popitem(False)

    def _spool_from_now(self) -> None:
        self._spooling = True
        if self._forwarder is None or self._forwarder.done():
            self._forwarder = asyncio.create_task(self._forward(), name="outbox-forwarder")

    async def _forward(self) -> None:
        """Move the spool into Redis in order, until it is empty; wait while Redis is away."""
        pause = RETRY_FIRST
        while True:
            async with self._put_lock:  # no record slips into the spool after the last look
                items = await self.spool.claim(FORWARD, FORWARD_BATCH, "forwarder")
                if not items:
                    self._spooling = False
                    log.info("outbox_spool_forwarded")
                    return
            try:
                await self.redis.put([(item.data, item.key) for item in items])
            except ServiceUnavailable:
                await self.spool.release(items, "forwarder")
                await asyncio.sleep(pause)
                pause = min(pause * 2, RETRY_MAX)
                continue
            pause = RETRY_FIRST
            await self.spool.ack(items)
            await self.spool.flush()

    # -- the sinks' side ---------------------------------------------------------------------

    async def claim(self, sink: str, n: int, consumer: str) -> list[OutboxItem]:
        try:
            items = await self.redis.claim(sink, n, consumer)
        except QueueLost:
            await self._put_back(sink)
            items = await self.redis.claim(sink, n, consumer)
        self._held[sink].update(item.key for item in items)
        return items

    async def _put_back(self, sink: str) -> None:
        held = self._held[sink]
        lost = [(data, key) for key, data in self._owed[sink].items() if key not in held]
        log.warning("outbox_queue_lost", sink=sink, put_back=len(lost))
        if lost:
            await self.redis.put(lost, [sink])

    def _done(self, items: list[OutboxItem]) -> None:
        for item in items:
            self._owed[item.sink].pop(item.key, None)
            self._held[item.sink].discard(item.key)

    async def ack(self, items: list[OutboxItem]) -> None:
        await self.redis.ack(items)
        self._done(items)

    async def nack(self, item: OutboxItem, now: float | None = None) -> OutboxItem:
        return await self.redis.nack(item, now)

    async def touch(self, items: list[OutboxItem], consumer: str) -> None:
        await self.redis.touch(items, consumer)

    async def release(self, items: list[OutboxItem], consumer: str) -> None:
        await self.redis.release(items, consumer)
        for item in items:
            self._held[item.sink].discard(item.key)

    async def dead_letter(self, item: OutboxItem, reason: str) -> None:
        await self.redis.dead_letter(item, reason)
        self._done([item])

    async def depth(self) -> dict[str, int]:
        """Records not yet delivered per sink, those still in the spool included."""
        depth = await self.redis.depth()
        spooled = (await self.spool.depth()).get(FORWARD, 0)
        return {sink: n + spooled for sink, n in depth.items()}

    async def oldest_pending(self) -> dict[str, float | None]:
        """Records still in the spool are owed to every sink."""
        oldest = await self.redis.oldest_pending()
        spooled = (await self.spool.oldest_pending()).get(FORWARD)
        return {sink: min((t for t in (at, spooled) if t is not None), default=None)
                for sink, at in oldest.items()}

    async def list_dead(self) -> list[DeadLetter]:
        return await self.redis.list_dead()

    async def replay_dead(self, ids: list[str] | None = None) -> int:
        return await self.redis.replay_dead(ids)

    async def close(self) -> None:
        """Stop forwarding (what is left stays in the spool for the next start)."""
        if self._forwarder is not None:
            self._forwarder.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._forwarder
        await self.spool.close()
        await self.redis.close()
