"""Shared circuit-breaker state: which deployments are taken out, and who probes one whose
cooldown is over. In process for one replica; on Redis one replica's evidence protects all.

Keys (one hash tag, one cluster slot): ``{prefix}:{circuit}:open:<deployment>`` lives for the
cooldown; ``{prefix}:{circuit}:probe:<deployment>`` is held by the replica sending the one
probe request.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Protocol

from redis.exceptions import RedisError

from gateway.stores.redis_base import RedisNamespace, unavailable


class CircuitStore(Protocol):
    def trip(self, name: str, seconds: float) -> None:
        """Take `name` out for `seconds`, for every replica (fire-and-forget)."""
        ...

    async def opened(self) -> dict[str, float]:
        """The deployments taken out now, with the seconds left of their cooldown."""
        ...

    async def claim_probe(self, name: str, seconds: float) -> bool:
        """Become the one replica probing `name` (for at most `seconds`)."""
        ...

    def probe_done(self, name: str) -> None:
        """Give the probe back (fire-and-forget)."""
        ...


class MemoryCircuitStore:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._open: dict[str, float] = {}  # name -> when it closes
        self._probes: dict[str, float] = {}

    def trip(self, name: str, seconds: float) -> None:
        self._open[name] = self.clock() + seconds

    async def opened(self) -> dict[str, float]:
        now = self.clock()
        return {name: until - now for name, until in self._open.items() if until > now}

    async def claim_probe(self, name: str, seconds: float) -> bool:
        now = self.clock()
        if self._probes.get(name, 0.0) > now:
            return False
        self._probes[name] = now + seconds
        return True

    def probe_done(self, name: str) -> None:
        self._probes.pop(name, None)


class RedisCircuitStore:
    def __init__(self, ns: RedisNamespace, names: Sequence[str]) -> None:
        self.ns = ns
        self.names = tuple(names)

    def _key(self, kind: str, name: str) -> str:
        return self.ns.key("circuit", kind, name)

    def trip(self, name: str, seconds: float) -> None:
        self.ns.batch.cast("SET", self._key("open", name), "1", "PX",
                           max(1, int(seconds * 1000)))

    async def opened(self) -> dict[str, float]:
        if not self.names:
            return {}
        try:
            async with self.ns.client.pipeline(transaction=False) as pipe:
                for name in self.names:
                    pipe.pttl(self._key("open", name))
                left = await pipe.execute()
        except (RedisError, OSError) as exc:
            raise unavailable(exc) from exc
        return {name: int(ms) / 1000 for name, ms in zip(self.names, left, strict=True)
                if int(ms) > 0}

    async def claim_probe(self, name: str, seconds: float) -> bool:
        try:
            taken = await self.ns.batch.call("SET", self._key("probe", name), "1", "NX", "PX",
                                             max(1, int(seconds * 1000)))
        except (RedisError, OSError) as exc:
            raise unavailable(exc) from exc
        return bool(taken)

    def probe_done(self, name: str) -> None:
        self.ns.batch.cast("DEL", self._key("probe", name))
