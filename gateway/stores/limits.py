"""Rate-limit state: GCRA buckets, token budgets and concurrency leases behind `LimitStore`.

`acquire` checks and reserves every limit of one request in ONE atomic step (all or nothing);
`settle` corrects the token reservation by actual − estimated and releases the concurrency
lease. The Redis store runs each as one EVALSHA of a packaged Lua script
(``lua/limits_acquire.lua``, ``lua/limits_settle.lua``) using the server's clock.

Cluster layout: key, team and team+model limits must be checked together, atomically, so every
key of one request lives under ONE hash tag, the team's (``{prefix}:{lim:<team>}:...``). A key
id belongs to exactly one team, so per-key buckets sit in their team's slot too: each call
touches one slot, and a team's traffic is served by one shard (teams spread across shards).

Concurrency slots are leases in a sorted set scored by expiry: a replica that dies mid-request
leaks its slot only until the lease expires (the request timeout plus a margin).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Literal, NamedTuple, Protocol

from redis.exceptions import RedisError

from gateway.config import GatewayConfig
from gateway.stores.redis_base import RedisNamespace, unavailable

PERIOD = 60.0  # rpm / tpm: every bucket refills over one minute
Kind = Literal["requests", "tokens"]


class Bucket(NamedTuple):
    """A GCRA bucket: `limit` units per minute (burst up to `limit`), this request costs `cost`.
    `name` says which limit it is (``key_rpm``, ``team_tpm``, ``model_rpm``, ...); `scope` is
    its storage name inside the team's tag."""

    name: str
    scope: str
    kind: Kind
    limit: int
    cost: int


class Budget(NamedTuple):
    """A token budget for the current period (``daily_budget`` / ``monthly_budget``); `scope`
    names the period (``budget:d:20250131``), `ttl` is the seconds until it resets."""

    name: str
    scope: str
    limit: int
    cost: int
    ttl: float


class Concurrency(NamedTuple):
    scope: str
    limit: int
    lease_seconds: float


class AcquireRequest(NamedTuple):
    tag: str  # the team: every scope below lives under it
    buckets: tuple[Bucket, ...] = ()
    budgets: tuple[Budget, ...] = ()
    concurrency: Concurrency | None = None
    lease: str = ""  # a unique id for the concurrency lease

    @property
    def empty(self) -> bool:
        return not self.buckets and not self.budgets and self.concurrency is None


class Figure(NamedTuple):
    """One limit's state after the decision: units left and seconds until fully reset.
    (The request types here are named tuples: several are made per request, at a third of
    a frozen dataclass's cost.)"""

    name: str
    kind: Kind | Literal["budget"]
    limit: int
    remaining: int
    reset: float


class Decision(NamedTuple):
    admitted: bool
    denied: str | None  # the `name` of the limit that refused, or "concurrency"
    retry_after: float
    figures: tuple[Figure, ...]  # buckets then budgets, in request order
    in_flight: int = 0


class LimitStore(Protocol):
    async def acquire(self, request: AcquireRequest) -> Decision: ...

    async def settle(self, request: AcquireRequest, delta_tokens: int) -> None:
        """Move token buckets and budgets by `delta_tokens` (actual − estimated; may be
        negative) and release the request's concurrency lease."""
        ...


def _figures(request: AcquireRequest, flat: list[int]) -> tuple[Figure, ...]:
    found: list[Figure] = []
    i = 0
    for b in request.buckets:
        found.append(Figure(b.name, b.kind, b.limit, int(flat[i]), flat[i + 1] / 1000))
        i += 2
    for g in request.budgets:
        found.append(Figure(g.name, "budget", g.limit, int(flat[i]), flat[i + 1] / 1000))
        i += 2
    return tuple(found)


def _denied_name(request: AcquireRequest, index: int) -> str | None:
    if index == 0:
        return None
    if index <= len(request.buckets):
        return request.buckets[index - 1].name
    index -= len(request.buckets)
    if index <= len(request.budgets):
        return request.budgets[index - 1].name
    return "concurrency"


class MemoryLimitStore:
    """The same algorithm in-process (single replica, and the fail-open fallback). Each call
    runs without an ``await`` in between, so it is atomic on the event loop."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self._tats: dict[str, float] = {}  # ms
        self._budgets: dict[str, tuple[int, float]] = {}  # used, expires (ms)
        self._leases: dict[str, dict[str, float]] = {}
        self._calls = 0

    def _budget(self, name: str, now: float) -> int:
        used, expires = self._budgets.get(name, (0, 0.0))
        return used if expires > now else 0

    def _sweep(self, now: float) -> None:
        self._tats = {k: v for k, v in self._tats.items() if v > now}
        self._budgets = {k: v for k, v in self._budgets.items() if v[1] > now}
        self._leases = {k: v for k, v in self._leases.items() if v}

    async def acquire(self, request: AcquireRequest) -> Decision:
        now = self.clock() * 1000
        period = PERIOD * 1000
        self._calls += 1
        if self._calls % 4096 == 0:
            self._sweep(now)
        denied, retry = 0, 0.0
        flat: list[int] = []
        new_tats: list[float] = []
        for i, b in enumerate(request.buckets, 1):
            key = request.tag + ":" + b.scope
            T = period / b.limit
            tat = max(self._tats.get(key, now), now)
            allow_at = tat + min(b.cost, b.limit) * T - period
            if allow_at > now:
                if not denied:
                    denied, retry = i, allow_at - now
                new_tats.append(tat)
                flat += [max(0, math.floor((period - (tat - now)) / T)), math.ceil(tat - now)]
            else:
                new = tat + b.cost * T
                new_tats.append(new)
                flat += [max(0, math.floor((period - (new - now)) / T)), math.ceil(new - now)]
        nb = len(request.buckets)
        for j, g in enumerate(request.budgets, 1):
            used = self._budget(request.tag + ":" + g.scope, now)
            ttl_ms = math.ceil(g.ttl * 1000)
            if used + g.cost > g.limit:
                if not denied:
                    denied, retry = nb + j, float(ttl_ms)
                flat += [max(0, g.limit - used), ttl_ms]
            else:
                flat += [g.limit - used - g.cost, ttl_ms]
        in_flight = 0
        conc = request.concurrency
        leases: dict[str, float] = {}
        if conc is not None:
            key = request.tag + ":" + conc.scope
            leases = self._leases.setdefault(key, {})
            if len(leases) >= conc.limit:
                # at the cap: drop leases that expired (their requests never settled)
                for lease in [k for k, v in leases.items() if v <= now]:
                    del leases[lease]
            in_flight = len(leases)
            if in_flight >= conc.limit and not denied:
                denied, retry = nb + len(request.budgets) + 1, 1000.0
        if not denied:
            for b, tat in zip(request.buckets, new_tats, strict=True):
                self._tats[request.tag + ":" + b.scope] = tat
            for g in request.budgets:
                key = request.tag + ":" + g.scope
                used = self._budget(key, now)
                self._budgets[key] = (used + g.cost, now + g.ttl * 1000 + 60_000)
            if conc is not None:
                leases[request.lease] = now + conc.lease_seconds * 1000
                in_flight += 1
        return Decision(not denied, _denied_name(request, denied), math.ceil(retry) / 1000,
                        _figures(request, flat), in_flight)

    async def settle(self, request: AcquireRequest, delta_tokens: int) -> None:
        self.settle_now(request, delta_tokens)

    def settle_now(self, request: AcquireRequest, delta_tokens: int) -> None:
        """`settle` without the coroutine: nothing here waits."""
        now = self.clock() * 1000
        period = PERIOD * 1000
        if delta_tokens:
            for b in request.buckets:
                if b.kind != "tokens":
                    continue
                key = request.tag + ":" + b.scope
                tat = max(self._tats.get(key, now), now) + delta_tokens * period / b.limit
                if tat > now:
                    self._tats[key] = tat
                else:
                    self._tats.pop(key, None)
            for g in request.budgets:
                key = request.tag + ":" + g.scope
                used = max(0, self._budget(key, now) + delta_tokens)
                expires = self._budgets.get(key, (0, now + g.ttl * 1000 + 60_000))[1]
                self._budgets[key] = (used, expires)
        if request.concurrency is not None:
            leases = self._leases.get(request.tag + ":" + request.concurrency.scope)
            if leases is not None:
                leases.pop(request.lease, None)


class RedisLimitStore:
    """One EVALSHA per acquire and one per settle; redis errors become `ServiceUnavailable`
    (code ``store_unavailable``) so the limiter can fail open or closed."""

    def __init__(self, ns: RedisNamespace) -> None:
        self.ns = ns
        self._acquire = ns.script("limits_acquire")
        self._settle = ns.script("limits_settle")

    def _key(self, request: AcquireRequest, scope: str) -> str:
        return self.ns.key("lim:" + request.tag, scope)

    async def acquire(self, request: AcquireRequest) -> Decision:
        keys = [self._key(request, b.scope) for b in request.buckets]
        keys += [self._key(request, g.scope) for g in request.budgets]
        conc = request.concurrency
        args: list[str | int | float] = [
            len(request.buckets), len(request.budgets), 1 if conc else 0, request.lease,
            math.ceil(conc.lease_seconds * 1000) if conc else 0, conc.limit if conc else 0,
        ]
        for b in request.buckets:
            args += [b.limit, b.cost]
        for g in request.budgets:
            args += [g.limit, g.cost, math.ceil(g.ttl * 1000)]
        if conc is not None:
            keys.append(self._key(request, conc.scope))
        try:
            raw = await self._acquire(keys=keys, args=args)
        except (RedisError, OSError) as exc:
            raise unavailable(exc) from exc
        flat = [int(v) for v in raw]
        return Decision(flat[0] == 1, _denied_name(request, flat[1]), flat[2] / 1000,
                        _figures(request, flat[3:-1]), flat[-1])

    async def settle(self, request: AcquireRequest, delta_tokens: int) -> None:
        tokens = [b for b in request.buckets if b.kind == "tokens"] if delta_tokens else []
        budgets = list(request.budgets) if delta_tokens else []
        conc = request.concurrency
        if not tokens and not budgets and conc is None:
            return
        keys = [self._key(request, b.scope) for b in tokens]
        keys += [self._key(request, g.scope) for g in budgets]
        if conc is not None:
            keys.append(self._key(request, conc.scope))
        args: list[str | int | float] = [len(tokens), len(budgets), 1 if conc else 0,
                                         request.lease, delta_tokens]
        args += [b.limit for b in tokens]
        args += [math.ceil(g.ttl * 1000) for g in budgets]
        try:
            await self._settle(keys=keys, args=args)
        except (RedisError, OSError) as exc:
            raise unavailable(exc) from exc


def make_limit_store(config: GatewayConfig, ns: RedisNamespace | None) -> LimitStore:
    """Redis when `ns` is given (the config names a Redis store), else in-process."""
    return RedisLimitStore(ns) if ns is not None else MemoryLimitStore()
