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


_V = TypeVar("_V")


def _pruned(tree: dict[str, dict[str, _V]], alive: Callable[[_V], bool]
            ) -> dict[str, dict[str, _V]]:
    """`tree` (tag -> scope -> value) without the values that are not `alive` nor the tags
    left empty."""
    return {tag: kept for tag, inner in tree.items()
            if (kept := {k: v for k, v in inner.items() if alive(v)})}


class MemoryLimitStore:
    """The same algorithm in-process (single replica, and the fail-open fallback). Each call
    runs without an ``await`` in between, so it is atomic on the event loop.

    State is kept per tag (team), then per scope: the scope strings come from the limiter's
    cached plans, so the lookups hash nothing new on the hot path."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self._tats: dict[str, dict[str, float]] = {}  # ms
        self._budgets: dict[str, dict[str, tuple[int, float]]] = {}  # used, expires (ms)
        self._leases: dict[str, dict[str, dict[str, float]]] = {}
        self._calls = 0

    def _sweep(self, now: float) -> None:
        self._tats = _pruned(self._tats, lambda tat: tat > now)
        self._budgets = _pruned(self._budgets, lambda entry: entry[1] > now)
        self._leases = _pruned(self._leases, bool)

    async def acquire(self, request: AcquireRequest) -> Decision:
        return self.acquire_now(request)

    def acquire_now(self, request: AcquireRequest) -> Decision:
        """`acquire` without the coroutine: nothing here waits. (The hot path of every limited
        request: one pass per limit; what it reserved is put back if a later limit refuses.)"""
        now = self.clock() * 1000.0
        self._calls += 1
        if self._calls & 4095 == 0:
            self._sweep(now)
        tag = request.tag
        tats = self._tats.get(tag)
        if tats is None:
            tats = self._tats[tag] = {}
        denied, retry = 0, 0.0
        period, new, ceil = _PERIOD_MS, _new, math.ceil  # locals: this loop is the hot path
        figures: list[Figure] = []
        undo: list[tuple[str, float | None]] = []
        requests: Figure | None = None
        tokens: Figure | None = None
        i = 0
        for name, scope, kind, limit, cost in request.buckets:
            i += 1
            interval = period / limit
            old = tats.get(scope)
            tat = old if old is not None and old > now else now
            allow_at = tat + (cost if cost < limit else limit) * interval - period
            if allow_at > now:
                if not denied:
                    denied, retry = i, allow_at - now
            elif not denied:
                tat += cost * interval
                tats[scope] = tat
                undo.append((scope, old))
            else:
                tat += cost * interval  # what it would be: the figures show it
            ahead = tat - now
            left = int((period - ahead) // interval)
            figure = new(Figure, (name, kind, limit, left if left > 0 else 0, ceil(ahead) / 1000))
            figures.append(figure)
            if kind == "requests":
                if requests is None or figure[3] < requests[3] or (
                        figure[3] == requests[3] and limit < requests[2]):
                    requests = figure
            elif tokens is None or figure[3] < tokens[3] or (
                    figure[3] == tokens[3] and limit < tokens[2]):
                tokens = figure
        entries: list[tuple[int, float] | None] = []
        budgets: dict[str, tuple[int, float]] = {}
        if request.budgets:
            found = self._budgets.get(tag)
            budgets = found if found is not None else self._budgets.setdefault(tag, budgets)
            for name, scope, limit, cost, ttl in request.budgets:
                i += 1
                entry = budgets.get(scope)
                if entry is not None and entry[1] <= now:
                    entry = None  # the period is over
                entries.append(entry)
                used = entry[0] if entry is not None else 0
                ttl_ms = math.ceil(ttl * 1000)
                left = limit - used - cost
                if left < 0:
                    if not denied:
                        denied, retry = i, float(ttl_ms)
                    left = limit - used if used < limit else 0
                figures.append(_new(Figure, (name, "budget", limit, left, ttl_ms / 1000)))
        in_flight = 0
        conc = request.concurrency
        if conc is not None:
            tagged = self._leases.get(tag)
            if tagged is None:
                tagged = self._leases[tag] = {}
            leases = tagged.get(conc.scope)
            if leases is None:
                leases = tagged[conc.scope] = {}
            elif len(leases) >= conc.limit:
                # at the cap: drop leases that expired (their requests never settled)
                for lease in [k for k, v in leases.items() if v <= now]:
                    del leases[lease]
            in_flight = len(leases)
            if in_flight >= conc.limit:
                if not denied:
                    denied, retry = i + 1, 1000.0
            elif not denied:
                leases[request.lease] = now + conc.lease_seconds * 1000
                in_flight += 1
        if denied:
            for scope, old in reversed(undo):
                if old is None:
                    del tats[scope]
                else:
                    tats[scope] = old
            return Decision(False, _denied_name(request, denied), math.ceil(retry) / 1000,
                            tuple(figures), in_flight, (requests, tokens))
        for j, (_, scope, _, cost, ttl) in enumerate(request.budgets):
            entry = entries[j]  # (a zip with strict=True costs ~1 µs per call)
            if entry is not None:
                budgets[scope] = (entry[0] + cost, entry[1])
            else:
                budgets[scope] = (cost, now + ttl * 1000 + 60_000)
        return _new(Decision, (True, None, 0.0, tuple(figures), in_flight, (requests, tokens)))

    async def settle(self, request: AcquireRequest, delta_tokens: int) -> None:
        self.settle_now(request, delta_tokens)

    def settle_later(self, request: AcquireRequest, delta_tokens: int,
                     failed: Callable[[ServiceUnavailable], None]) -> None:
        self.settle_now(request, delta_tokens)  # nothing here can fail

    def settle_now(self, request: AcquireRequest, delta_tokens: int) -> None:
        """`settle` without the coroutine: nothing here waits."""
        tag = request.tag
        if delta_tokens:
            now = self.clock() * 1000.0
            tats = self._tats.get(tag)
            if tats is None:
                tats = self._tats[tag] = {}
            for _, scope, kind, limit, _ in request.buckets:
                if kind == "tokens":
                    tat = tats.get(scope, now)
                    tat = (tat if tat > now else now) + delta_tokens * _PERIOD_MS / limit
                    if tat > now:
                        tats[scope] = tat
                    else:
                        tats.pop(scope, None)
            if request.budgets:
                budgets = self._budgets.get(tag)
                if budgets is None:
                    budgets = self._budgets[tag] = {}
                for _, scope, _, _, ttl in request.budgets:
                    entry = budgets.get(scope)
                    if entry is not None and entry[1] > now:
                        budgets[scope] = (max(0, entry[0] + delta_tokens), entry[1])
                    else:
                        budgets[scope] = (max(0, delta_tokens), now + ttl * 1000 + 60_000)
        conc = request.concurrency
        if conc is not None:
            tagged = self._leases.get(tag)
            if tagged is not None:
                leases = tagged.get(conc.scope)
                if leases is not None:
                    leases.pop(request.lease, None)


class RedisLimitStore:
    """One EVALSHA per acquire and one per settle, auto-pipelined with the calls of other
    requests in the same loop turn (`Batcher`); redis errors become `ServiceUnavailable`
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
                                         request.lease, delta_tokens]
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
