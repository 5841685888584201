"""Gateway keys and teams: records, the `KeyStore` seam, a JSON-file store and a Redis store.

Only a hash of a key's secret is ever stored. Without Redis the records live in one JSON file
next to the config (``keys.file``, default ``keys.json``), written atomically and re-read when
another process (``gateway keys create``) changes it. On Redis they live in two hashes under
one hash tag (``{prefix}:{keys}:...``); every change is published on a channel so each replica
drops its cached copy at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import tempfile
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import orjson
import structlog
from redis.exceptions import RedisError, WatchError

from gateway.stores.redis_base import RedisNamespace, unavailable

log = structlog.get_logger("gateway.stores.keys")

# Called with a key id (or "*" for "everything may have changed").
Invalidate = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class ModelLimit:
    rpm: int | None = None
    tpm: int | None = None


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """A gateway key as stored: `hash` is SHA-256 (or HMAC-SHA256) of the key, never the key."""

    id: str
    team: str
    hash: str
    name: str | None = None
    models: tuple[str, ...] | None = None  # None: every model
    rpm: int | None = None
    tpm: int | None = None
    max_concurrent: int | None = None
    created: float = 0.0
    expires: float | None = None
    last_used: float | None = None
    revoked: bool = False

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["models"] = list(self.models) if self.models is not None else None
        return data

    def public(self) -> dict[str, Any]:
        """What the admin API and CLI show (the hash stays inside)."""
        data = self.to_dict()
        del data["hash"]
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> KeyRecord:
        models = data.get("models")
        return cls(
            id=str(data["id"]), team=str(data["team"]), hash=str(data["hash"]),
            name=data.get("name"),
            models=tuple(models) if models is not None else None,
            rpm=data.get("rpm"), tpm=data.get("tpm"), max_concurrent=data.get("max_concurrent"),
            created=float(data.get("created") or 0.0), expires=data.get("expires"),
            last_used=data.get("last_used"), revoked=bool(data.get("revoked", False)),
        )


@dataclass(frozen=True, slots=True)
class TeamRecord:
    """Team limits set at run time (CLI/admin); they override the config's ``teams:`` entry."""

    name: str
    rpm: int | None = None
    tpm: int | None = None
    daily_token_budget: int | None = None
    monthly_token_budget: int | None = None
    models: Mapping[str, ModelLimit] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "rpm": self.rpm, "tpm": self.tpm,
            "daily_token_budget": self.daily_token_budget,
            "monthly_token_budget": self.monthly_token_budget,
            "models": {m: {"rpm": v.rpm, "tpm": v.tpm} for m, v in self.models.items()},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TeamRecord:
        models = {
            str(m): ModelLimit(v.get("rpm"), v.get("tpm"))
            for m, v in (data.get("models") or {}).items()
        }
        return cls(
            name=str(data["name"]), rpm=data.get("rpm"), tpm=data.get("tpm"),
            daily_token_budget=data.get("daily_token_budget"),
            monthly_token_budget=data.get("monthly_token_budget"), models=models,
        )


class KeyStore(Protocol):
    async def get_key(self, key_id: str) -> KeyRecord | None: ...

    async def put_key(self, record: KeyRecord) -> None: ...

    async def list_keys(self, team: str | None = None) -> list[KeyRecord]: ...

    async def revoke_key(self, key_id: str) -> bool:
        """Mark a key revoked; False when there is no such key."""
        ...

    async def touch(self, last_used: Mapping[str, float]) -> None:
        """Record last-used times (batched by the caller, off the hot path)."""
        ...

    async def get_team(self, name: str) -> TeamRecord | None: ...

    async def put_team(self, record: TeamRecord) -> None: ...

    async def list_teams(self) -> list[TeamRecord]: ...

    async def watch(self, invalidate: Invalidate) -> None:
        """Run until cancelled, calling `invalidate(key_id)` when another process changes a
        key (``"*"`` when changes may have been missed)."""
        ...


class MemoryKeyStore:
    """In-process store, persisted to a JSON file when `path` is given (None: memory only).

    Writes go to a temporary file in the same folder, then ``os.replace`` (atomic); a lock file
    serialises writers of several processes. Every read checks the file's mtime and size and
    re-reads it when another process wrote it (one ``stat`` call)."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self._keys: dict[str, KeyRecord] = {}
        self._teams: dict[str, TeamRecord] = {}
        self._seen: tuple[int, ...] | None = None
        self._refresh()

    # -- file --------------------------------------------------------------------------------

    def _stamp(self) -> tuple[int, ...] | None:
        if self.path is None:
            return None
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        # each write is a new file (rename): the inode changes even when mtime ticks coarsely
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def _refresh(self) -> None:
        if self.path is None:
            return
        stamp = self._stamp()
        if stamp == self._seen:
            return
        self._seen = stamp
        if stamp is None:
            self._keys, self._teams = {}, {}
            return
        data = orjson.loads(self.path.read_bytes() or b"{}")
        self._keys = {k: KeyRecord.from_dict(v) for k, v in (data.get("keys") or {}).items()}
        self._teams = {t: TeamRecord.from_dict(v) for t, v in (data.get("teams") or {}).items()}

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """Lock, re-read what others wrote, let the caller change the dicts, write atomically."""
        if self.path is None:
            yield
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self._refresh()
            yield
            data = {
                "keys": {k: v.to_dict() for k, v in sorted(self._keys.items())},
                "teams": {t: v.to_dict() for t, v in sorted(self._teams.items())},
            }
            fd, tmp = tempfile.mkstemp(prefix=self.path.name, suffix=".tmp", dir=self.path.parent)
            try:
                with os.fdopen(fd, "wb") as out:
                    out.write(orjson.dumps(data, option=orjson.OPT_INDENT_2))
                os.chmod(tmp, 0o600)
                os.replace(tmp, self.path)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
                raise
            self._seen = self._stamp()

    # -- KeyStore ----------------------------------------------------------------------------

    async def get_key(self, key_id: str) -> KeyRecord | None:
        self._refresh()
        return self._keys.get(key_id)

    async def put_key(self, record: KeyRecord) -> None:
        with self._writing():
            self._keys[record.id] = record

    async def list_keys(self, team: str | None = None) -> list[KeyRecord]:
        self._refresh()
        return [r for _, r in sorted(self._keys.items()) if team is None or r.team == team]

    async def revoke_key(self, key_id: str) -> bool:
        with self._writing():
            found = self._keys.get(key_id)
            if found is not None:
                self._keys[key_id] = replace(found, revoked=True)
        return found is not None

    async def touch(self, last_used: Mapping[str, float]) -> None:
        with self._writing():
            for key_id, when in last_used.items():
                found = self._keys.get(key_id)
                if found is not None:
                    self._keys[key_id] = replace(found, last_used=when)

    async def get_team(self, name: str) -> TeamRecord | None:
        self._refresh()
        return self._teams.get(name)

    async def put_team(self, record: TeamRecord) -> None:
        with self._writing():
            self._teams[record.name] = record

    async def list_teams(self) -> list[TeamRecord]:
        self._refresh()
        return [t for _, t in sorted(self._teams.items())]

    async def watch(self, invalidate: Invalidate) -> None:
        # Other processes' changes are seen through the mtime check on every cache miss; the
        # caller's short cache bounds how long a stale record can live.
        await asyncio.Event().wait()


class RedisKeyStore:
    """Keys in the hash ``{prefix}:{keys}:records`` (id -> JSON), last-used times in
    ``...:last_used``, teams in ``...:teams``; changes published on ``...:changes``.

    All of it shares the hash tag ``{keys}``: it is small, read once per key per second per
    replica, and one slot keeps each admin operation a single-slot command in a cluster."""

    TAG = "keys"

    def __init__(self, ns: RedisNamespace) -> None:
        self.ns = ns
        self.records = ns.key(self.TAG, "records")
        self.last_used = ns.key(self.TAG, "last_used")
        self.teams = ns.key(self.TAG, "teams")
        self.channel = ns.key(self.TAG, "changes")

    async def _call(self, op: Callable[[], Awaitable[Any]]) -> Any:
        try:
            return await op()
        except (RedisError, OSError) as exc:
            raise unavailable(exc) from exc

    async def get_key(self, key_id: str) -> KeyRecord | None:
        client = self.ns.client

        async def op() -> Any:
            async with client.pipeline(transaction=False) as pipe:
                pipe.hget(self.records, key_id)
                pipe.hget(self.last_used, key_id)
                return await pipe.execute()

        raw, used = await self._call(op)
        if raw is None:
            return None
        record = KeyRecord.from_dict(orjson.loads(raw))
        return replace(record, last_used=float(used)) if used is not None else record

    async def put_key(self, record: KeyRecord) -> None:
        data = orjson.dumps({**record.to_dict(), "last_used": None})
        client = self.ns.client

        async def op() -> Any:
            async with client.pipeline(transaction=True) as pipe:
                pipe.hset(self.records, record.id, data)
                pipe.publish(self.channel, record.id)
                return await pipe.execute()

        await self._call(op)

    async def list_keys(self, team: str | None = None) -> list[KeyRecord]:
        client = self.ns.client

        async def op() -> Any:
            async with client.pipeline(transaction=False) as pipe:
                pipe.hgetall(self.records)
                pipe.hgetall(self.last_used)
                return await pipe.execute()

        raw, used = await self._call(op)
        found = []
        for key_id, value in sorted(raw.items()):
            record = KeyRecord.from_dict(orjson.loads(value))
            if team is not None and record.team != team:
                continue
            when = used.get(key_id)
            found.append(replace(record, last_used=float(when)) if when else record)
        return found

    async def revoke_key(self, key_id: str) -> bool:
        # HGET + HSET in a MULTI under WATCH: an admin operation, never on the hot path.
        client = self.ns.client

        async def op() -> bool:
            async with client.pipeline(transaction=True) as pipe:
                while True:
                    try:
                        await pipe.watch(self.records)
                        raw = await pipe.hget(self.records, key_id)
                        if raw is None:
                            await pipe.unwatch()  # type: ignore[no-untyped-call]
                            return False
                        data = orjson.loads(raw)
                        data["revoked"] = True
                        pipe.multi()  # type: ignore[no-untyped-call]
                        pipe.hset(self.records, key_id, orjson.dumps(data))
                        pipe.publish(self.channel, key_id)
                        await pipe.execute()
                        return True
                    except WatchError:
                        continue  # the hash changed under us: read it again

        result: bool = await self._call(op)
        return result

    async def touch(self, last_used: Mapping[str, float]) -> None:
        if last_used:
            mapping: dict[Any, Any] = {k: repr(v) for k, v in last_used.items()}
            await self._call(lambda: self.ns.client.hset(self.last_used, mapping=mapping))

    async def get_team(self, name: str) -> TeamRecord | None:
        raw = await self._call(lambda: self.ns.client.hget(self.teams, name))
        return None if raw is None else TeamRecord.from_dict(orjson.loads(raw))

    async def put_team(self, record: TeamRecord) -> None:
        data = orjson.dumps(record.to_dict())
        client = self.ns.client

        async def op() -> Any:
            async with client.pipeline(transaction=True) as pipe:
                pipe.hset(self.teams, record.name, data)
                pipe.publish(self.channel, "*")
                return await pipe.execute()

        await self._call(op)

    async def list_teams(self) -> list[TeamRecord]:
        raw = await self._call(lambda: self.ns.client.hgetall(self.teams))
        return [TeamRecord.from_dict(orjson.loads(v)) for _, v in sorted(raw.items())]

    async def watch(self, invalidate: Invalidate) -> None:
        """Subscribe to the change channel; after a lost connection, resubscribe and drop
        everything (messages published meanwhile are lost)."""
        while True:
            pubsub = self.ns.client.pubsub()
            try:
                await pubsub.subscribe(self.channel)
                invalidate("*")
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True,
                                                       timeout=1.0)
                    if message is not None and message.get("type") == "message":
                        data = message["data"]
                        invalidate(data.decode() if isinstance(data, bytes) else str(data))
            except (RedisError, OSError) as exc:
                log.warning("key_invalidation_lost", error_type=type(exc).__name__)
                await asyncio.sleep(0.5)
            finally:
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()
