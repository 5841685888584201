"""The router: opens an answer for a model on one of its deployments, retrying while nothing
has reached the client, then on its fallback models.

For each model in turn (the one asked for, then its `fallbacks`), up to 1 + `retries`
attempts: each goes to a deployment whose circuit allows it, chosen by weight among those
not tried yet (the least busy of two picks), else the same one again. An attempt that fails
with something worth retrying (a refused connection, a timeout, a 429, a 5xx, Nuclia's
overload statuses, a stream that broke before its first chunk) is followed, after an
exponential backoff with full jitter (or the upstream's ``retry-after`` when it fits in
``routing.max_wait``), by the next one, if the backend's retry budget allows; other errors (a
4xx about the request) end the request at once. A stream is handed to the client only once
its first chunks arrived, so a retry never repeats something the client saw.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from gateway.backends.base import Batch, ChunkStream, Route, UpstreamCall
from gateway.config import RoutingConfig
from gateway.errors import (
    GatewayError,
    ServiceUnavailable,
    UpstreamAuthError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamRateLimited,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from gateway.health import DeploymentHealth
from gateway.routing.budget import RetryBudget
from gateway.routing.circuits import Circuits
from gateway.routing.table import Deployment, ModelPlan
from gateway.routing.traffic import Traffic

T = TypeVar("T")
# statuses of an upstream that may answer the same request on the next try (529 and 530 are
# Nuclia's: its rephrasing or retrieval stage was overloaded)
RETRY_STATUSES = frozenset({500, 502, 503, 504, 529, 530})


def retryable(exc: GatewayError) -> bool:
    """Whether a failure before the first byte is worth another attempt."""
    if isinstance(exc, UpstreamAuthError) or not isinstance(exc, UpstreamError):
        return False  # our credentials, or the request itself: the same answer again
    if isinstance(exc, UpstreamUnavailable | UpstreamTimeout | UpstreamRateLimited
                  | UpstreamProtocolError):
        return True
    return exc.upstream_status is None or exc.upstream_status in RETRY_STATUSES


def retry_after(exc: GatewayError) -> float | None:
    try:
        return float(exc.headers["retry-after"])
    except (KeyError, ValueError):
        return None


@dataclass(slots=True)
class Served(Generic[T]):
    """An answer opened on `deployment` of `model` (a fallback's name when one answered),
    after `attempts` upstream calls."""

    result: T
    deployment: Deployment
    call: UpstreamCall  # the answering attempt's (its reply headers, its route)
    model: str
    attempts: int


class RoutingFailed(Exception):
    """Every attempt failed: `error` is the last failure, told to the client."""

    def __init__(self, error: GatewayError, attempts: int) -> None:
        super().__init__(error.message)
        self.error = error
        self.attempts = attempts


class Router:
    def __init__(self, plans: Mapping[str, ModelPlan], config: RoutingConfig,
                 circuits: Circuits, budget: RetryBudget, traffic: Traffic, *,
                 on_attempt: Callable[[Deployment, str], None] = lambda d, outcome: None,
                 sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
                 rng: random.Random | None = None) -> None:
        self.plans = plans
        self.config = config
        self.circuits = circuits
        self.budget = budget
        self.traffic = traffic
        self.on_attempt = on_attempt  # (deployment, outcome): for the metrics
        self.sleep = sleep
        self.rng = rng or random.Random()
        self._busy: dict[str, int] = {}  # requests in flight per deployment, on this replica
        # each model followed by its fallbacks: the models a request may be answered by
        self._chains = {name: (plan, *(plans[f] for f in plan.fallbacks))
                        for name, plan in plans.items()}

    def health(self) -> list[dict[str, Any]]:
        """Per model, its deployments with their circuit and requests in flight here."""
        circuits = {row["deployment"]: row for row in self.circuits.health()}
        return [{"model": plan.model, "retries": plan.retries, "fallbacks": list(plan.fallbacks),
                 "deployments": [{**circuits[d.name], "upstream_model": d.route.upstream_model,
                                  "weight": d.weight, "in_flight": self._busy.get(d.name, 0)}
                                 for d in plan.deployments]}
                for plan in self.plans.values()]

    async def deployments(self) -> list[DeploymentHealth]:
        """Each deployment's circuit (the console's `HealthSource`)."""
        rows = []
        for row in self.circuits.health():
            detail = f"back in {row['reopens_in']:.0f} s" if row["reopens_in"] is not None \
                else None
            rows.append(DeploymentHealth(str(row["deployment"]), str(row["deployment"]),
                                         str(row["state"]).replace("_", "-"),
                                         int(str(row["recent_errors"])), detail))
        return rows

    # `stream` and `complete` hand back `_serve`'s coroutine rather than awaiting it: every
    # frame in an await chain is resumed at each of the upstream's reads
    def stream(self, plan: ModelPlan, call: Callable[[Route], UpstreamCall]
               ) -> Awaitable[Served[ChunkStream]]:
        return self._serve(plan, call, _open_stream)

    def complete(self, plan: ModelPlan, call: Callable[[Route], UpstreamCall]
                 ) -> Awaitable[Served[dict[str, Any]]]:
        return self._serve(plan, call, _complete)

    async def _serve(self, plan: ModelPlan, call: Callable[[Route], UpstreamCall],
                     attempt: Callable[[Deployment, UpstreamCall], Awaitable[T]]) -> Served[T]:
        """Attempts on `plan`'s deployments, then on each fallback's, until one answers."""
        deadline = time.monotonic() + self.config.max_wait  # for waits between attempts
        count = 0  # attempts made
        last: GatewayError | None = None  # the last attempt's failure
        for model in self._chains[plan.model]:
            tried: set[str] = set()
            for n in range(1 + model.retries):
                deployment = await self._pick(model, tried, retry=count > 0)
                if deployment is None:
                    break  # nothing left to try on this model: its fallback, if any
                tried.add(deployment.name)
                self.traffic.attempt(deployment.name, retry=count > 0)
                count += 1
                self._busy[deployment.name] = self._busy.get(deployment.name, 0) + 1
                upstream = call(deployment.route)
                try:
                    with upstream.trace.attempt(deployment.name,
                                                deployment.route.upstream_model, count):
                        result = await attempt(deployment, upstream)
                except GatewayError as exc:
                    if not self._failed(deployment, exc):
                        raise RoutingFailed(exc, count) from exc
                    last = exc
                    untried = any(d.name not in tried for d in model.deployments)
                    if not await self._back_off(n, exc, deadline, untried=untried):
                        break
                    continue
                finally:
                    self._busy[deployment.name] -= 1
                self.circuits.record(deployment.name, ok=True)
                self.on_attempt(deployment, "success")
                return Served(result, deployment, upstream, model.model, count)
        error = last or ServiceUnavailable(
            f"No deployment of the model '{plan.model}' is available: they are taken out "
            "after repeated failures. Retry shortly.", code="deployments_unavailable")
        raise RoutingFailed(error, count)

    def _failed(self, deployment: Deployment, exc: GatewayError) -> bool:
        """Count a failed attempt; whether another one is worth it."""
        again = retryable(exc)
        # a 4xx about the request says nothing about the deployment's health
        if again or isinstance(exc, UpstreamAuthError):
            self.circuits.record(deployment.name, ok=False)
        else:
            self.circuits.record(deployment.name, ok=True)
        self.on_attempt(deployment, "retryable_error" if again else "error")
        return again

    async def _back_off(self, n: int, exc: GatewayError, deadline: float, *,
                        untried: bool) -> bool:
        """Before the next attempt: none when another deployment is still untried; else the
        upstream's retry-after, or an exponential backoff with full jitter. False when that
        wait does not fit in what is left of `max_wait` (a fallback, if any, goes next)."""
        if untried:
            return True
        backoff = self.config.backoff
        asked = retry_after(exc)
        wait = asked if asked is not None else self.rng.uniform(
            0, min(backoff.max, backoff.initial * 2 ** n))
        if wait > deadline - time.monotonic():
            return False
        await self.sleep(wait)
        return True

    async def _pick(self, plan: ModelPlan, tried: set[str], *, retry: bool
                    ) -> Deployment | None:
        """A deployment with credentials, budget (for a retry) and a circuit that allows it:
        weighted among the untried (the less busy of two picks), else one already tried."""
        for choice in self._ranked(plan.deployments, tried):
            if choice.missing:
                continue
            if retry and not self.budget.allows_retry(choice.name):
                self.on_attempt(choice, "budget_exhausted")
                continue
            if await self.circuits.allow(choice.name):
                return choice
        return None

    def _ranked(self, deployments: tuple[Deployment, ...], tried: set[str]
                ) -> Sequence[Deployment]:
        """The order to try deployments in: the untried first, each next one the less busy
        of two picks by weight."""
        if len(deployments) == 1:
            return deployments
        pool, order = list(deployments), []
        while pool:
            a, b = self.rng.choices(pool, [d.weight for d in pool], k=2)
            choice = a if self._busy.get(a.name, 0) <= self._busy.get(b.name, 0) else b
            order.append(choice)
            pool.remove(choice)
        return sorted(order, key=lambda d: d.name in tried)  # stable: untried first


def _complete(deployment: Deployment, upstream: UpstreamCall) -> Awaitable[dict[str, Any]]:
    return deployment.backend.complete(upstream)


async def _open_stream(deployment: Deployment, upstream: UpstreamCall) -> ChunkStream:
    """The deployment's stream once its first batch arrived (a failure before it is the
    open's failure: the attempt's, which may be retried)."""
    stream = await deployment.backend.stream(upstream)
    batches = stream.batches()
    try:
        first = await anext(batches, None)
    except BaseException:
        await stream.aclose()
        raise
    return _Begun(stream, batches, first)


class _Begun:
    """A stream whose first batch was read: it is given first, then the rest."""

    def __init__(self, stream: ChunkStream, rest: AsyncGenerator[Batch, None],
                 first: Batch | None) -> None:
        self._stream = stream
        self._rest = rest
        self._first = first

    async def batches(self) -> AsyncGenerator[Batch, None]:
        if self._first is not None:
            yield self._first
            if self._first[1]:
                return
        async for batch in self._rest:
            yield batch

    async def aclose(self) -> None:
        await self._rest.aclose()
        await self._stream.aclose()
