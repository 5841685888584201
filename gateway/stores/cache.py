"""Response cache storage: entries with a TTL, and short locks for single-flight requests.

`MemoryCacheStore` (the embedded default) is an LRU bounded by total bytes whose waiters wake
the moment a leader releases its lock. `RedisCacheStore` shares entries and locks across
replicas (``SET PX`` / ``SET NX PX``; a lock is freed only by its holder, cache_unlock.lua).

Redis waiters poll (5 ms doubling to 25 ms), and the waiters of one key in a process share one
poller, rather than subscribe: pub/sub wakes them a few milliseconds sooner but takes a
connection per waiting request, where the poller opens none (docs/performance.md has the
measurements). Next to an LLM answer of seconds, 10 ms is noise; a connection per waiter is not.
Entry and lock of one key share a hash tag, so they live in one cluster slot.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import redis.exceptions

from gateway.errors import ServiceUnavailable
from gateway.stores.redis_base import RedisNamespace, unavailable

# What an entry holds beyond the bytes of its key and value (object headers, the entry's tuple,
# the ordered dict's node), measured as RSS growth per entry: counted against the memory
# bound so that the bound is the memory really held.
ENTRY_OVERHEAD = 344
POLL_FIRST = 0.005
POLL_MAX = 0.025  # longest pause between two polls of a waiter on Redis (see module docstring)

# Told when a fire-and-forget call failed (a lock not freed expires by itself).
Failed = Callable[[ServiceUnavailable], None]


@dataclass(frozen=True, slots=True)
class CacheStats:
    entries: int | None  # None where the store cannot tell cheaply (Redis)
    bytes: int | None
    evictions: int = 0
    refused: int = 0  # entries over `max_entry_bytes`


class CacheStore(Protocol):
    """Entries and single-flight locks under keys the response cache computes (digests)."""

    async def get(self, key: str) -> bytes | None: ...

    async def set(self, key: str, value: bytes, ttl: float) -> bool:
        """Store unless the value is over the entry bound; True when stored. `value` is kept
        as it is: it must hold no more memory than its length."""
        ...

    async def lock(self, key: str, ttl: float) -> bool:
        """Become the one request computing `key` (single flight); False when taken."""
        ...

    def unlock(self, key: str, failed: Failed | None = None) -> None:
        """Free this process's lock on `key`, without waiting (harmless when not held);
        `failed` hears of an error."""
        ...

    async def wait(self, key: str, within: float) -> bytes | None:
        """Wait until the lock holder stores the entry (returned) or gives up (None)."""
        ...

    def stats(self) -> CacheStats: ...


class MemoryCacheStore:
    def __init__(
        self,
        max_bytes: int,
        max_entry_bytes: int,
        *,
        clock: Callable[[], float] = time.monotonic,
        entry_overhead: int = ENTRY_OVERHEAD,
    ) -> None:
        self.max_bytes = max_bytes
        self.entry_overhead = entry_overhead
        self.max_entry_bytes = max_entry_bytes
        self.size = 0
        self.evictions = 0
        self.refused = 0
        self._clock = clock
        # key -> (value, expiry, cost); the cost (key, value and overhead) is kept so that
        # evicting reads one number instead of measuring two objects
        self._entries: OrderedDict[str, tuple[bytes, float, int]] = OrderedDict()
        self._locks: dict[str, float] = {}  # key -> when its lock expires
        # key -> the event its waiters wait on, made by the first of them (most leaders have
        # no waiter); set and dropped when the lock is freed
        self._waiters: dict[str, asyncio.Event] = {}

    async def get(self, key: str) -> bytes | None:
        found = self._entries.get(key)
        if found is None:
            return None
        if found[1] <= self._clock():
            self._drop(key)
            return None
        self._entries.move_to_end(key)
        return found[0]

    async def set(self, key: str, value: bytes, ttl: float) -> bool:
        length = len(value)
        cost = len(key) + length + self.entry_overhead
        if length > self.max_entry_bytes or cost > self.max_bytes:
            self.refused += 1
            return False
        entries = self._entries
        if key in entries:
            self._drop(key)
        entries[key] = (value, self._clock() + ttl, cost)
        self.size += cost
        while self.size > self.max_bytes:
            self.size -= entries.popitem(last=False)[1][2]  # the least recently used
            self.evictions += 1
        return True

    def _drop(self, key: str) -> None:
        self.size -= self._entries.pop(key)[2]

    async def lock(self, key: str, ttl: float) -> bool:
        now = self._clock()
        held = self._locks.get(key)
        if held is not None and held > now:
            return False
        self._locks[key] = now + ttl  # free, or left to expire by a leader that went away
        return True

    def unlock(self, key: str, failed: Failed | None = None) -> None:
        self._locks.pop(key, None)
        event = self._waiters.pop(key, None)
        if event is not None:
            event.set()

    async def wait(self, key: str, within: float) -> bytes | None:
        expires = self._locks.get(key)
        if expires is not None:
            remaining = min(within, expires - self._clock())
            if remaining > 0:
                event = self._waiters.get(key)
                if event is None:
                    event = self._waiters[key] = asyncio.Event()
                try:
                    await asyncio.wait_for(event.wait(), remaining)
                except TimeoutError:
                    if self._waiters.get(key) is event \
                            and self._locks.get(key, 0.0) <= self._clock():
                        del self._waiters[key]  # its leader died: nobody will set it
                    return None
        return await self.get(key)

    def stats(self) -> CacheStats:
        return CacheStats(len(self._entries), self.size, self.evictions, self.refused)


class RedisCacheStore:
    def __init__(self, ns: RedisNamespace, max_entry_bytes: int) -> None:
        self.ns = ns
        self.max_entry_bytes = max_entry_bytes
        self.refused = 0
        self._token = os.urandom(8).hex()  # this process's locks, so it frees only its own
        self._pollers: dict[str, asyncio.Future[bytes | None]] = {}

    def _keys(self, key: str) -> tuple[str, str]:
        return self.ns.key(f"c:{key}", "v"), self.ns.key(f"c:{key}", "lock")

    # get, set, lock and unlock go through the namespace's auto-pipelining: the lookups and
    # writes of the requests of one loop turn share one round trip

    async def get(self, key: str) -> bytes | None:
        try:
            value = await self.ns.batch.call("GET", self._keys(key)[0])
        except (redis.exceptions.RedisError, OSError) as exc:
            raise unavailable(exc) from exc
        return value if isinstance(value, bytes) else None

    async def set(self, key: str, value: bytes, ttl: float) -> bool:
        if len(value) > self.max_entry_bytes:
            self.refused += 1
            return False
        try:
            await self.ns.batch.call("SET", self._keys(key)[0], value, "PX",
                                     max(1, int(ttl * 1000)))
        except (redis.exceptions.RedisError, OSError) as exc:
            raise unavailable(exc) from exc
        return True

    async def lock(self, key: str, ttl: float) -> bool:
        def abandoned(taken: object) -> None:
            if taken:  # the caller went away holding the lock: free it for the waiters
                self.unlock(key)

        try:
            taken = await self.ns.batch.call("SET", self._keys(key)[1], self._token, "NX",
                                             "PX", max(1, int(ttl * 1000)),
                                             abandoned=abandoned)
        except (redis.exceptions.RedisError, OSError) as exc:
            raise unavailable(exc) from exc
        return bool(taken)

    def unlock(self, key: str, failed: Failed | None = None) -> None:
        def report(exc: BaseException) -> None:
            if failed is not None:
                failed(unavailable(exc))

        self.ns.batch.cast_script(self.ns.script("cache_unlock"), [self._keys(key)[1]],
                                  [self._token], failed=report)

    async def wait(self, key: str, within: float) -> bytes | None:
        # Waiters of one key in this process share one poller: Redis sees one poll per
        # process and key, not one per waiting request.
        poller = self._pollers.get(key)
        if poller is None:
            poller = asyncio.ensure_future(self._poll(key, within))
            self._pollers[key] = poller
            poller.add_done_callback(lambda done: self._poller_done(key, done))
        try:
            return await asyncio.wait_for(asyncio.shield(poller), within)
        except TimeoutError:
            return None

    def _poller_done(self, key: str, poller: asyncio.Future[bytes | None]) -> None:
        if self._pollers.get(key) is poller:
            del self._pollers[key]
        if not poller.cancelled():
            poller.exception()  # retrieved here too: its waiters may all have timed out

    async def _poll(self, key: str, within: float) -> bytes | None:
        value_key, lock_key = self._keys(key)
        deadline = time.monotonic() + within
        delay = POLL_FIRST
        while True:
            try:
                async with self.ns.client.pipeline(transaction=False) as pipe:
                    pipe.get(value_key)
                    pipe.exists(lock_key)
                    value, locked = await pipe.execute()
            except redis.exceptions.RedisError as exc:
                raise unavailable(exc) from exc
            if isinstance(value, bytes):
                return value
            remaining = deadline - time.monotonic()
            if not locked or remaining <= 0:
                return None
            await asyncio.sleep(min(delay, remaining))
            delay = min(delay * 2, POLL_MAX)

    def stats(self) -> CacheStats:
        return CacheStats(None, None, 0, self.refused)
