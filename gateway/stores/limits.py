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
from typing import Literal, NamedTuple, Protocol, TypeVar

from redis.exceptions import RedisError

from gateway.config import GatewayConfig
from gateway.errors import ServiceUnavailable
from gateway.stores.redis_base import RedisNamespace, unavailable

PERIOD = 60.0  # rpm / tpm: every bucket refills over one minute
_PERIOD_MS = PERIOD * 1000
# What the GCRA checks and the remaining figures compare against: the period plus 10 µs of
# slack for floating point. A bucket's TAT sums `limit` emission intervals of period / limit
# ms, which can come to a hair over the period (17 x (60000 / 17) at the same `now`): without
# the slack the last request of a full burst within one clock tick was refused, rpm 17
# admitting 16. limits_acquire.lua has the same slack.
_WINDOW_MS = _PERIOD_MS + 0.01
# named tuples made on the hot path skip their Python-level __new__ (same fields, in order)
_new = tuple.__new__
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
    # the tightest requests and tokens figures (fewest remaining, then lowest limit) when the
    # store picked them on its way; None: the reader picks them from `figures`
    tightest: tuple[Figure | None, Figure | None] | None = None


class LimitStore(Protocol):
    async def acquire(self, request: AcquireRequest) -> Decision: ...

    async def settle(self, request: AcquireRequest, delta_tokens: int) -> None:
        """Move token buckets and budgets by `delta_tokens` (actual − estimated; may be
        negative) and release the request's concurrency lease."""
        ...

    def settle_later(self, request: AcquireRequest, delta_tokens: int,
                     failed: Callable[[ServiceUnavailable], None]) -> None:
        """`settle` without waiting for it (from the end of a request); an error goes to
        `failed`."""
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


class _Tat:
    """A GCRA bucket's state: its theoretical arrival time (ms since the epoch)."""

    __slots__ = ("tat",)

    def __init__(self) -> None:
        self.tat = 0.0


class _Used:
    """A budget's state for one period: tokens used, and when the entry expires (ms)."""

    __slots__ = ("used", "expires")

    def __init__(self) -> None:
        self.used = 0
        self.expires = 0.0


# bound bucket: state, emission interval (ms), limit, cost (-1: the call's tokens), tokens?
_BoundBucket = tuple[_Tat, float, int, int, bool]
# bound budget: state, limit, cost (-1: the call's tokens), period end (ms)
_BoundBudget = tuple[_Used, int, int, float]
# the tightest figures of an admission: requests limit, remaining, reset (ms), then tokens
# (a limit of 0: there is no bucket of that kind)
Tightest = tuple[int, int, float, int, int, float]


class BoundRequest:
    """An `AcquireRequest`'s limits bound to the in-process store's state cells, so that a
    check runs without a lookup. The limiter binds each request template once (token costs
    left open) and reuses it while `generation` equals the store's: a sweep of idle state
    starts a new generation."""

    __slots__ = ("request", "generation", "buckets", "requests", "tokens", "budgets", "leases",
                 "conc_limit", "lease_ms")

    def __init__(self, request: AcquireRequest, generation: int,
                 buckets: tuple[_BoundBucket, ...], budgets: tuple[_BoundBudget, ...],
                 leases: dict[str | int, float] | None, conc_limit: int,
                 lease_ms: float) -> None:
        self.request = request
        self.generation = generation
        self.buckets = buckets  # in request order
        # the same, by kind: the hot loops need no per-bucket branch
        self.requests = tuple(b[:4] for b in buckets if not b[4])
        self.tokens = tuple(b[:4] for b in buckets if b[4])
        self.budgets = budgets
        self.leases = leases
        self.conc_limit = conc_limit
        self.lease_ms = lease_ms


class MemoryLimitStore:
    """The same algorithm in-process (single replica, and the fail-open fallback). Nothing
    here awaits, so every call is atomic on the event loop.

    State lives in small cells per tag (team) and scope, which a `BoundRequest` references
    directly; every 4096 checks the cells of idle limits are dropped (a new generation)."""

    SWEEP_EVERY = 4096

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.generation = 0
        self._tats: dict[str, dict[str, _Tat]] = {}
        self._budgets: dict[str, dict[str, _Used]] = {}
        self._leases: dict[str, dict[str, dict[str | int, float]]] = {}
        self._calls = 0

    # -- binding -----------------------------------------------------------------------------

    def bind(self, request: AcquireRequest, *, open_tokens: bool = False) -> BoundRequest:
        """`request` bound to its state cells; with `open_tokens` the token buckets and
        budgets take their cost from each `reserve` call instead of the request."""
        tag = request.tag
        tats = self._tats.setdefault(tag, {})
        buckets: list[_BoundBucket] = []
        for b in request.buckets:
            cell = tats.get(b.scope)
            if cell is None:
                cell = tats[b.scope] = _Tat()
            tokens = b.kind == "tokens"
            buckets.append((cell, _PERIOD_MS / b.limit, b.limit,
                            -1 if tokens and open_tokens else b.cost, tokens))
        budgets: list[_BoundBudget] = []
        if request.budgets:
            used = self._budgets.setdefault(tag, {})
            end = self.clock() * 1000.0
            for g in request.budgets:
                entry = used.get(g.scope)
                if entry is None:
                    entry = used[g.scope] = _Used()
                budgets.append((entry, g.limit, -1 if open_tokens else g.cost,
                                end + math.ceil(g.ttl * 1000)))
        leases = None
        conc = request.concurrency
        if conc is not None:
            leases = self._leases.setdefault(tag, {}).setdefault(conc.scope, {})
        return BoundRequest(request, self.generation, tuple(buckets), tuple(budgets), leases,
                            conc.limit if conc else 0, conc.lease_seconds * 1000 if conc else 0)

    def _sweep(self, now: float) -> None:
        self._tats = _pruned(self._tats, lambda cell: cell.tat > now)
        self._budgets = _pruned(self._budgets, lambda cell: cell.expires > now)
        self._leases = _pruned(self._leases, bool)
        self.generation += 1

    # -- the hot path --------------------------------------------------------------------------

    def reserve(self, bound: BoundRequest, tokens: int, lease: str | int,
                now: float | None = None) -> Tightest | None:
        """Check every limit of `bound` and reserve them all, or none: the `Tightest`
        figures when admitted, None when a limit refused (`acquire_now` says which). Checks
        first, then commits, so that a refusal changes nothing. `now`: ms, else the clock's."""
        if now is None:
            now = self.clock() * 1000.0
        period = _WINDOW_MS
        for cell, interval, limit, cost in bound.requests:
            tat = cell.tat
            if (tat if tat > now else now) + (cost if cost < limit else limit) * interval \
                    - period > now:
                return None
        for cell, interval, limit, cost in bound.tokens:
            if cost < 0:
                cost = tokens
            tat = cell.tat
            if (tat if tat > now else now) + (cost if cost < limit else limit) * interval \
                    - period > now:
                return None
        for entry, limit, cost, _ in bound.budgets:
            if (entry.used if entry.expires > now else 0) + (tokens if cost < 0 else cost) \
                    > limit:
                return None
        leases = bound.leases
        if leases is not None:
            if len(leases) >= bound.conc_limit:
                # at the cap: drop leases that expired (their requests never settled)
                for gone in [k for k, v in leases.items() if v <= now]:
                    del leases[gone]
                if len(leases) >= bound.conc_limit:
                    return None
            leases[lease] = now + bound.lease_ms
        # commit, picking the tightest figure of each kind (fewest left, then lowest limit;
        # `left` stays a float until one is picked)
        rl = tl = 0
        rleft = tleft = rreset = treset = 0.0
        for cell, interval, limit, cost in bound.requests:
            tat = cell.tat
            tat = cell.tat = (tat if tat > now else now) + cost * interval
            left = (period - tat + now) // interval
            if not rl or left < rleft or (left == rleft and limit < rl):
                rl, rleft, rreset = limit, left, tat - now
        for cell, interval, limit, cost in bound.tokens:
            tat = cell.tat
            tat = cell.tat = (tat if tat > now else now) + (tokens if cost < 0 else cost) \
                * interval
            left = (period - tat + now) // interval
            if not tl or left < tleft or (left == tleft and limit < tl):
                tl, tleft, treset = limit, left, tat - now
        for entry, _, cost, end in bound.budgets:
            if cost < 0:
                cost = tokens
            if entry.expires > now:
                entry.used += cost
            else:
                entry.used, entry.expires = cost, end + 60_000
        self._calls += 1
        if self._calls % self.SWEEP_EVERY == 0:
            self._sweep(now)  # after the commit: `bound` is no longer used here
        return (rl, int(rleft) if rleft > 0 else 0, rreset,
                tl, int(tleft) if tleft > 0 else 0, treset)

    def release(self, bound: BoundRequest, delta_tokens: int, lease: str | int) -> None:
        """Settle a reservation: move its token buckets and budgets by `delta_tokens` and
        give back its concurrency lease."""
        if delta_tokens:
            now = self.clock() * 1000.0
            for cell, interval, _, _ in bound.tokens:
                tat = cell.tat
                cell.tat = (tat if tat > now else now) + delta_tokens * interval
            for entry, _, _, end in bound.budgets:
                if entry.expires > now:
                    entry.used = max(0, entry.used + delta_tokens)
                else:
                    entry.used, entry.expires = max(0, delta_tokens), end + 60_000
        if bound.leases is not None:
            bound.leases.pop(lease, None)

    # -- LimitStore --------------------------------------------------------------------------

    async def acquire(self, request: AcquireRequest) -> Decision:
        return self.acquire_now(request)

    def acquire_now(self, request: AcquireRequest) -> Decision:
        """`acquire` without the coroutine, with every figure (for refusals and tests)."""
        bound = self.bind(request)
        now = self.clock() * 1000.0
        before = [cell.tat for cell, *_ in bound.buckets]
        used = [entry.used if entry.expires > now else 0 for entry, *_ in bound.budgets]
        admitted = self.reserve(bound, 0, request.lease, now) is not None
        figures: list[Figure] = []
        denied, retry = 0, 0.0
        n = 0
        for b, (cell, interval, limit, cost, _) in zip(request.buckets, bound.buckets,
                                                     strict=True):
            n += 1
            if admitted:
                tat = cell.tat
            else:  # what this request would leave, where it fits
                tat = max(before[n - 1], now)
                allow_at = tat + min(cost, limit) * interval - _WINDOW_MS
                if allow_at <= now:
                    tat += cost * interval
                elif not denied:
                    denied, retry = n, allow_at - now
            ahead = tat - now
            left = int((_WINDOW_MS - ahead) // interval)
            figures.append(Figure(b.name, b.kind, limit, max(left, 0), math.ceil(ahead) / 1000))
        for g, (_, limit, cost, end), spent in zip(request.budgets, bound.budgets, used,
                                                  strict=True):
            n += 1
            left = limit - spent - cost
            if left < 0:
                left = max(limit - spent, 0)
                if not admitted and not denied:
                    denied, retry = n, float(math.ceil(end - now))
            figures.append(Figure(g.name, "budget", limit, left, math.ceil(end - now) / 1000))
        in_flight = len(bound.leases) if bound.leases is not None else 0
        if not admitted and not denied:
            denied, retry = n + 1, 1000.0  # only the concurrency cap is left
        return Decision(admitted, _denied_name(request, denied), math.ceil(retry) / 1000,
                        tuple(figures), in_flight)

    async def settle(self, request: AcquireRequest, delta_tokens: int) -> None:
        self.settle_now(request, delta_tokens)

    def settle_now(self, request: AcquireRequest, delta_tokens: int) -> None:
        self.release(self.bind(request), delta_tokens, request.lease)

    def settle_later(self, request: AcquireRequest, delta_tokens: int,
                     failed: Callable[[ServiceUnavailable], None]) -> None:
        self.settle_now(request, delta_tokens)  # nothing here can fail


_V = TypeVar("_V")


def _pruned(tree: dict[str, dict[str, _V]], alive: Callable[[_V], bool]
            ) -> dict[str, dict[str, _V]]:
    """`tree` (tag -> scope -> value) without the values that are not `alive` nor the tags
    left empty."""
    return {tag: kept for tag, inner in tree.items()
            if (kept := {k: v for k, v in inner.items() if alive(v)})}


class RedisLimitStore:
    """One EVALSHA per acquire and one per settle, auto-pipelined with the calls of other
    requests in the same loop turn (`Batcher`); redis errors become `ServiceUnavailable`
    (code ``store_unavailable``) so the limiter can fail open or closed."""

    def __init__(self, ns: RedisNamespace, *, clock: Callable[[], float] | None = None) -> None:
        self.ns = ns
        self.clock = clock  # tests only: the scripts use the server's clock when it is None
        self._acquire = ns.script("limits_acquire")
        self._settle = ns.script("limits_settle")

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
            args += [b.limit, b.cost]
        for g in request.budgets:
            args += [g.limit, g.cost, math.ceil(g.ttl * 1000)]
        if conc is not None:
            keys.append(self._key(request, conc.scope))

        def abandoned(raw: list[int]) -> None:
            # the caller went away while the check ran: give back what it reserved
            if int(raw[0]) == 1:
                self.settle_later(request, -_estimate(request), _ignore)

        try:
            raw = await self.ns.batch.run_script(self._acquire, keys, args, abandoned)
        except (RedisError, OSError) as exc:
            raise unavailable(exc) from exc
        flat = [int(v) for v in raw]
        return Decision(flat[0] == 1, _denied_name(request, flat[1]), flat[2] / 1000,
                        _figures(request, flat[3:-1]), flat[-1])

    def _settle_call(self, request: AcquireRequest, delta_tokens: int
                     ) -> tuple[list[str], list[str | int | float]] | None:
        tokens = [b for b in request.buckets if b.kind == "tokens"] if delta_tokens else []
        budgets = list(request.budgets) if delta_tokens else []
        conc = request.concurrency
        if not tokens and not budgets and conc is None:
            return None
        keys = [self._key(request, b.scope) for b in tokens]
        keys += [self._key(request, g.scope) for g in budgets]
        if conc is not None:
            keys.append(self._key(request, conc.scope))
        args: list[str | int | float] = [len(tokens), len(budgets), 1 if conc else 0,
                                         request.lease, delta_tokens, self._now()]
        args += [b.limit for b in tokens]
        args += [math.ceil(g.ttl * 1000) for g in budgets]
        return keys, args

    async def settle(self, request: AcquireRequest, delta_tokens: int) -> None:
        call = self._settle_call(request, delta_tokens)
        if call is None:
            return
        try:
            await self.ns.batch.run_script(self._settle, *call)
        except (RedisError, OSError) as exc:
            raise unavailable(exc) from exc

    def settle_later(self, request: AcquireRequest, delta_tokens: int,
                     failed: Callable[[ServiceUnavailable], None]) -> None:
        call = self._settle_call(request, delta_tokens)
        if call is not None:
            self.ns.batch.cast_script(self._settle, *call,
                                      failed=lambda exc: failed(unavailable(exc)))


def _estimate(request: AcquireRequest) -> int:
    """The tokens `request` reserved (every token bucket and budget reserves the same)."""
    for b in request.buckets:
        if b.kind == "tokens":
            return b.cost
    return request.budgets[0].cost if request.budgets else 0


def _ignore(exc: ServiceUnavailable) -> None:
    """A give-back that fails is lost like any failed settle: the lease expires by itself."""


def make_limit_store(config: GatewayConfig, ns: RedisNamespace | None) -> LimitStore:
    """Redis when `ns` is given (the config names a Redis store), else in-process."""
    return RedisLimitStore(ns) if ns is not None else MemoryLimitStore()
