"""The response cache: which requests may be answered from it (`decide`), under which key,
and single flight (`claim`), so that concurrent identical requests wait for the first instead
of each calling the upstream (across replicas when the store is Redis).

The key covers everything that changes the answer: the backend and upstream model after
routing, the model's Nuclia defaults, and the request body minus a deny-list of fields that do
not (``stream``, ``stream_options``, ``user``, ``metadata``, ...). A deny-list rather than an
allow-list: a new OpenAI parameter we do not know yet changes the key, which is the safe way
to be wrong. Scope is per team by default (``cache.scope: global`` shares entries). The key is
the BLAKE2b-256 digest of that canonical form (sorted keys), the same on every replica and in
every store.

The cache never fails a request: a store error is logged, counted and treated as a miss.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import orjson
import structlog

from gateway.answer import Answer
from gateway.backends.base import Route
from gateway.config import GatewayConfig
from gateway.errors import GatewayError
from gateway.stores.cache import CacheStore

log = structlog.get_logger("gateway.response_cache")

# Request fields that do not change the answer. (``model`` stays in: the route it names is
# in the key anyway, and two public names of one upstream have their own cache policies.)
IRRELEVANT = frozenset({
    "stream", "stream_options", "user", "metadata", "store", "service_tier",
    "request_id", "prompt_cache_key", "safety_identifier",
})
# Of keys and entries: entries of another version (left in Redis by an older gateway) miss.
_VERSION = 3

CacheStatus = Literal["hit", "miss", "bypass"]


@dataclass(frozen=True, slots=True)
class CacheDecision:
    """What the cache may do for one request, decided without the store. `key` is None when
    the request bypasses the cache; any other request may store its answer, and `read` says
    whether it may be answered from the cache (not with ``no-cache``, which refreshes)."""

    key: str | None
    read: bool = False
    ttl: float = 0.0


BYPASS = CacheDecision(None)


@dataclass(frozen=True, slots=True)
class CachedAnswer:
    """An answer read from the cache."""

    answer: Answer
    age: float  # seconds since it was stored


@dataclass(slots=True)
class Claim:
    """What `claim` found for a decision. `leads`: this request holds the key's single-flight
    lock until `store` or `release` ends it (not frozen for that)."""

    decision: CacheDecision
    status: CacheStatus  # what the response says (``x-gateway-cache``)
    hit: CachedAnswer | None = None
    leads: bool = False
    coalesced: bool = False  # answered by a leader this request waited for


def cache_control(header: str | None) -> tuple[bool, bool]:
    """(may read, may write) from the request's ``Cache-Control``."""
    if not header:
        return True, True
    directives = {part.strip().split("=", 1)[0].lower() for part in header.split(",")}
    if "no-store" in directives:
        return False, False
    if "no-cache" in directives:
        return False, True
    return True, True


def relevant(body: dict[str, Any]) -> dict[str, Any]:
    """The body without the fields that do not change the answer (itself when it has none)."""
    if IRRELEVANT.isdisjoint(body):
        return body
    return {k: v for k, v in body.items() if k not in IRRELEVANT}


def canonical_form(route: Route, scope: str, body: dict[str, Any]) -> bytes:
    """What the key is the digest of: the route, the scope and the relevant body."""
    return orjson.dumps(
        {"v": _VERSION, "scope": scope, "backend": route.backend,
         "upstream_model": route.upstream_model, "options": route.options,
         "body": relevant(body)},
        option=orjson.OPT_SORT_KEYS,
    )


def encode_answer(answer: Answer, created: float) -> bytes:
    """An entry, for streamed and whole answers alike: a JSON array (no field names to write
    and read on every miss and hit). Right-sized: orjson's output holds its ~4 KB working
    buffer, and slicing off the appended newline copies it to its own length."""
    return orjson.dumps((
        _VERSION, created, answer.content, answer.reasoning,
        [answer.tool_calls[i] for i in sorted(answer.tool_calls)], answer.finish_reason,
        answer.usage, answer.extensions, answer.completion_fields,
    ), option=orjson.OPT_APPEND_NEWLINE)[:-1]


def decode_answer(data: bytes) -> tuple[Answer, float] | None:
    """(the answer, the unix time it was stored); None for anything that is not an entry of
    this version."""
    try:
        raw = orjson.loads(data)
        version, created, content, reasoning, tool_calls, finish_reason, usage, extensions, \
            completion_fields = raw
        if version != _VERSION:
            return None
        answer = Answer(content=list(content), reasoning=list(reasoning),
                        tool_calls=dict(enumerate(tool_calls)), finish_reason=finish_reason,
                        usage=usage, extensions=dict(extensions),
                        completion_fields=dict(completion_fields))
        return answer, float(created)
    except (ValueError, TypeError):  # not JSON (orjson's error is a ValueError), not our shape
        return None


@dataclass(frozen=True, slots=True)
class CacheHooks:
    """Metric callbacks (the defaults count nothing)."""

    store_error: Callable[[], None] = lambda: None


class ResponseCache:
    def __init__(self, config: GatewayConfig, store: CacheStore,
                 hooks: CacheHooks | None = None) -> None:
        self._store = store
        self.hooks = hooks or CacheHooks()
        # bytes written so far: read by the metrics when sampled, not reported per write
        self.stored_bytes = 0
        self._default = config.cache.default
        self._policies = {name: model.cache for name, model in config.models.items()
                          if model.cache is not None}
        self._global = config.cache.scope == "global"
        self._lock_seconds = config.cache.lock_seconds

    def decide(self, route: Route, body: dict[str, Any], team: str,
               cache_control_header: str | None) -> CacheDecision:
        """What the cache may do for a request whose body the wire model has validated.

        ``temperature`` and ``n`` are read off the body, so that a value in any other
        spelling than a plain number (``"0"``, which lax validation accepts) bypasses."""
        policy = self._policies.get(route.model, self._default)
        if not policy.enabled or body.get("n") not in (None, 1):
            return BYPASS
        if policy.deterministic_only and body.get("temperature") not in (None, 0):
            return BYPASS
        read, write = cache_control(cache_control_header)
        if not write:
            return BYPASS
        scope = "global" if self._global else "team:" + team
        # BLAKE2b rather than SHA-256, whose OpenSSL 3 implementation is looked up per call
        key = hashlib.blake2b(canonical_form(route, scope, body), digest_size=32).hexdigest()
        return CacheDecision(key, read, policy.ttl)

    async def claim(self, decision: CacheDecision) -> Claim:
        """Look the decision's key up; on a miss, lead (hold the key's lock) or wait for the
        leader's answer. After `lock_seconds` without one the request goes to the upstream
        itself, not leading."""
        key = decision.key
        if key is None:
            return Claim(decision, "bypass")
        if not decision.read:  # ``no-cache``: straight to the upstream, stored after
            return Claim(decision, "miss")
        try:
            hit = self._cached(await self._store.get(key))
            if hit is not None:
                return Claim(decision, "hit", hit)
            return await self._single_flight(decision, key)
        except GatewayError as exc:
            self._failed("claim", exc)
            return Claim(decision, "miss")

    async def _single_flight(self, decision: CacheDecision, key: str) -> Claim:
        """Lead, or wait for the leader. A leader that gives up wakes its waiters, and one of
        them leads next."""
        deadline = time.monotonic() + self._lock_seconds
        while True:
            if await self._store.lock(key, self._lock_seconds):
                return Claim(decision, "miss", leads=True)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return Claim(decision, "miss")
            data = await self._store.wait(key, remaining)
            if data is not None:  # the leader's answer (or an entry that does not decode)
                hit = self._cached(data)
                return Claim(decision, "miss" if hit is None else "hit", hit,
                             coalesced=hit is not None)

    def _cached(self, data: bytes | None) -> CachedAnswer | None:
        decoded = None if data is None else decode_answer(data)
        if decoded is None:
            return None
        answer, created = decoded
        return CachedAnswer(answer, max(0.0, time.time() - created))

    async def store(self, claim: Claim, answer: Answer) -> None:
        """Store a complete, successful answer (the caller never passes an errored one; one
        without a finish reason was cut off) and end the claim's lead: its waiters read the
        entry at once."""
        decision = claim.decision
        if decision.key is not None and answer.finish_reason:
            data = encode_answer(answer, time.time())
            try:
                if await self._store.set(decision.key, data, decision.ttl):
                    self.stored_bytes += len(data)
            except GatewayError as exc:
                self._failed("store", exc)
        self.release(claim)

    def release(self, claim: Claim) -> None:
        """Free the claim's lead if it still holds it (its request failed or its client went
        away), without waiting; its waiters then read the entry or one of them leads."""
        if claim.leads and claim.decision.key is not None:
            claim.leads = False
            self._store.unlock(claim.decision.key, self._release_failed)

    def _release_failed(self, exc: GatewayError) -> None:
        self._failed("release", exc)

    def _failed(self, operation: str, exc: GatewayError) -> None:
        log.warning("cache_store_unavailable", operation=operation, error=exc.message)
        self.hooks.store_error()
