"""Rate-limit state behind `LimitStore`: GCRA buckets, token budgets and concurrency leases,
in process (`MemoryLimitStore`) or on Redis (`RedisLimitStore`).

`acquire` checks and reserves every limit of one request in ONE atomic step (all or nothing);
`settle` corrects the token reservation by actual − estimated and releases the concurrency
lease, without making its caller wait. The Redis store runs each as one EVALSHA of a packaged
Lua script (``lua/limits_acquire.lua``, ``lua/limits_settle.lua``) using the server's clock;
`MemoryLimitStore` is the same algorithm in Python.

Cluster layout: key, team and team+model limits must be checked together, atomically, so every
key of one request lives under ONE hash tag, the team's (``{prefix}:{lim:<team>}:...``). A key
id belongs to exactly one team, so per-key buckets sit in their team's slot too: each call
touches one slot, and a team's traffic is served by one shard (teams spread across shards).

Concurrency slots are leases in a sorted set scored by expiry: a replica that dies mid-request
leaks its slot only until the lease expires (the request timeout plus a margin).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, TypeVar

import structlog
from redis.exceptions import RedisError

from gateway.errors import ServiceUnavailable
from gateway.stores.redis_base import RedisNamespace, unavailable

log = structlog.get_logger("gateway.stores.limits")

_PERIOD_MS = 60_000.0  # rpm / tpm: every bucket refills over one minute
# What the GCRA checks and the remaining figures compare against: the period plus slack for
# floating point. A TAT near today's unix time in ms is a double whose last bit is worth
# 0.24 µs, so each emission interval added to it can round that much over: a full burst of
# `limit` requests at one instant summed to more than the period and its last request was
# refused. Requests of `cost` fill a bucket in limit / cost additions, so the slack is that
# many last bits (and at least 10 µs). limits_acquire.lua has the same slack.
_SLACK_PER_ADDITION_MS = 0.00025
_MIN_SLACK_MS = 0.01


def _window(limit: int, cost: int) -> float:
    return _PERIOD_MS + max(_MIN_SLACK_MS, limit / max(cost, 1) * _SLACK_PER_ADDITION_MS)
Kind = Literal["requests", "tokens"]


@dataclass(frozen=True, slots=True)
class Bucket:
    """A GCRA bucket of `limit` units per minute (bursts up to `limit`): a ``requests`` bucket
    costs 1 per request, a ``tokens`` bucket the request's `tokens`. `name` says which limit
    it is (``key_rpm``, ``team_tpm``, ``model_rpm``, ...); `scope` is its storage name inside
    the team's tag."""

    name: str
    scope: str
    kind: Kind
    limit: int


# Budget, AcquireRequest, Figure and Decision are made per request: plain dataclasses, which
# build several times faster than frozen ones.
@dataclass(slots=True)
class Budget:
    """A token budget for the current period (``daily_budget`` / ``monthly_budget``); `scope`
    names the period (``b:d:20250131``), `ttl` is the seconds until it resets."""

    name: str
    scope: str
    limit: int
    ttl: float


@dataclass(frozen=True, slots=True)
class Concurrency:
    scope: str
    limit: int
    lease_seconds: float


@dataclass(slots=True)
class AcquireRequest:
    """Every limit of one request. Each tokens bucket and budget reserves `tokens`."""

    tag: str  # the team: every scope below lives under it
    buckets: tuple[Bucket, ...] = ()
    budgets: tuple[Budget, ...] = ()
    concurrency: Concurrency | None = None
    lease: str = ""  # a unique id for the concurrency lease
    tokens: int = 0

    def cost(self, bucket: Bucket) -> int:
        return self.tokens if bucket.kind == "tokens" else 1


@dataclass(slots=True)
class Figure:
    """One limit's state after the decision: units left and seconds until fully reset."""

    name: str
    kind: Kind | Literal["budget"]
    limit: int
    remaining: int
    reset: float


@dataclass(slots=True)
class Decision:
    admitted: bool
    denied: str | None  # the `name` of the limit that refused, or "concurrency"
    retry_after: float  # seconds
    figures: tuple[Figure, ...]  # buckets then budgets, in request order


@dataclass(frozen=True, slots=True)
class Held:
    """What a store holds for one limit, to hand to another store: a bucket's TAT as ms ahead
    of now (`ttl_ms` 0), or a budget's tokens used and the ms until its count expires."""

    tag: str
    scope: str
    kind: Literal["bucket", "budget"]
    value: float
    ttl_ms: float = 0.0


class LimitStore(Protocol):
    async def acquire(self, request: AcquireRequest) -> Decision: ...

    async def merge(self, held: Sequence[Held]) -> None:
        """Keep, for each limit, the larger of what the store holds and `held`."""
        ...

    async def live_replicas(self, replica: str, alive_seconds: float) -> int:
        """Count `replica` as live now, and return how many were live within
        `alive_seconds` (itself included)."""
        ...

    def settle(self, request: AcquireRequest, delta_tokens: int) -> None:
        """Move token buckets and budgets by `delta_tokens` (actual − estimated; may be
        negative) and release the request's concurrency lease. Never raises and never
        waits: a store that can fail reports it to the callback it was built with."""
        ...


def _denied_name(request: AcquireRequest, index: int) -> str | None:
    """The name of the limit at `index` (1-based over buckets, budgets, concurrency; 0 for
    none), the scripts' way of saying which limit refused."""
    if index == 0:
        return None
    if index <= len(request.buckets):
        return request.buckets[index - 1].name
    index -= len(request.buckets)
    if index <= len(request.budgets):
        return request.budgets[index - 1].name
    return "concurrency"


@dataclass(slots=True)
class _Spent:
    """A budget's tokens used in its period, and when the count expires (ms)."""

    used: int
    expires: float


class MemoryLimitStore:
    """The same algorithm in process (a single replica, and the fail-open fallback). Nothing
    here awaits, so every call is atomic on the event loop. Every `SWEEP_EVERY` admissions,
    the state of limits that are idle (full again, expired, no lease) is dropped."""

    SWEEP_EVERY = 4096

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        # tag -> scope -> state: a bucket's TAT (ms), a budget's count, a key's leases' expiry
        self._tats: dict[str, dict[str, float]] = {}
        self._budgets: dict[str, dict[str, _Spent]] = {}
        self._leases: dict[str, dict[str, dict[str, float]]] = {}
        self._calls = 0

    async def acquire(self, request: AcquireRequest) -> Decision:
        now = self.clock() * 1000.0
        tats = self._tats.setdefault(request.tag, {})
        denied, retry = 0, 0.0
        figures: list[Figure] = []
        after: list[float] = []  # each bucket's TAT once this request is counted, where it fits
        # GCRA: a request of `cost` fits when tat + cost * interval - period <= now
        for i, b in enumerate(request.buckets, 1):
            interval = _PERIOD_MS / b.limit
            cost = request.cost(b)
            window = _window(b.limit, cost)
            tat = tats.get(b.scope, now)
            if tat < now:
                tat = now
            allow_at = tat + min(cost, b.limit) * interval - window
            if allow_at <= now:
                tat += cost * interval
            elif not denied:
                denied, retry = i, allow_at - now
            after.append(tat)
            left = math.floor((window - (tat - now)) / interval)
            figures.append(Figure(b.name, b.kind, b.limit, max(left, 0),
                                  math.ceil(tat - now) / 1000))
        spent = self._budgets.setdefault(request.tag, {}) if request.budgets else {}
        for i, g in enumerate(request.budgets, len(request.buckets) + 1):
            ttl = math.ceil(g.ttl * 1000)
            used = _used(spent.get(g.scope), now)
            left = g.limit - used - request.tokens
            if left < 0:
                left = max(g.limit - used, 0)
                if not denied:
                    denied, retry = i, ttl
            figures.append(Figure(g.name, "budget", g.limit, left, ttl / 1000))
        leases = None
        conc = request.concurrency
        if conc is not None:
            leases = self._leases.setdefault(request.tag, {}).setdefault(conc.scope, {})
            if not denied and not _lease_free(leases, conc.limit, now):
                denied, retry = len(figures) + 1, 1000.0
        if not denied:
            self._commit(request, tats, after, spent, leases, now)
        return Decision(not denied, _denied_name(request, denied), math.ceil(retry) / 1000,
                        tuple(figures))

    def _commit(self, request: AcquireRequest, tats: dict[str, float], after: list[float],
                spent: dict[str, _Spent], leases: dict[str, float] | None, now: float) -> None:
        for b, tat in zip(request.buckets, after, strict=True):
            tats[b.scope] = tat
        for g in request.budgets:
            _charge(spent, g, request.tokens, now)
        if leases is not None and request.concurrency is not None:
            leases[request.lease] = now + request.concurrency.lease_seconds * 1000
        self._calls += 1
        if self._calls % self.SWEEP_EVERY == 0:
            self._sweep(now)

    def settle(self, request: AcquireRequest, delta_tokens: int) -> None:
        now = self.clock() * 1000.0
        if delta_tokens:
            tats = self._tats.setdefault(request.tag, {})
            for b in request.buckets:
                if b.kind == "tokens":
                    tat = max(tats.get(b.scope, now), now)
                    tats[b.scope] = tat + delta_tokens * (_PERIOD_MS / b.limit)
            spent = self._budgets.setdefault(request.tag, {}) if request.budgets else {}
            for g in request.budgets:
                _charge(spent, g, delta_tokens, now)
        conc = request.concurrency
        if conc is not None:
            self._leases.setdefault(request.tag, {}).setdefault(conc.scope, {}).pop(
                request.lease, None)

    async def merge(self, held: Sequence[Held]) -> None:
        now = self.clock() * 1000.0
        for h in held:
            if h.kind == "bucket":
                tats = self._tats.setdefault(h.tag, {})
                tats[h.scope] = max(tats.get(h.scope, now), now + h.value)
                continue
            spent = self._budgets.setdefault(h.tag, {})
            current = _used(spent.get(h.scope), now)
            if h.value > current:
                spent[h.scope] = _Spent(int(h.value), now + h.ttl_ms)

    def held(self) -> list[Held]:
        """Every limit this store counts on now (what `merge` takes), to hand over."""
        now = self.clock() * 1000.0
        found = [Held(tag, scope, "bucket", tat - now)
                 for tag, tats in self._tats.items() for scope, tat in tats.items()
                 if tat > now]
        found += [Held(tag, scope, "budget", entry.used, entry.expires - now)
                  for tag, spent in self._budgets.items() for scope, entry in spent.items()
                  if entry.expires > now and entry.used]
        return found

    def clear(self) -> None:
        self._tats, self._budgets, self._leases = {}, {}, {}

    async def live_replicas(self, replica: str, alive_seconds: float) -> int:
        return 1  # in process there is no other replica to share with

    def _sweep(self, now: float) -> None:
        self._tats = _pruned(self._tats, lambda tat: tat > now)
        self._budgets = _pruned(self._budgets, lambda entry: entry.expires > now)
        self._leases = _pruned(self._leases, bool)


def _used(entry: _Spent | None, now: float) -> int:
    """A budget's tokens used in the current period."""
    return entry.used if entry is not None and entry.expires > now else 0


def _charge(spent: dict[str, _Spent], budget: Budget, tokens: int, now: float) -> None:
    """Count `tokens` (negative: given back) on a budget; a new period starts from nothing."""
    entry = spent.get(budget.scope)
    if entry is not None and entry.expires > now:
        entry.used = max(entry.used + tokens, 0)
    else:  # kept a minute past the period's end, as on Redis
        spent[budget.scope] = _Spent(max(tokens, 0), now + math.ceil(budget.ttl * 1000) + 60_000)


def _lease_free(leases: dict[str, float], limit: int, now: float) -> bool:
    """Whether a concurrency slot is free, at the cap after dropping the leases that expired
    (their requests never settled)."""
    if len(leases) >= limit:
        for lease in [lease for lease, expires in leases.items() if expires <= now]:
            del leases[lease]
    return len(leases) < limit


_V = TypeVar("_V")


def _pruned(tree: dict[str, dict[str, _V]], alive: Callable[[_V], bool]
            ) -> dict[str, dict[str, _V]]:
    """`tree` (tag -> scope -> value) without the values that are not `alive` nor the tags
    left empty."""
    return {tag: kept for tag, inner in tree.items()
            if (kept := {k: v for k, v in inner.items() if alive(v)})}


class RedisLimitStore:
    """One EVALSHA per acquire and one per settle, auto-pipelined with the calls of other
    requests in the same loop turn (`Batcher`). Redis errors become `ServiceUnavailable`
    (code ``store_unavailable``): raised by `acquire`, so the limiter can fail open or closed;
    logged and handed to `on_error` for a settle, which nobody waits for."""

    def __init__(self, ns: RedisNamespace,
                 on_error: Callable[[ServiceUnavailable], None] | None = None, *,
                 clock: Callable[[], float] | None = None) -> None:
        self.ns = ns
        self.on_error = on_error
        self.clock = clock  # tests only: the scripts use the server's clock when it is None
        self._acquire = ns.script("limits_acquire")
        self._settle = ns.script("limits_settle")
        self._merge = ns.script("limits_merge")
        self._replicas = ns.key("replicas", "live")

    def _now(self) -> str | float:
        """The scripts' ``now_ms`` argument: empty, for the server's clock, unless a test
        gave a clock."""
        return "" if self.clock is None else self.clock() * 1000.0

    def _key(self, request: AcquireRequest, scope: str) -> str:
        return self.ns.key("lim:" + request.tag, scope)

    async def acquire(self, request: AcquireRequest) -> Decision:
        keys = [self._key(request, b.scope) for b in request.buckets]
        keys += [self._key(request, g.scope) for g in request.budgets]
        conc = request.concurrency
        args: list[str | int | float] = [
            len(request.buckets), len(request.budgets), 1 if conc else 0, request.lease,
            math.ceil(conc.lease_seconds * 1000) if conc else 0, conc.limit if conc else 0,
            self._now(),
        ]
        for b in request.buckets:
            args += [b.limit, request.cost(b)]
        for g in request.budgets:
            args += [g.limit, request.tokens, math.ceil(g.ttl * 1000)]
        if conc is not None:
            keys.append(self._key(request, conc.scope))

        def abandoned(raw: list[int]) -> None:
            # the caller went away while the check ran: give back what it reserved
            if int(raw[0]) == 1:
                self.settle(request, -request.tokens)

        try:
            raw = await self.ns.batch.run_script(self._acquire, keys, args, abandoned)
        except (RedisError, OSError) as exc:
            raise unavailable(exc) from exc
        flat = [int(v) for v in raw]
        return Decision(flat[0] == 1, _denied_name(request, flat[1]), flat[2] / 1000,
                        _figures(request, flat[3:]))

    def settle(self, request: AcquireRequest, delta_tokens: int) -> None:
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
                                         request.lease, delta_tokens, self._now()]
        args += [b.limit for b in tokens]
        args += [math.ceil(g.ttl * 1000) for g in budgets]
        self.ns.batch.cast_script(self._settle, keys, args, failed=self._settle_failed)

    async def merge(self, held: Sequence[Held]) -> None:
        by_tag: dict[str, list[Held]] = {}
        for h in held:
            by_tag.setdefault(h.tag, []).append(h)
        try:  # one script per team: its keys share the team's hash tag
            await asyncio.gather(*(
                self.ns.batch.run_script(
                    self._merge, [self.ns.key("lim:" + tag, h.scope) for h in items],
                    [self._now(), *(v for h in items
                                    for v in (h.kind, h.value, math.ceil(h.ttl_ms)))])
                for tag, items in by_tag.items()))
        except (RedisError, OSError) as exc:
            raise unavailable(exc) from exc

    async def live_replicas(self, replica: str, alive_seconds: float) -> int:
        now = time.time()
        try:
            async with self.ns.client.pipeline(transaction=True) as pipe:
                pipe.zadd(self._replicas, {replica: now})
                pipe.zremrangebyscore(self._replicas, "-inf", now - alive_seconds)
                pipe.zcard(self._replicas)
                pipe.expire(self._replicas, math.ceil(alive_seconds) * 2)
                replies = await pipe.execute()
        except (RedisError, OSError) as exc:
            raise unavailable(exc) from exc
        return max(int(replies[2]), 1)

    def _settle_failed(self, exc: BaseException) -> None:
        # the lease expires by itself; the token correction is lost
        error = unavailable(exc)
        log.warning("limits_settle_failed", error=error.code)
        if self.on_error is not None:
            self.on_error(error)


def _figures(request: AcquireRequest, flat: list[int]) -> tuple[Figure, ...]:
    """The scripts' (remaining, reset ms) pairs, per bucket then per budget, as figures."""
    found: list[Figure] = []
    i = 0
    for b in request.buckets:
        found.append(Figure(b.name, b.kind, b.limit, flat[i], flat[i + 1] / 1000))
        i += 2
    for g in request.budgets:
        found.append(Figure(g.name, "budget", g.limit, flat[i], flat[i + 1] / 1000))
        i += 2
    return tuple(found)
