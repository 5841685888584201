"""The response cache: which requests may be answered from it, under which key, and single
flight so that concurrent identical requests wait for the first instead of each calling the
upstream (across replicas when the store is Redis).

The key covers everything that changes the answer: the backend and upstream model after
routing, the model's Nuclia defaults, and the request body minus a deny-list of fields that do
not (``stream``, ``stream_options``, ``user``, ``metadata``, ...), in a canonical form (sorted
keys). A deny-list rather than an allow-list: a new OpenAI parameter we do not know yet changes
the key, which is the safe way to be wrong. Scope is per team by default (``cache.scope:
global`` shares entries).

A shared store (Redis) gets a BLAKE2b hash (256 bits) of that canonical form, the same on every
replica. The in-process store gets the canonical body itself, as ``[tag, body]`` where the tag
(a number) stands for the route and scope, up to `EXACT_KEY_BYTES` (longer ones are hashed as
for Redis): its dict compares keys whole, so two requests can never share an entry by a hash
collision, and a miss or hit skips the hash (~7.7k instructions, a sixth of what a miss cost).

The cache never fails a request: a store error is logged, counted and treated as a miss.
"""

from __future__ import annotations

import hashlib
import itertools
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
import structlog

from gateway.answer import Answer
from gateway.backends.base import Route
from gateway.config import GatewayConfig
from gateway.errors import GatewayError
from gateway.stores.cache import CacheKey, CacheStore, MemoryCacheStore

log = structlog.get_logger("gateway.response_cache")

# Request fields that do not change the answer. (``model`` stays in: the route it names is
# in the key anyway, and two public names of one upstream have their own cache policies.)
IRRELEVANT = frozenset({
    "stream", "stream_options", "user", "metadata", "store", "service_tier",
    "request_id", "prompt_cache_key", "safety_identifier",
})
_VERSION = 2
# Canonical bodies up to this size are the in-process store's keys as they are (counted in the
# memory bound like values); longer ones are hashed, so that a big RAG prompt held as a key
# does not crowd answers out of the cache.
EXACT_KEY_BYTES = 512
# A non-streamed answer's entry is this header (kind, the unix time it was stored) and then the
# `chat.completion` body as it was sent: the bytes serialised for the client are stored as
# they are, so a miss serialises nothing more (1.3k instructions for the header and one copy,
# against 5k for `encode_answer`), and a hit sends the completion back with its own id and
# time. A streamed answer's entry is the JSON array of `encode_answer` (kept with its pieces).
_COMPLETION_HEADER = struct.Struct("<Bd")
_KEY_OPTIONS = orjson.OPT_SORT_KEYS | orjson.OPT_APPEND_NEWLINE  # the newline is sliced off
_COMPLETION_KIND = 3  # never the first byte of a JSON array entry ("[")
_COMPLETION_TAG = bytes((_COMPLETION_KIND,))
# Tags for in-process keys, unique in the process: caches sharing a store never mix them up.
_TAGS = itertools.count()


@dataclass(slots=True)
class CacheDecision:
    """What the cache may do for one request, and what `begin` found. Not frozen: `begin` and
    `acquire` mark the leader, so that `release` frees the single-flight lock only for the
    request that holds it.

    `status` is what the response tells (``x-gateway-cache``): ``bypass``, ``miss`` or
    ``hit`` (with `hit`); ``pending`` after `begin` when the answer is to be awaited from
    `lookup` (a shared store, or another request computing it)."""

    key: CacheKey | None
    read: bool
    write: bool
    ttl: float = 0.0
    leader: bool = False
    status: str = "miss"
    hit: CachedAnswer | None = None


BYPASS = CacheDecision(None, False, False, status="bypass")


@dataclass(slots=True)  # one per hit: not frozen, whose __init__ costs 3x as much
class CachedAnswer:
    answer: Answer
    created: float
    age: float
    # the completion as it was first sent, when the entry is a non-streamed answer's (a
    # decoded copy of the hit's own: the caller may change it)
    completion: dict[str, Any] | None = None


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


def key_material(route: Route, scope: str) -> bytes:
    """What a route and scope contribute to every shared key (stable across replicas)."""
    return orjson.dumps(
        {"v": _VERSION, "scope": scope, "backend": route.backend,
         "upstream_model": route.upstream_model, "options": route.options},
        option=orjson.OPT_SORT_KEYS,
    ) + b"\n"


def relevant(body: dict[str, Any]) -> dict[str, Any]:
    """The body without the fields that do not change the answer (itself when it has none)."""
    if IRRELEVANT.isdisjoint(body):
        return body
    return {k: v for k, v in body.items() if k not in IRRELEVANT}


def canonical_body(body: dict[str, Any]) -> bytes:
    """The body as a shared key sees it: sorted keys, the irrelevant fields left out."""
    return orjson.dumps(relevant(body), option=orjson.OPT_SORT_KEYS)


@dataclass(frozen=True, slots=True)
class _KeyPrefix:
    """Per route and scope: the route it was made for, the in-process tag, the hash state
    after the shared material (copied for each request)."""

    route: Route
    tag: int
    hasher: Any

    def digest(self, data: bytes) -> str:
        """The hex digest of the route's material, then `data`."""
        hasher = self.hasher.copy()
        hasher.update(data)
        return str(hasher.hexdigest())


def encode_answer(answer: Answer, created: float) -> bytes:
    """An entry: a JSON array (no field names to write or read on every miss and hit).

    Right-sized: orjson's output keeps its whole ~4 KB working buffer, which made every entry
    of the in-process store cost ~4 KB of RSS whatever its size (measured: 100k entries of
    237 B took 400 MB; 50k of 520 B 206 MB, right-sized 28 MB). Slicing off an appended
    newline copies it into an object of its own length, for 0.8k instructions where a
    `memoryview(...).tobytes()` copy took 2k."""
    return orjson.dumps((
        _VERSION, created, answer.content, answer.reasoning,
        [answer.tool_calls[i] for i in sorted(answer.tool_calls)] if answer.tool_calls else (),
        answer.finish_reason, answer.usage, answer.extensions,
    ), option=orjson.OPT_APPEND_NEWLINE)[:-1]


def encode_completion(completion: bytes, created: float) -> bytes:
    """A non-streamed answer's entry: the header, then `completion` (the body sent). The
    concatenation is a new object of its own length (see `encode_answer`)."""
    return _COMPLETION_HEADER.pack(_COMPLETION_KIND, created) + completion


def decode_answer(data: bytes) -> tuple[Answer, float, dict[str, Any] | None] | None:
    """An entry of either kind: (the answer, when it was stored, the completion when the entry
    is a non-streamed answer's); None for anything else (an entry left in Redis by an older
    gateway, a value that does not decode)."""
    if data[:1] == _COMPLETION_TAG:
        return _decode_completion(data)
    try:
        raw = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(raw, list) or len(raw) != 8 or raw[0] != _VERSION:
        return None
    _, created, content, reasoning, tool_calls, finish_reason, usage, extensions = raw
    answer = Answer(
        content=list(content or []),
        reasoning=list(reasoning or []),
        tool_calls=dict(enumerate(tool_calls or [])),
        finish_reason=finish_reason,
        usage=usage,
        extensions=dict(extensions or {}),
    )
    return answer, float(created or 0.0), None


def _decode_completion(data: bytes) -> tuple[Answer, float, dict[str, Any]] | None:
    header = _COMPLETION_HEADER.size
    if len(data) <= header:
        return None
    _, created = _COMPLETION_HEADER.unpack_from(data)
    try:
        completion = orjson.loads(memoryview(data)[header:])
    except orjson.JSONDecodeError:
        return None
    choices = completion.get("choices") if isinstance(completion, dict) else None
    if not (isinstance(choices, list) and choices and isinstance(choices[0], dict)):
        return None
    answer = Answer()
    answer.add_completion(completion)
    return answer, created, completion


@dataclass(frozen=True, slots=True)
class CacheHooks:
    """Metric callbacks (the defaults count nothing)."""

    store_error: Callable[[], None] = lambda: None


class ResponseCache:
    def __init__(self, config: GatewayConfig, store: CacheStore,
                 hooks: CacheHooks | None = None) -> None:
        self.config = config
        self.store = store
        self.hooks = hooks or CacheHooks()
        # bytes written so far: read by the metrics when sampled, not reported per write
        self.stored_bytes = 0
        # the in-process store: called without coroutines (nothing there waits)
        self._local = store if isinstance(store, MemoryCacheStore) else None
        # per model: (enabled, deterministic only, ttl), read off the config once
        default = config.cache.default
        self._default = (default.enabled, default.deterministic_only, default.ttl)
        self._policies: dict[str, tuple[bool, bool, float]] = {
            name: (p.enabled, p.deterministic_only, p.ttl)
            for name, model in config.models.items() for p in [model.cache or default]
        }
        self._global = config.cache.scope == "global"
        self._lock_seconds = config.cache.lock_seconds
        # (model, team; None when global) -> its prefix; tags are never reused, so entries
        # keyed under a forgotten prefix are only left to age out of the LRU, never read for
        # another route
        self._prefixes: dict[tuple[str, str | None], _KeyPrefix] = {}

    def decide(self, route: Route, body: dict[str, Any], team: str,
               cache_control_header: str | None) -> CacheDecision:
        """What the cache may do for a request, without looking in the store (`begin`)."""
        return self.begin(route, body, team, cache_control_header, look=False)

    def begin(self, route: Route, body: dict[str, Any], team: str,
              cache_control_header: str | None, look: bool = True) -> CacheDecision:
        """What the cache may do for a request whose body the wire model has validated, and
        with the in-process store the lookup too (with `look`), in one call: this is the path
        of every cacheable request. The decision then has a `hit`, or is a ``miss`` that
        leads (when it may write), or is ``pending``: await `lookup` (a shared store, or
        another request leads).

        ``temperature`` and ``n`` are read off the body: an attribute of the pydantic model
        costs three times a dict read (its ``__getattr__`` hook), and a value in any other
        spelling than a plain number (``"0"``, which lax validation accepts) bypasses."""
        enabled, deterministic_only, ttl = self._policies.get(route.model, self._default)
        if not enabled:
            return BYPASS
        if deterministic_only and body.get("temperature") not in (None, 0):
            return BYPASS
        if body.get("n") not in (None, 1):
            return BYPASS
        if cache_control_header:
            read, write = cache_control(cache_control_header)
            if not (read or write):
                return BYPASS
        else:
            read = write = True
        owner = None if self._global else team
        prefix = self._prefixes.get((route.model, owner))
        if prefix is None or prefix.route is not route:
            prefix = self._prefix(route, owner)
        local = self._local
        if local is None:
            decision = CacheDecision(prefix.digest(canonical_body(body)), read, write, ttl)
            if read and look:
                decision.status = "pending"
            return decision
        # ``[tag, body]``: the tag stands for the route and scope. The key is kept in the store,
        # so it is right-sized like an entry (see `encode_answer`): as orjson returns it, each
        # key held ~4 KB (50k keys of 259 B: 206 MB of RSS, sliced 16 MB)
        exact = orjson.dumps((prefix.tag, relevant(body)), option=_KEY_OPTIONS)[:-1]
        key: CacheKey = exact if len(exact) <= EXACT_KEY_BYTES else prefix.digest(exact)
        decision = CacheDecision(key, read, write, ttl)
        if not (read and look):  # ``no-cache``: straight to the upstream
            return decision
        found: bytes | bool | None = local.claim_now(key, self._lock_seconds) if write \
            else local.get_now(key)
        if found is True:
            decision.leader = True
            return decision
        if found is False:
            decision.status = "pending"  # another request leads: wait for it
            return decision
        hit = self._cached(found)
        if hit is not None:
            decision.status = "hit"
            decision.hit = hit
        elif found is not None:
            decision.status = "pending"  # an entry that does not decode: `lookup` leads
        return decision

    def _prefix(self, route: Route, owner: str | None) -> _KeyPrefix:
        """A new tag, and the digest's state after the route's material (`owner`: the team,
        None when entries are global). BLAKE2b rather than SHA-256: OpenSSL 3 fetches its
        SHA-256 implementation on every call, which made SHA-256 cost twice as much here
        (11.8k against 6.4k instructions per key)."""
        if len(self._prefixes) >= 4096:
            self._prefixes.clear()
        scope = "global" if owner is None else "team:" + owner
        prefix = self._prefixes[(route.model, owner)] = _KeyPrefix(
            route, next(_TAGS),
            hashlib.blake2b(key_material(route, scope), digest_size=32))
        return prefix

    async def get(self, decision: CacheDecision) -> CachedAnswer | None:
        if decision.key is None:
            return None
        try:
            data = await self.store.get(decision.key)
        except GatewayError as exc:
            self._failed("get", exc)
            return None
        return self._cached(data)

    async def lookup(self, decision: CacheDecision) -> tuple[CachedAnswer | None, bool]:
        """`get`, then on a miss (when the decision may write) `acquire`, in one call:
        (the answer, whether it came from a leader we waited for)."""
        hit = await self.get(decision)
        if hit is not None or not decision.write:
            return hit, False
        hit = await self.acquire(decision)
        return hit, hit is not None

    def _cached(self, data: bytes | None) -> CachedAnswer | None:
        if data is None:
            return None
        decoded = decode_answer(data)
        if decoded is None:
            return None
        answer, created, completion = decoded
        return CachedAnswer(answer, created, max(0.0, time.time() - created), completion)

    async def acquire(self, decision: CacheDecision) -> CachedAnswer | None:
        """Lead (lock, return None) or wait for the leader's answer (returned). A leader that
        gives up wakes its waiters, and one of them leads next; after `lock_seconds` without
        an answer the caller goes to the upstream itself (None)."""
        if decision.key is None:
            return None
        lock_seconds = self._lock_seconds
        deadline = time.monotonic() + lock_seconds
        try:
            while True:
                if await self.store.lock(decision.key, lock_seconds):
                    decision.leader = True
                    return None
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                found = self._cached(await self.store.wait(decision.key, remaining))
                if found is not None:
                    return found
        except GatewayError as exc:
            self._failed("acquire", exc)
            return None

    def put_now(self, decision: CacheDecision, answer: Answer, completion: bytes | None = None
                ) -> bool | None:
        """`put` without a coroutine when the store is in-process; None: call `put`. Storing
        ends the request's lead: its waiters read the entry at once."""
        key = decision.key
        if key is None or not decision.write or not answer.finish_reason:
            return False
        local = self._local
        if local is None:
            return None
        leader = decision.leader
        decision.leader = False
        created = time.time()
        data = encode_answer(answer, created) if completion is None else \
            encode_completion(completion, created)
        if not local.set_now(key, data, decision.ttl, unlock=leader):
            return False
        self.stored_bytes += len(data)
        return True

    async def put(self, decision: CacheDecision, answer: Answer,
                  completion: bytes | None = None) -> bool:
        """Store a complete, successful answer (never an errored or truncated one);
        `completion`: the body sent for it when it was not streamed, stored as it is."""
        done = self.put_now(decision, answer, completion)
        if done is not None:
            return done
        created = time.time()
        data = encode_answer(answer, created) if completion is None else \
            encode_completion(completion, created)
        try:
            stored = await self.store.set(decision.key or "", data, decision.ttl)
        except GatewayError as exc:
            self._failed("put", exc)
            return False
        if stored:
            self.stored_bytes += len(data)
        return stored

    def release_now(self, decision: CacheDecision) -> bool:
        """Release without a task when the store is in-process; False: call `release`."""
        if decision.key is None or not decision.leader:
            return True
        if self._local is None:
            return False
        decision.leader = False
        self._local.unlock_now(decision.key)
        return True

    async def release(self, decision: CacheDecision) -> None:
        if decision.key is None or not decision.leader:
            return
        decision.leader = False
        try:
            await self.store.unlock(decision.key)
        except GatewayError as exc:
            self._failed("release", exc)

    def _failed(self, operation: str, exc: GatewayError) -> None:
        log.warning("cache_store_unavailable", operation=operation, error=exc.message)
        self.hooks.store_error()
