"""Authentication of gateway keys: ``Authorization: Bearer gw-<id>_<secret>`` (or a static key
declared in the config) -> a `Principal` carrying the key's team, allowed models and limits.

Only hashes are compared (``hmac.compare_digest``): SHA-256 of the whole key, or HMAC-SHA256
with ``keys.pepper`` when set (static keys are always plain SHA-256, as the config declares
them). Records are cached in-process for ``keys.cache_seconds`` and dropped at once when the
store announces a change, so a revocation is seen by every replica within a second. Last-used
times are batched and written off the hot path.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

import structlog

from gateway.config import GatewayConfig
from gateway.errors import AuthenticationFailed, GatewayError
from gateway.stores.keys import KeyRecord, KeyStore, ModelLimit, TeamRecord

log = structlog.get_logger("gateway.auth")

_T = TypeVar("_T")

KEY_PREFIX = "gw-"
TOUCH_INTERVAL = 5.0  # seconds between last-used writes of one key


@dataclass(frozen=True, slots=True)
class TeamLimits:
    """A team's limits: the config's ``teams.<name>`` overlaid with the stored `TeamRecord`."""

    rpm: int | None = None
    tpm: int | None = None
    daily_token_budget: int | None = None
    monthly_token_budget: int | None = None
    models: Mapping[str, ModelLimit] = field(default_factory=dict)

    @property
    def any(self) -> bool:
        return bool(self.rpm or self.tpm or self.daily_token_budget
                    or self.monthly_token_budget or self.models)


NO_TEAM_LIMITS = TeamLimits()


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: safe to log (`key_id`, `team`, `name`), never holds the secret."""

    key_id: str
    team: str
    name: str | None = None
    models: frozenset[str] | None = None  # None: every model
    rpm: int | None = None
    tpm: int | None = None
    max_concurrent: int | None = None
    team_limits: TeamLimits = NO_TEAM_LIMITS

    def allows(self, model: str) -> bool:
        return self.models is None or model in self.models


@dataclass(frozen=True, slots=True)
class IssuedKey:
    """A new key: `secret` is the full key to hand to the user, shown once, never stored."""

    record: KeyRecord
    secret: str


def hash_key(presented: str, pepper: str | None = None) -> str:
    if pepper:
        return hmac.new(pepper.encode(), presented.encode(), hashlib.sha256).hexdigest()
    return hashlib.sha256(presented.encode()).hexdigest()


def _pepper(config: GatewayConfig) -> str | None:
    return config.keys.pepper.get_secret_value() if config.keys.pepper else None


def generate_key(
    config: GatewayConfig,
    *,
    team: str,
    name: str | None = None,
    models: Iterable[str] | None = None,
    rpm: int | None = None,
    tpm: int | None = None,
    max_concurrent: int | None = None,
    expires_in: float | None = None,
    now: float | None = None,
) -> IssuedKey:
    """A fresh ``gw-<id>_<secret>`` key and its record (hash only); the caller stores it."""
    key_id = secrets.token_hex(6)
    secret = f"{KEY_PREFIX}{key_id}_{secrets.token_urlsafe(32)}"
    created = time.time() if now is None else now
    record = KeyRecord(
        id=key_id, team=team, hash=hash_key(secret, _pepper(config)), name=name,
        models=tuple(models) if models is not None else None,
        rpm=rpm, tpm=tpm, max_concurrent=max_concurrent, created=created,
        expires=created + expires_in if expires_in is not None else None,
    )
    return IssuedKey(record, secret)


async def create_key(config: GatewayConfig, store: KeyStore, **options: object) -> IssuedKey:
    """`generate_key` and store it (used by the CLI and the admin API)."""
    issued = generate_key(config, **options)  # type: ignore[arg-type]
    await store.put_key(issued.record)
    return issued


def parse_duration(text: str) -> float:
    """``30d``, ``12h``, ``15m``, ``90s`` or plain seconds -> seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
    text = text.strip().lower()
    try:
        if text and text[-1] in units:
            value = float(text[:-1]) * units[text[-1]]
        else:
            value = float(text)
    except ValueError:
        raise ValueError(f"not a duration: {text!r} (use e.g. 30d, 12h, 15m)") from None
    if value <= 0:
        raise ValueError(f"not a positive duration: {text!r}")
    return value


def team_limits(config: GatewayConfig, team: str, stored: TeamRecord | None) -> TeamLimits:
    base = config.teams.get(team)
    models: dict[str, ModelLimit] = {}
    if base is not None:
        models = {m: ModelLimit(v.rpm, v.tpm) for m, v in base.models.items()}
    if stored is not None:
        models.update(stored.models)

    def pick(name: str) -> int | None:
        value = getattr(stored, name, None) if stored is not None else None
        return value if value is not None else getattr(base, name, None)

    found = TeamLimits(pick("rpm"), pick("tpm"), pick("daily_token_budget"),
                       pick("monthly_token_budget"), models)
    return found if found.any else NO_TEAM_LIMITS


_MISSING = AuthenticationFailed(
    "You didn't provide an API key. Send your gateway key in an Authorization header: "
    "`Authorization: Bearer <key>`."
)


def _invalid() -> AuthenticationFailed:
    return AuthenticationFailed("Incorrect API key provided. Check the key and try again.")


def _bearer(authorization: str | None) -> str:
    """The key presented in ``Authorization: Bearer <key>``."""
    scheme, _, presented = (authorization or "").strip().partition(" ")
    presented = presented.strip()
    if scheme.lower() != "bearer" or not presented:
        raise _MISSING
    return presented


def _key_id(presented: str) -> str:
    """The id part of a ``gw-<id>_<secret>`` key."""
    if not presented.startswith(KEY_PREFIX):
        raise _invalid()
    key_id, underscore, _ = presented[len(KEY_PREFIX):].partition("_")
    if not key_id or not underscore:
        raise _invalid()
    return key_id


@dataclass(slots=True)
class _Cached:
    record: KeyRecord | None
    principal: Principal | None
    until: float


class KeyAuthority:
    """Implements the pipeline's `Authenticator`. `start()` begins listening for changes and
    flushing last-used times; `aclose()` stops and flushes (both optional in tests)."""

    def __init__(
        self, config: GatewayConfig, store: KeyStore, *,
        clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.store = store
        self.clock = clock
        self.wall = wall
        self.pepper = _pepper(config)
        self.ttl = config.keys.cache_seconds
        self._static = {
            s.sha256: Principal(
                key_id=s.id, team=s.team, name=s.name,
                models=frozenset(s.models) if s.models is not None else None,
                rpm=s.rpm, tpm=s.tpm, max_concurrent=s.max_concurrent,
                team_limits=team_limits(config, s.team, None),
            )
            for s in config.keys.static
        }
        self._static_teams = {p.team for p in self._static.values()}
        self._cache: dict[str, _Cached] = {}
        self._pending: dict[str, float] = {}
        self._touched: dict[str, float] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._team_cache: dict[str, tuple[TeamLimits, float]] = {}
        self._loading: dict[str, asyncio.Future[Any]] = {}
        self._generation = 0  # bumped by every invalidation: loads begun before it are stale

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        self._tasks = [asyncio.create_task(self.store.watch(self.invalidate)),
                       asyncio.create_task(self._flush_loop())]

    async def aclose(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        await self.flush()

    def invalidate(self, key_id: str) -> None:
        """Drop a cached key (``"*"``: everything, e.g. after a team change). Loads in
        flight may have read the old record: they are not cached, and new requests load
        afresh."""
        self._generation += 1
        self._loading.clear()
        if key_id == "*":
            self._cache.clear()
            self._team_cache.clear()
        else:
            self._cache.pop(key_id, None)

    # -- authentication ----------------------------------------------------------------------

    async def authenticate(self, authorization: str | None) -> Principal:
        presented = _bearer(authorization)
        plain = hashlib.sha256(presented.encode()).hexdigest()
        # A dict lookup by the digest reveals nothing about the secret's bytes.
        static = self._static.get(plain)
        if static is not None:
            return await self._with_stored_team(static)
        key_id = _key_id(presented)
        cached = await self._record(key_id)
        record = cached.record
        digest = plain if self.pepper is None else hash_key(presented, self.pepper)
        if record is None or not hmac.compare_digest(digest, record.hash) or record.revoked:
            raise _invalid()
        wall = self.wall()
        if record.expires is not None and record.expires <= wall:
            when = datetime.fromtimestamp(record.expires, UTC).strftime("%Y-%m-%d %H:%M UTC")
            raise AuthenticationFailed(
                f"This API key expired on {when}. Ask your administrator for a new key."
            )
        self._note_use(key_id, wall)
        assert cached.principal is not None
        return cached.principal

    async def _record(self, key_id: str) -> _Cached:
        """The key's cached record, loaded when stale; a stale record still serves while the
        store is unreachable."""
        now = self.clock()
        cached = self._cache.get(key_id)
        if cached is not None and cached.until > now:
            return cached
        try:
            return await self._once("key:" + key_id, lambda: self._load(key_id, now))
        except GatewayError:
            if cached is None or cached.record is None:
                raise
            log.warning("key_store_unavailable_using_cached", key_id=key_id)
            return cached

    async def _once(self, name: str, load: Callable[[], Awaitable[_T]]) -> _T:
        """Single flight: the requests that find the same cache entry stale share one load
        (else every request in flight when a key's entry expires reads the store)."""
        loading = self._loading.get(name)
        if loading is None:
            loading = self._loading[name] = asyncio.ensure_future(load())

            def done(finished: asyncio.Future[Any]) -> None:
                if self._loading.get(name) is finished:
                    del self._loading[name]
                if not finished.cancelled():
                    finished.exception()  # retrieved, even when every caller went away

            loading.add_done_callback(done)
        # shielded: a caller that goes away does not cancel the others' load
        result: _T = await asyncio.shield(loading)
        return result

    async def _load(self, key_id: str, now: float) -> _Cached:
        generation = self._generation
        record = await self.store.get_key(key_id)
        principal = None
        if record is not None:
            limits = team_limits(self.config, record.team, await self.store.get_team(record.team))
            principal = Principal(
                key_id=record.id, team=record.team, name=record.name,
                models=frozenset(record.models) if record.models is not None else None,
                rpm=record.rpm, tpm=record.tpm, max_concurrent=record.max_concurrent,
                team_limits=limits,
            )
        cached = _Cached(record, principal, now + self.ttl)
        if generation == self._generation:
            self._cache[key_id] = cached
        return cached

    async def _with_stored_team(self, principal: Principal) -> Principal:
        """Static keys: team limits may still be set at run time (``gateway teams set``)."""
        now = self.clock()
        found = self._team_cache.get(principal.team)
        if found is None or found[1] <= now:
            found = await self._once("team:" + principal.team,
                                     lambda: self._load_team(principal.team, now))
        limits = found[0]
        if limits is principal.team_limits or limits == principal.team_limits:
            return principal
        return Principal(principal.key_id, principal.team, principal.name, principal.models,
                         principal.rpm, principal.tpm, principal.max_concurrent, limits)

    async def _load_team(self, team: str, now: float) -> tuple[TeamLimits, float]:
        generation = self._generation
        try:
            stored = await self.store.get_team(team)
        except GatewayError:
            stored = None  # the store is down: the config's limits still apply
        found = (team_limits(self.config, team, stored), now + self.ttl)
        if generation == self._generation:
            self._team_cache[team] = found
        return found

    # -- last used ---------------------------------------------------------------------------

    def _note_use(self, key_id: str, wall: float) -> None:
        if wall - self._touched.get(key_id, 0.0) >= TOUCH_INTERVAL:
            self._touched[key_id] = wall
            self._pending[key_id] = wall

    async def flush(self) -> None:
        if not self._pending:
            return
        pending, self._pending = self._pending, {}
        try:
            await self.store.touch(pending)
        except GatewayError as exc:
            log.warning("key_last_used_not_saved", keys=len(pending), error=exc.code)

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(TOUCH_INTERVAL)
            try:
                await self.flush()
            except Exception:  # the flusher must never die
                log.exception("key_last_used_flush_failed")
