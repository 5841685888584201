"""Admission control: turns a principal's limits into one atomic `LimitStore.acquire`, raises
the OpenAI-style 429s, and hands back the ``x-ratelimit-*`` headers and a one-shot `settle`.

Limits: requests and tokens per minute per key (the key's own, else ``limits.key_*``), per team
and per team+model (``teams:`` in the config, overridden by ``gateway teams set``), concurrent
requests per key, and daily/monthly token budgets per team (UTC periods). A principal with no
limit at all is admitted without touching any store.

When the shared store is unreachable: ``fail_open`` (default) admits through the in-process
`fallback` store (logged as ``limits_store_unavailable`` and counted through `on_unavailable`),
``fail_closed`` answers 503. So that an incident does not hand out fresh bursts:

- the fallback starts from the last figures the shared store gave for each limit (a key that
  had spent its burst has none left locally either);
- each replica counts on its share of a limit: the limit divided by the replicas that were
  live (each beats in the store every `BEAT_SECONDS`);
- when the shared store answers again (tried every `retry_interval` seconds) it first takes
  what the fallback counted (the larger of the two, per limit), so a Redis that came back
  empty does not grant another burst.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from datetime import UTC, datetime

import structlog

from gateway.auth import Principal
from gateway.config import GatewayConfig
from gateway.errors import QuotaExceeded, RateLimited, ServiceUnavailable
from gateway.stores.limits import (
    AcquireRequest,
    Bucket,
    Budget,
    Concurrency,
    Decision,
    Figure,
    Held,
    Kind,
    LimitStore,
    MemoryLimitStore,
)

log = structlog.get_logger("gateway.limiter")

_PLANS = 4096  # cached plans (key × model) before the cache starts over
_REMEMBERED = 16_384  # limits whose last figures are kept for the fallback
BEAT_SECONDS = 2.0  # how often a replica says it is live
ALIVE_SECONDS = 10.0  # a replica not heard from for this long is not counted
_NAMES = {"rpm": "requests per minute (rpm)", "tpm": "tokens per minute (tpm)"}
_HEADER_NAMES = {kind: tuple(f"x-ratelimit-{field}-{kind}".encode()
                             for field in ("limit", "remaining", "reset"))
                 for kind in ("requests", "tokens")}


def format_reset(seconds: float) -> str:
    """OpenAI's reset format: ``20ms``, ``1s``, ``1.5s``, ``6m0s``, ``1h2m3s``."""
    if seconds < 1:
        return f"{max(int(seconds * 1000 + 0.5), 0)}ms"
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    text = f"{secs:.3f}".rstrip("0").rstrip(".") + "s"
    if hours >= 1:
        return f"{int(hours)}h{int(minutes)}m{text}"
    if minutes >= 1:
        return f"{int(minutes)}m{text}"
    return text


def rate_limit_headers(figures: Iterable[Figure]) -> list[tuple[bytes, bytes]]:
    """OpenAI's ``x-ratelimit-{limit,remaining,reset}-{requests,tokens}``, each kind from its
    tightest limit (fewest remaining, then the lowest), encoded as the response sends them.
    Budgets have no header of their own (an exhausted one says so in its 429)."""
    tightest: dict[str, Figure] = {}
    for f in figures:
        best = tightest.get(f.kind)
        if best is None or (f.remaining, f.limit) < (best.remaining, best.limit):
            tightest[f.kind] = f
    headers: list[tuple[bytes, bytes]] = []
    for kind, (limit, remaining, reset) in _HEADER_NAMES.items():
        top = tightest.get(kind)
        if top is not None:
            headers += ((limit, b"%d" % top.limit), (remaining, b"%d" % top.remaining),
                        (reset, format_reset(top.reset).encode()))
    return headers


class Admission:
    """An admitted request: `headers` for the response, and `settle(actual_tokens)`, which
    corrects the token reservation and frees the concurrency slot once (later calls do
    nothing). It never waits and never raises: the store reports its own failures."""

    __slots__ = ("headers", "_store", "_request")

    def __init__(self, headers: list[tuple[bytes, bytes]], store: LimitStore | None,
                 request: AcquireRequest | None) -> None:
        self.headers = headers
        self._store = store
        self._request = request

    def settle(self, actual_tokens: int) -> None:
        request, self._request = self._request, None
        if request is not None and self._store is not None:
            self._store.settle(request, actual_tokens - request.tokens)


_UNLIMITED = Admission([], None, None)


@dataclass(frozen=True, slots=True)
class _Plan:
    """The limits of one principal on one model, worked out once per principal object (a
    changed key or team is a new principal)."""

    principal: Principal
    buckets: tuple[Bucket, ...]
    daily_budget: int | None
    monthly_budget: int | None
    concurrency: Concurrency | None

    @property
    def unlimited(self) -> bool:
        return not (self.buckets or self.daily_budget or self.monthly_budget
                    or self.concurrency)


class Limiter:
    """Implements the pipeline's `Admitter`."""

    def __init__(
        self,
        config: GatewayConfig,
        store: LimitStore,
        fallback: MemoryLimitStore | None = None,
        *,
        on_unavailable: Callable[[], None] | None = None,
        retry_interval: float = 1.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.store = store
        # fail_open needs somewhere to count: the in-process store unless one is given
        self.fallback = fallback if fallback is not None else MemoryLimitStore(clock)
        self.fail_open = config.limits.fail_mode == "fail_open"
        self.on_unavailable = on_unavailable
        self.retry_interval = retry_interval
        self.clock = clock
        self._down_until = 0.0  # time.monotonic() before which the store is not tried
        totals = [b.timeouts.total for b in config.backends.values()] or [300.0]
        self.lease_seconds = max(totals) + 60.0
        self._lease_prefix = secrets.token_hex(6) + ":"
        self._leases = itertools.count()
        self._periods = _Periods.at(-1)
        self._plans: dict[tuple[str, str], _Plan] = {}
        # (team, scope) -> the last figure the shared store gave, with the local time (ms)
        self._last: dict[tuple[str, str], tuple[Figure, float]] = {}
        self._degraded = False  # the fallback has counted since the shared store went away
        self._recovering = asyncio.Lock()
        self.replica = secrets.token_hex(6)
        self.replicas = 1  # live replicas, as the store last said
        self._beating: asyncio.Task[None] | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Beat in the shared store, so that every replica knows how many share a limit."""
        self._beating = asyncio.create_task(self._beat(), name="limits-replicas")

    async def aclose(self) -> None:
        if self._beating is not None:
            self._beating.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._beating

    async def _beat(self) -> None:
        while True:
            with contextlib.suppress(ServiceUnavailable):  # keep the last count meanwhile
                self.replicas = await self.store.live_replicas(self.replica, ALIVE_SECONDS)
            await asyncio.sleep(BEAT_SECONDS)

    async def admit(self, principal: Principal, model: str, estimated_tokens: int) -> Admission:
        plan = self._plans.get((principal.key_id, model))
        if plan is None or plan.principal is not principal:
            plan = self._plan(principal, model)
        if plan.unlimited:
            return _UNLIMITED
        request = AcquireRequest(principal.team, plan.buckets, self._budgets(plan),
                                 plan.concurrency, self._lease_prefix + str(next(self._leases)),
                                 estimated_tokens)
        store: LimitStore = self.store
        decision = None
        if self._down_until <= time.monotonic():
            try:
                if self._degraded:
                    await self._recover()
                decision = await store.acquire(request)
                self._remember(request, decision)
            except ServiceUnavailable as exc:
                await self._went_away(exc)
        if decision is None:
            if not self.fail_open:
                raise ServiceUnavailable(
                    "Rate limits cannot be checked: the gateway's shared store is "
                    "unreachable. Retry shortly.", code="store_unavailable")
            store, request = self.fallback, self._shared(request)
            decision = await store.acquire(request)
        if not decision.admitted:
            raise self._refusal(principal, model, request, decision)
        return Admission(rate_limit_headers(decision.figures), store, request)

    # -- store incidents ---------------------------------------------------------------------

    def _remember(self, request: AcquireRequest, decision: Decision) -> None:
        """The shared store's last figures, where the fallback would start from."""
        now = self.clock() * 1000.0
        scopes = [b.scope for b in request.buckets] + [g.scope for g in request.budgets]
        if len(self._last) >= _REMEMBERED:
            self._last.clear()
        for scope, figure in zip(scopes, decision.figures, strict=True):
            self._last[(request.tag, scope)] = (figure, now)

    async def _went_away(self, exc: ServiceUnavailable) -> None:
        """The shared store did not answer: it is not tried again for `retry_interval`;
        failing open, the fallback counts from now on, starting (once per incident) from the
        store's last figures."""
        log.warning("limits_store_unavailable", error=exc.code, replicas=self.replicas,
                    fail_mode=self.config.limits.fail_mode)
        if self.on_unavailable is not None:
            self.on_unavailable()
        self._down_until = time.monotonic() + self.retry_interval
        if self.fail_open and not self._degraded:
            self._degraded = True
            self.fallback.clear()
            await self.fallback.merge(self._seeds())

    def _seeds(self) -> list[Held]:
        now = self.clock() * 1000.0
        seeds = []
        for (tag, scope), (figure, at) in self._last.items():
            if figure.kind == "budget":
                seeds.append(Held(tag, scope, "budget", figure.limit - figure.remaining,
                                  at + figure.reset * 1000 - now))
            else:  # the time at which the bucket is full again, as ms from now
                seeds.append(Held(tag, scope, "bucket", at + figure.reset * 1000 - now))
        return seeds

    def _shared(self, request: AcquireRequest) -> AcquireRequest:
        """`request` with each rate and the concurrency cap divided among the live replicas
        (budgets are not: an incident of minutes is a sliver of a day's)."""
        n = self.replicas
        if n <= 1:
            return request
        conc = request.concurrency
        return replace(
            request,
            buckets=tuple(replace(b, limit=max(b.limit // n, 1)) for b in request.buckets),
            concurrency=replace(conc, limit=math.ceil(conc.limit / n)) if conc else None)

    async def _recover(self) -> None:
        """Before the shared store admits again, it takes what the fallback counted."""
        async with self._recovering:
            if not self._degraded:
                return  # another request did it meanwhile
            await self.store.merge(self.fallback.held())
            self._degraded = False
            self.fallback.clear()
            log.info("limits_store_recovered")

    # -- plan --------------------------------------------------------------------------------

    def _plan(self, principal: Principal, model: str) -> _Plan:
        """The limits that apply to `principal` on `model`, worked out and cached."""
        key, team = principal.key_id, principal.team_limits
        per_model = team.models.get(model)
        defaults = self.config.limits
        limits: list[tuple[str, str, Kind, int | None]] = [
            ("key_rpm", f"k:{key}:rpm", "requests", principal.rpm or defaults.key_rpm),
            ("key_tpm", f"k:{key}:tpm", "tokens", principal.tpm or defaults.key_tpm),
            ("team_rpm", "t:rpm", "requests", team.rpm),
            ("team_tpm", "t:tpm", "tokens", team.tpm),
            ("model_rpm", f"m:{model}:rpm", "requests", per_model.rpm if per_model else None),
            ("model_tpm", f"m:{model}:tpm", "tokens", per_model.tpm if per_model else None),
        ]
        conc = principal.max_concurrent or defaults.key_max_concurrent
        plan = _Plan(principal,
                     tuple(Bucket(name, scope, kind, limit)
                           for name, scope, kind, limit in limits if limit),
                     team.daily_token_budget, team.monthly_token_budget,
                     Concurrency(f"c:{key}", conc, self.lease_seconds) if conc else None)
        if len(self._plans) >= _PLANS:
            self._plans.clear()
        self._plans[(key, model)] = plan
        return plan

    def _budgets(self, plan: _Plan) -> tuple[Budget, ...]:
        """The plan's token budgets in their current UTC day and month."""
        if not (plan.daily_budget or plan.monthly_budget):
            return ()
        wall = self.clock()
        periods = self._periods
        if periods.second != int(wall):
            periods = self._periods = _Periods.at(int(wall))
        budgets = []
        if plan.daily_budget:
            budgets.append(Budget("daily_budget", periods.day, plan.daily_budget,
                                  periods.day_end - wall))
        if plan.monthly_budget:
            budgets.append(Budget("monthly_budget", periods.month, plan.monthly_budget,
                                  periods.month_end - wall))
        return tuple(budgets)

    # -- refusal -----------------------------------------------------------------------------

    def _refusal(self, principal: Principal, model: str, request: AcquireRequest,
                 decision: Decision) -> RateLimited | QuotaExceeded:
        name = decision.denied or ""
        headers = {header.decode(): value.decode()
                   for header, value in rate_limit_headers(decision.figures)}
        retry = decision.retry_after
        if name == "concurrency":
            limit = request.concurrency.limit if request.concurrency else 0
            return RateLimited(
                f"Too many concurrent requests on key {principal.key_id}: limit {limit}. "
                "Retry when one of your requests has finished.",
                retry_after=retry, headers=headers,
            )
        figure = next(f for f in decision.figures if f.name == name)
        if figure.kind == "budget":
            period = "daily" if name == "daily_budget" else "monthly"
            resets = datetime.fromtimestamp(self.clock() + figure.reset, UTC)
            return QuotaExceeded(
                f"Team {principal.team} has used its {period} token budget of {figure.limit} "
                f"tokens (this request reserves about {request.tokens} tokens). The budget "
                f"resets at {resets.strftime('%Y-%m-%dT%H:%M:%SZ')} "
                f"(in {format_reset(figure.reset)}).",
                headers=headers,
            )
        scope, _, unit = name.partition("_")
        where = {
            "key": f"key {principal.key_id}",
            "team": f"team {principal.team}",
            "model": f"team {principal.team} for model {model}",
        }[scope]
        message = (f"Rate limit reached for {_NAMES[unit]} on {where}: limit {figure.limit}. "
                   f"Please try again in {format_reset(retry)}.")
        return RateLimited(message, retry_after=retry, headers=headers)


@dataclass(frozen=True, slots=True)
class _Periods:
    """The budget periods (UTC day and month) of one wall-clock second: their scopes and
    when they end. Computed once per second, not per request."""

    second: int
    day: str
    day_end: float
    month: str
    month_end: float

    @classmethod
    def at(cls, second: int) -> _Periods:
        now = datetime.fromtimestamp(second, UTC)
        day = now.replace(hour=0, minute=0, second=0, microsecond=0)
        month = day.replace(day=1)
        following = month.replace(year=month.year + 1, month=1) if month.month == 12 else \
            month.replace(month=month.month + 1)
        return cls(second, f"b:d:{now:%Y%m%d}", day.timestamp() + 86400,
                   f"b:m:{now:%Y%m}", following.timestamp())
