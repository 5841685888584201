"""Admission control: turns a principal's limits into one atomic `LimitStore.acquire`, raises
the OpenAI-style 429s, and hands back the ``x-ratelimit-*`` headers and a one-shot `settle`.

Limits: requests and tokens per minute per key (the key's own, else ``limits.key_*``), per team
and per team+model (``teams:`` in the config, overridden by ``gateway teams set``), concurrent
requests per key, and daily/monthly token budgets per team (UTC periods). A principal with no
limit at all is admitted without touching any store.

When the shared store is unreachable: ``fail_open`` (default) admits through the in-process
`fallback` store (logged as ``limits_store_unavailable`` and counted through `on_unavailable`),
``fail_closed`` answers 503. The shared store is tried again after `retry_interval` seconds,
so a recovered Redis is picked up without a restart.
"""

from __future__ import annotations

import itertools
import math
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NamedTuple

import structlog

from gateway.config import GatewayConfig
from gateway.errors import QuotaExceeded, RateLimited, ServiceUnavailable
from gateway.stores.limits import (
    AcquireRequest,
    BoundRequest,
    Bucket,
    Budget,
    Concurrency,
    Decision,
    Figure,
    LimitStore,
    MemoryLimitStore,
    Tightest,
)

# named tuples made on the hot path skip their Python-level __new__ (same fields, in order)
_new = tuple.__new__

log = structlog.get_logger("gateway.limiter")

_TEMPLATES = 4096  # cached plans (key × model) before the cache starts over
_NAMES = {"rpm": "requests per minute (rpm)", "tpm": "tokens per minute (tpm)"}


_MILLIS = [f"{ms}ms".encode() for ms in range(1001)]  # the sub-second resets, made once


def format_reset(seconds: float) -> str:
    """OpenAI's reset format: ``20ms``, ``1s``, ``1.5s``, ``6m0s``, ``1h2m3s``."""
    return _reset(seconds).decode()


def _reset(seconds: float) -> bytes:
    if seconds < 1:
        ms = int(seconds * 1000 + 0.5)  # round() costs twice as much
        return _MILLIS[ms if ms > 0 else 0]
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    text = f"{secs:.3f}".rstrip("0").rstrip(".") + "s"
    if hours >= 1:
        text = f"{int(hours)}h{int(minutes)}m{text}"
    elif minutes >= 1:
        text = f"{int(minutes)}m{text}"
    return text.encode()


def _tightest(figures: tuple[Figure, ...]) -> tuple[Figure | None, Figure | None]:
    """The requests and the tokens figure with the fewest remaining, then the lowest limit."""
    requests: Figure | None = None
    tokens: Figure | None = None
    for f in figures:
        if f.kind == "requests":
            if requests is None or (f.remaining, f.limit) < (requests.remaining, requests.limit):
                requests = f
        elif f.kind == "tokens":
            if tokens is None or (f.remaining, f.limit) < (tokens.remaining, tokens.limit):
                tokens = f
    return requests, tokens


def _raw_headers(decision: Decision) -> list[tuple[bytes, bytes]]:
    """OpenAI's ``x-ratelimit-*`` trio for requests and for tokens, each from the tightest
    limit of its kind, encoded as the response sends them (no str round trip per request)."""
    requests, tokens = decision.tightest or _tightest(decision.figures)
    return _headers((requests.limit, requests.remaining, requests.reset) if requests else None,
                    (tokens.limit, tokens.remaining, tokens.reset) if tokens else None)


def _headers(requests: tuple[int, int, float] | None, tokens: tuple[int, int, float] | None
             ) -> list[tuple[bytes, bytes]]:
    """The two trios from (limit, remaining, reset seconds) of each kind, where present.
    Written out for both kinds: a ``zip(..., strict=True)`` loop cost twice as much."""
    headers: list[tuple[bytes, bytes]] = []
    if requests is not None:
        headers += ((_LIMIT_REQUESTS, b"%d" % requests[0]),
                    (_REMAINING_REQUESTS, b"%d" % requests[1]),
                    (_RESET_REQUESTS, _reset(requests[2])))
    if tokens is not None:
        headers += ((_LIMIT_TOKENS, b"%d" % tokens[0]),
                    (_REMAINING_TOKENS, b"%d" % tokens[1]),
                    (_RESET_TOKENS, _reset(tokens[2])))
    return headers


def _tightest_headers(t: Tightest) -> list[tuple[bytes, bytes]]:
    """The headers of a `MemoryLimitStore.reserve` admission (resets in ms, rounded up as
    `Figure` rounds them). The per-request path: `_headers` written out without its tuples."""
    rl, rleft, rreset, tl, tleft, treset = t
    headers: list[tuple[bytes, bytes]] = []
    if rl:
        ms = math.ceil(rreset)
        headers += ((_LIMIT_REQUESTS, b"%d" % rl), (_REMAINING_REQUESTS, b"%d" % rleft),
                    (_RESET_REQUESTS, _MILLIS[ms] if ms < 1000 else _reset(ms / 1000)))
    if tl:
        ms = math.ceil(treset)
        headers += ((_LIMIT_TOKENS, b"%d" % tl), (_REMAINING_TOKENS, b"%d" % tleft),
                    (_RESET_TOKENS, _MILLIS[ms] if ms < 1000 else _reset(ms / 1000)))
    return headers


def _decoded(raw: list[tuple[bytes, bytes]]) -> dict[str, str]:
    return {name.decode(): value.decode() for name, value in raw}


_LIMIT_REQUESTS, _REMAINING_REQUESTS, _RESET_REQUESTS = (
    b"x-ratelimit-limit-requests", b"x-ratelimit-remaining-requests", b"x-ratelimit-reset-requests")
_LIMIT_TOKENS, _REMAINING_TOKENS, _RESET_TOKENS = (
    b"x-ratelimit-limit-tokens", b"x-ratelimit-remaining-tokens", b"x-ratelimit-reset-tokens")


class Admission:
    """An admitted request: `raw_headers` for the response, `settle(actual)` exactly once
    (later calls do nothing)."""

    __slots__ = ("raw_headers", "_limiter", "_store", "_request", "_estimate", "_settled")

    def __init__(self, raw_headers: list[tuple[bytes, bytes]], limiter: Limiter | None = None,
                 store: LimitStore | None = None, request: AcquireRequest | None = None,
                 estimate: int = 0) -> None:
        self.raw_headers = raw_headers
        self._limiter = limiter
        self._store = store
        self._request = request
        self._estimate = estimate
        self._settled = False

    @property
    def headers(self) -> dict[str, str]:
        """`raw_headers` as text (for error replies made after admission)."""
        return _decoded(self.raw_headers)

    def settle_now(self, actual_tokens: int) -> bool:
        """Settle without a task: the in-process store settles at once, Redis queues the
        call in the next pipeline (a failure is logged and counted). Always True."""
        if self._settled or self._store is None or self._request is None:
            return True
        self._settled = True
        self._store.settle_later(self._request, actual_tokens - self._estimate,
                                 self._settle_failed)
        return True

    async def settle(self, actual_tokens: int) -> None:
        if self._settled or self._store is None or self._request is None:
            return
        self._settled = True
        try:
            await self._store.settle(self._request, actual_tokens - self._estimate)
        except ServiceUnavailable as exc:
            self._settle_failed(exc)

    def _settle_failed(self, exc: ServiceUnavailable) -> None:
        # the lease expires by itself; the token correction is lost
        log.warning("limits_settle_failed", error=exc.code)
        if self._limiter is not None:
            self._limiter.unavailable()


UNLIMITED = Admission([])


class BoundAdmission:
    """An admission by the in-process store's bound path (`Limiter.admit_now`): settling
    releases what `MemoryLimitStore.reserve` reserved, at once, exactly once."""

    __slots__ = ("raw_headers", "_store", "_bound", "_estimate", "_lease", "_settled")

    def __init__(self, raw_headers: list[tuple[bytes, bytes]], store: MemoryLimitStore,
                 bound: BoundRequest, estimate: int, lease: int) -> None:
        self.raw_headers = raw_headers
        self._store = store
        self._bound = bound
        self._estimate = estimate
        self._lease = lease
        self._settled = False

    @property
    def headers(self) -> dict[str, str]:
        return _decoded(self.raw_headers)

    def settle_now(self, actual_tokens: int) -> bool:
        if not self._settled:
            self._settled = True
            self._store.release(self._bound, actual_tokens - self._estimate, self._lease)
        return True

    async def settle(self, actual_tokens: int) -> None:
        self.settle_now(actual_tokens)


class Limiter:
    """Implements the pipeline's `Admitter`."""

    def __init__(
        self,
        config: GatewayConfig,
        store: LimitStore,
        fallback: LimitStore | None = None,
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
        self._down_until = 0.0
        totals = [b.timeouts.total for b in config.backends.values()] or [300.0]
        self.lease_seconds = max(totals) + 60.0
        self._lease_prefix = secrets.token_hex(6) + ":"
        self._leases = itertools.count()
        defaults = config.limits
        self._key_rpm, self._key_tpm = defaults.key_rpm, defaults.key_tpm
        self._key_conc = defaults.key_max_concurrent
        self._periods = _Periods.at(-1)
        self._templates: dict[tuple[str, str], _Template] = {}
        # the in-process store's bound plans: (principal, bound or None: unlimited, periods)
        self._bound: dict[tuple[str, str], tuple[Any, BoundRequest | None, _Periods | None]] = {}
        self._lease_ids = itertools.count()

    def unavailable(self) -> None:
        if self.on_unavailable is not None:
            self.on_unavailable()

    # -- plan --------------------------------------------------------------------------------

    def plan(self, principal: Any, model: str, tokens: int) -> AcquireRequest | None:
        """The limits that apply to this request, or None when none do."""
        cached = self._templates.get((principal.key_id, model))
        if cached is None or cached.principal is not principal:
            if len(self._templates) >= _TEMPLATES:
                self._templates.clear()
            cached = self._templates[(principal.key_id, model)] = self._template(principal, model)
        if cached.unlimited:
            return None
        buckets = tuple([b if b.kind == "requests" else _new(Bucket, (*b[:4], tokens))
                         for b in cached.buckets])
        budgets: tuple[Budget, ...] = ()
        if cached.budgets:
            wall = self.clock()
            periods = self._periods
            if periods.second != int(wall):
                periods = self._periods = _Periods.at(int(wall))
            budgets = tuple([
                _new(Budget, (name, periods.day, limit, tokens, periods.day_end - wall)) if daily
                else _new(Budget, (name, periods.month, limit, tokens, periods.month_end - wall))
                for name, limit, daily in cached.budgets
            ])
        return _new(AcquireRequest, (principal.team, buckets, budgets, cached.concurrency,
                                     self._lease_prefix + str(next(self._leases))))

    def _template(self, principal: Any, model: str) -> _Template:
        """What `plan` needs of a principal's limits for one model, worked out once (per
        principal object: a changed key or team is a new principal)."""
        key_id: str = principal.key_id
        rpm = getattr(principal, "rpm", None) or self._key_rpm
        tpm = getattr(principal, "tpm", None) or self._key_tpm
        conc = getattr(principal, "max_concurrent", None) or self._key_conc
        team = getattr(principal, "team_limits", None)
        buckets: list[Bucket] = []  # token buckets get their cost per request
        budgets: list[tuple[str, int, bool]] = []
        if rpm:
            buckets.append(Bucket("key_rpm", f"k:{key_id}:rpm", "requests", rpm, 1))
        if tpm:
            buckets.append(Bucket("key_tpm", f"k:{key_id}:tpm", "tokens", tpm, 0))
        if team is not None and team.any:
            if team.rpm:
                buckets.append(Bucket("team_rpm", "t:rpm", "requests", team.rpm, 1))
            if team.tpm:
                buckets.append(Bucket("team_tpm", "t:tpm", "tokens", team.tpm, 0))
            per_model = team.models.get(model)
            if per_model is not None:
                if per_model.rpm:
                    buckets.append(Bucket("model_rpm", f"m:{model}:rpm", "requests",
                                          per_model.rpm, 1))
                if per_model.tpm:
                    buckets.append(Bucket("model_tpm", f"m:{model}:tpm", "tokens",
                                          per_model.tpm, 0))
            if team.daily_token_budget:
                budgets.append(("daily_budget", team.daily_token_budget, True))
            if team.monthly_token_budget:
                budgets.append(("monthly_budget", team.monthly_token_budget, False))
        concurrency = Concurrency(f"c:{key_id}", conc, self.lease_seconds) if conc else None
        return _Template(principal, tuple(buckets), tuple(budgets), concurrency,
                         not (buckets or budgets or concurrency))

    # -- admission ---------------------------------------------------------------------------

    def admit_now(self, principal: Any, model: str, estimated_tokens: int
                  ) -> Admission | BoundAdmission | None:
        """`admit` without a coroutine when the store is in-process: one `reserve` over
        state cells bound once per key and model. None: await `admit` instead (another
        store, or a refusal, which `admit` words with every figure)."""
        store = self.store
        if not isinstance(store, MemoryLimitStore):
            return None
        found = self._bound.get((principal.key_id, model))
        if found is None or found[0] is not principal or (
                found[1] is not None and found[1].generation != store.generation) or (
                found[2] is not None and self._period_changed(found[2])):
            found = self._bind(principal, model, store)
        bound = found[1]
        if bound is None:
            return UNLIMITED
        lease = next(self._lease_ids)
        got = store.reserve(bound, estimated_tokens, lease)
        if got is None:
            return None
        return BoundAdmission(_tightest_headers(got), store, bound, estimated_tokens, lease)

    def _bind(self, principal: Any, model: str, store: MemoryLimitStore
              ) -> tuple[Any, BoundRequest | None, _Periods | None]:
        if len(self._bound) >= _TEMPLATES:
            self._bound.clear()
        request = self.plan(principal, model, 0)
        bound = store.bind(request, open_tokens=True) if request is not None else None
        periods = self._periods if request is not None and request.budgets else None
        found = self._bound[(principal.key_id, model)] = (principal, bound, periods)
        return found

    def _period_changed(self, periods: _Periods) -> bool:
        """Whether a day or month began since `periods` (the budgets' cells change)."""
        wall = self.clock()
        return wall >= periods.day_end or wall >= periods.month_end

    async def admit(self, principal: Any, model: str, estimated_tokens: int) -> Admission:
        request = self.plan(principal, model, estimated_tokens)
        if request is None:
            return UNLIMITED
        store = self.store
        decision: Decision | None = None
        if not self._down_until or self._down_until <= time.monotonic():
            try:
                if isinstance(store, MemoryLimitStore):
                    decision = store.acquire_now(request)
                else:
                    decision = await store.acquire(request)
            except ServiceUnavailable as exc:
                self._down_until = time.monotonic() + self.retry_interval
                log.warning("limits_store_unavailable", error=exc.code,
                            fail_mode=self.config.limits.fail_mode)
                self.unavailable()
        if decision is None:
            if not self.fail_open:
                raise ServiceUnavailable(
                    "Rate limits cannot be checked: the gateway's shared store is unreachable. "
                    "Retry shortly.",
                    code="store_unavailable",
                )
            store = self.fallback
            decision = await store.acquire(request)
        if not decision.admitted:
            raise self._refusal(principal, model, request, decision)
        return Admission(_raw_headers(decision), self, store, request, estimated_tokens)

    def _refusal(self, principal: Any, model: str, request: AcquireRequest,
                 decision: Decision) -> RateLimited | QuotaExceeded:
        name = decision.denied or ""
        headers = _decoded(_raw_headers(decision))
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
                f"tokens (this request reserves about {_cost(request, name)} tokens). The budget "
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


def _cost(request: AcquireRequest, name: str) -> int:
    return next((g.cost for g in request.budgets if g.name == name), 0)


class _Template(NamedTuple):
    principal: Any
    buckets: tuple[Bucket, ...]  # token buckets with cost 0: `plan` fills it in
    budgets: tuple[tuple[str, int, bool], ...]  # name, limit, daily (else monthly)
    concurrency: Concurrency | None
    unlimited: bool


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
