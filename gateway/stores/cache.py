"""Response cache storage: entries with a TTL, and short locks for single-flight requests.

`MemoryCacheStore` (the embedded default) is an LRU bounded by total bytes whose waiters wake
the moment a leader releases its lock. `RedisCacheStore` shares entries and locks across
replicas (``SET PX`` / ``SET NX PX``; a lock is freed only by its holder, cache_unlock.lua).

Redis waiters poll (5 ms doubling to 25 ms) and the waiters of one key in a process share one
poller, chosen by measurement (see docs/performance.md): polling wakes them 3-13 ms
after the leader's write against 3-4 ms for pub/sub, but pub/sub took one subscription
connection per waiter (57-76 new connections per trial) where the poller opened none, for
16-165 commands per 0.05-2 s leader. Next to an LLM answer of seconds, 10 ms is noise;
a connection per waiting request is not.
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

from gateway.config import GatewayConfig
from gateway.stores.redis_base import RedisNamespace, unavailable

# What an entry costs beyond the bytes of its key and value (the two objects' headers and
# allocator rounding, the (value, expiry, cost) tuple, the float and the int, the ordered
# dict's node and slots): measured as the growth of RSS over 100,000 `set_now` calls, 934 B
# per entry of 290-byte keys and 300-byte values (the bench's shape: 344 B beyond both), and
# 903 B for 64-byte keys and 511-byte values (328 B). The memory bound counts this per entry
# to bound the memory really held.
ENTRY_OVERHEAD = 344

# A shared store's keys are hex digests (str); the in-process store also takes the canonical
# request itself (bytes, see gateway/cache.py).
CacheKey = str | bytes
POLL_FIRST = 0.005
POLL_MAX = 0.025  # longest pause between two polls of a waiter on Redis (see module docstring)


@dataclass(frozen=True, slots=True)
class CacheStats:
    entries: int | None  # None where the store cannot tell cheaply (Redis)
    bytes: int | None
    evictions: int = 0
    refused: int = 0  # entries over `max_entry_bytes`


class CacheStore(Protocol):
    async def get(self, key: CacheKey) -> bytes | None: ...

    async def set(self, key: CacheKey, value: bytes, ttl: float) -> bool:
        """Store unless the value is over the entry bound; True when stored."""
        ...

    async def lock(self, key: CacheKey, ttl: float) -> bool:
        """Become the one request computing `key` (single flight); False when taken."""
        ...

    async def unlock(self, key: CacheKey) -> None: ...

    async def wait(self, key: CacheKey, within: float) -> bytes | None:
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
        # key -> (value, expiry, cost): an entry counts len(key) + len(value) +
        # entry_overhead against the bound (kept with it: evicting then reads one number
        # instead of measuring two objects, ~4% of a miss, for 32 B per entry)
        self._entries: OrderedDict[CacheKey, tuple[bytes, float, int]] = OrderedDict()
        self._locks: dict[CacheKey, float] = {}  # key -> when its lock expires
        # key -> the event its waiters wait on, made by the first of them (most leaders have
        # no waiter); set and dropped when the lock is freed
        self._waiters: dict[CacheKey, asyncio.Event] = {}

    # Each operation has a ``*_now`` form: nothing here waits, so the response cache calls
    # them without making a coroutine (the async forms are the `CacheStore` protocol).

    async def get(self, key: CacheKey) -> bytes | None:
        return self.get_now(key)

    def claim_now(self, key: CacheKey, lock_seconds: float) -> bytes | bool:
        """`get_now`, and on a miss `lock_now`, in one call (the miss path of every cacheable
        request): the entry; else True when this request now holds the key's lock, False
        when another one does."""
        now = self._clock()
        found = self._entries.get(key)
        if found is not None:
            if found[1] > now:
                self._entries.move_to_end(key)
                return found[0]
            self._drop(key)
        expires = now + lock_seconds
        held = self._locks.setdefault(key, expires)
        if held is expires:
            return True
        if held > now:
            return False
        self._locks[key] = expires  # a lock left to expire by a leader that went away
        return True

    def get_now(self, key: CacheKey) -> bytes | None:
        found = self._entries.get(key)
        if found is None:
            return None
        if found[1] <= self._clock():
            self._drop(key)
            return None
        self._entries.move_to_end(key)
        return found[0]

    async def set(self, key: CacheKey, value: bytes, ttl: float) -> bool:
        return self.set_now(key, value, ttl)

    def set_now(self, key: CacheKey, value: bytes, ttl: float, *, unlock: bool = False
                ) -> bool:
        """`set`; with `unlock`, the caller's lock on the key is freed too (stored or not), so
        that its waiters read the entry at once. `value` is kept as it is: it must not hold
        more memory than its length (see `encode_answer`)."""
        if unlock:  # `unlock_now` inline (a call is ~2% of a miss): its waiters run once
            self._locks.pop(key, None)  # this returns, with the entry in place
            if self._waiters:
                self._wake(key)
        length = len(value)
        cost = len(key) + length + self.entry_overhead
        if length > self.max_entry_bytes or cost > self.max_bytes:
            self.refused += 1
            return False
        entries = self._entries
        if key in entries:
            self._drop(key)
        entries[key] = (value, self._clock() + ttl, cost)
        size = self.size + cost
        while size > self.max_bytes:
            size -= entries.popitem(False)[1][2]  # the oldest (last=False, unparsed)
            self.evictions += 1
        self.size = size
        return True

    def _drop(self, key: CacheKey) -> None:
        self.size -= self._entries.pop(key)[2]

    async def lock(self, key: CacheKey, ttl: float) -> bool:
        return self.lock_now(key, ttl)

    def lock_now(self, key: CacheKey, ttl: float) -> bool:
        held = self._locks.get(key)
        now = self._clock()
        if held is not None and held > now:
            return False
        self._locks[key] = now + ttl
        return True

    async def unlock(self, key: CacheKey) -> None:
        self.unlock_now(key)

    def unlock_now(self, key: CacheKey) -> None:
        self._locks.pop(key, None)
        if self._waiters:
            self._wake(key)

    def _wake(self, key: CacheKey) -> None:
        event = self._waiters.pop(key, None)
        if event is not None:
            event.set()

    async def wait(self, key: CacheKey, within: float) -> bytes | None:
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
                    if not event.is_set() and self._waiters.get(key) is event \
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
        self._pollers: dict[CacheKey, asyncio.Future[bytes | None]] = {}

    def _keys(self, key: CacheKey) -> tuple[str, str]:
        # the response cache hands a shared store digests only: an in-process key (the
        # canonical body behind a process-local tag) would mean nothing to another replica
        assert isinstance(key, str), "Redis cache keys are digests"
        return self.ns.key(f"c:{key}", "v"), self.ns.key(f"c:{key}", "lock")

    # get, set and lock go through the namespace's auto-pipelining: the lookups and writes of
    # the requests of one loop turn share one round trip

    async def get(self, key: CacheKey) -> bytes | None:
        try:
            value = await self.ns.batch.call("GET", self._keys(key)[0])
        except (redis.exceptions.RedisError, OSError) as exc:
            raise unavailable(exc) from exc
        return value if isinstance(value, bytes) else None

    async def set(self, key: CacheKey, value: bytes, ttl: float) -> bool:
        if len(value) > self.max_entry_bytes:
            self.refused += 1
            return False
        try:
            await self.ns.batch.call("SET", self._keys(key)[0], value, "PX",
                                     max(1, int(ttl * 1000)))
        except (redis.exceptions.RedisError, OSError) as exc:
            raise unavailable(exc) from exc
        return True

    async def lock(self, key: CacheKey, ttl: float) -> bool:
        def abandoned(taken: object) -> None:
            if taken:  # the caller went away holding the lock: free it for the waiters
                self.ns.batch.cast_script(self.ns.script("cache_unlock"), [self._keys(key)[1]],
                                          [self._token])

        try:
            taken = await self.ns.batch.call("SET", self._keys(key)[1], self._token, "NX",
                                             "PX", max(1, int(ttl * 1000)),
                                             abandoned=abandoned)
        except (redis.exceptions.RedisError, OSError) as exc:
            raise unavailable(exc) from exc
        return bool(taken)

    async def unlock(self, key: CacheKey) -> None:
        try:
            await self.ns.script("cache_unlock")(keys=[self._keys(key)[1]], args=[self._token])
        except redis.exceptions.RedisError as exc:
            raise unavailable(exc) from exc

    async def wait(self, key: CacheKey, within: float) -> bytes | None:
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

    def _poller_done(self, key: CacheKey, poller: asyncio.Future[bytes | None]) -> None:
        if self._pollers.get(key) is poller:
            del self._pollers[key]
        if not poller.cancelled():
            poller.exception()  # retrieved here too: its waiters may all have timed out

    async def _poll(self, key: CacheKey, within: float) -> bytes | None:
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


def make_cache_store(config: GatewayConfig, ns: RedisNamespace | None) -> CacheStore:
    if ns is not None:
        return RedisCacheStore(ns, config.cache.max_entry_bytes)
    return MemoryCacheStore(config.cache.memory_max_bytes, config.cache.max_entry_bytes)
