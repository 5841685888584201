"""Usage counters per (day, team, key id, model): requests, tokens, errors, cached answers.

Two implementations behind `UsageStore`:

- `MemoryUsageStore` keeps totals in the process. With a ``path`` (the default factory uses
  ``<spool_dir>/../usage.jsonl``, i.e. ``var/usage.jsonl`` next to the config) every `add`
  also appends one JSON line per delta, ``{"day","team","key_id","model",<counter>: n, ...}``,
  with a single ``O_APPEND`` write, so several worker processes and the ``gateway usage`` CLI
  share one file; `query` then folds the file (the source of truth) instead of memory.
- `RedisUsageStore` keeps one hash per team and day, ``{prefix}:{team}:usage:<day>``, with
  fields ``<key_id>\\t<model>\\t<counter>``, incremented with HINCRBY in ONE pipeline per
  `add`. Index sets (``{prefix}:{usage}:teams`` and ``{prefix}:{team}:usage:days``) let
  `query` find the hashes without SCAN.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterable
from dataclasses import dataclass, fields, replace
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Protocol

import orjson
import redis.exceptions

from gateway.stores.redis_base import RedisNamespace, unavailable

COUNTERS = ("requests", "prompt_tokens", "completion_tokens", "errors", "cached", "estimated")
RETENTION_SECONDS = 400 * 86400  # usage hashes expire after ~13 months


@dataclass(frozen=True, slots=True)
class UsageDelta:
    """Increments for one (day, team, key_id, model) cell."""

    day: date
    team: str
    key_id: str
    model: str
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    errors: int = 0
    cached: int = 0
    estimated: int = 0

    @property
    def cell(self) -> tuple[date, str, str, str]:
        return (self.day, self.team, self.key_id, self.model)

    def counts(self) -> dict[str, int]:
        return {name: int(getattr(self, name)) for name in COUNTERS}

    def plus(self, other: UsageDelta) -> UsageDelta:
        return replace(self, **{n: getattr(self, n) + getattr(other, n) for n in COUNTERS})


# A stored row has the same shape as a delta: totals for one cell.
UsageRow = UsageDelta


def day_of(ts: float) -> date:
    """The UTC day a unix timestamp falls in (usage days are UTC days)."""
    return datetime.fromtimestamp(ts, UTC).date()


class UsageStore(Protocol):
    async def add(self, rows: list[UsageDelta]) -> None:
        """Increment the counters of each row's cell (one round trip on Redis)."""
        ...

    async def query(self, team: str | None, since: date, until: date) -> list[UsageRow]:
        """Totals per cell for `team` (or every team) for days in ``[since, until]``, sorted."""
        ...


def merge(rows: Iterable[UsageDelta]) -> dict[tuple[date, str, str, str], UsageDelta]:
    cells: dict[tuple[date, str, str, str], UsageDelta] = {}
    for row in rows:
        found = cells.get(row.cell)
        cells[row.cell] = row if found is None else found.plus(row)
    return cells


def _select(
    cells: Iterable[UsageDelta], team: str | None, since: date, until: date
) -> list[UsageRow]:
    chosen = [r for r in cells if since <= r.day <= until and (team is None or r.team == team)]
    return sorted(chosen, key=lambda r: (r.day, r.team, r.model, r.key_id))


class MemoryUsageStore:
    """In-process totals, optionally appended to a JSON-lines file shared by processes."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self._cells: dict[tuple[date, str, str, str], UsageDelta] = {}

    async def add(self, rows: list[UsageDelta]) -> None:
        if not rows:
            return
        for row in rows:
            found = self._cells.get(row.cell)
            self._cells[row.cell] = row if found is None else found.plus(row)
        if self.path is not None:
            payload = b"".join(_line(row) for row in rows)
            await asyncio.to_thread(_append, self.path, payload)

    async def query(self, team: str | None, since: date, until: date) -> list[UsageRow]:
        if self.path is None:
            return _select(self._cells.values(), team, since, until)
        rows = await asyncio.to_thread(read_usage_file, self.path)
        return _select(merge(rows).values(), team, since, until)


def _line(row: UsageDelta) -> bytes:
    data: dict[str, object] = {"day": row.day.isoformat(), "team": row.team,
                               "key_id": row.key_id, "model": row.model}
    data.update({k: v for k, v in row.counts().items() if v})
    return orjson.dumps(data) + b"\n"


def _append(path: Path, payload: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, payload)
    finally:
        os.close(fd)


def read_usage_file(path: Path) -> list[UsageDelta]:
    """Every delta in a usage file; a torn last line (a crash mid-write) is skipped."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return []
    rows = []
    names = {f.name for f in fields(UsageDelta)}
    for line in raw.splitlines():
        try:
            data = orjson.loads(line)
            data["day"] = date.fromisoformat(data["day"])
            rows.append(UsageDelta(**{k: v for k, v in data.items() if k in names}))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            continue
    return rows


class RedisUsageStore:
    """One hash per team and day, pipelined HINCRBY, index sets instead of SCAN."""

    def __init__(self, ns: RedisNamespace) -> None:
        self.ns = ns
        self._teams = ns.key("usage", "teams")

    def _hash(self, team: str, day: date) -> str:
        return self.ns.key(team, "usage", day.isoformat())

    def _days(self, team: str) -> str:
        return self.ns.key(team, "usage", "days")

    async def add(self, rows: list[UsageDelta]) -> None:
        if not rows:
            return
        pipe = self.ns.client.pipeline(transaction=False)
        hashes: set[tuple[str, date]] = set()
        for row in merge(rows).values():
            key = self._hash(row.team, row.day)
            for name, value in row.counts().items():
                if value:
                    pipe.hincrby(key, f"{row.key_id}\t{row.model}\t{name}", value)
            hashes.add((row.team, row.day))
        for team, day in hashes:
            pipe.expire(self._hash(team, day), RETENTION_SECONDS)
            pipe.sadd(self._days(team), day.isoformat())
            pipe.sadd(self._teams, team)
        try:
            await pipe.execute()
        except redis.exceptions.RedisError as exc:
            raise unavailable(exc) from exc

    async def query(self, team: str | None, since: date, until: date) -> list[UsageRow]:
        client = self.ns.client
        try:
            teams = [team] if team is not None else sorted(
                _text(t) for t in await client.smembers(self._teams))
            pipe = client.pipeline(transaction=False)
            for name in teams:
                pipe.smembers(self._days(name))
            day_sets = await pipe.execute()
            wanted: list[tuple[str, date]] = []
            for name, days in zip(teams, day_sets, strict=True):
                for raw in days:
                    day = date.fromisoformat(_text(raw))
                    if since <= day <= until:
                        wanted.append((name, day))
            pipe = client.pipeline(transaction=False)
            for name, day in wanted:
                pipe.hgetall(self._hash(name, day))
            hashes = await pipe.execute()
        except redis.exceptions.RedisError as exc:
            raise unavailable(exc) from exc
        cells: dict[tuple[date, str, str, str], dict[str, int]] = {}
        for (name, day), found in zip(wanted, hashes, strict=True):
            for field_name, value in found.items():
                key_id, model, counter = _text(field_name).split("\t")
                cells.setdefault((day, name, key_id, model), {})[counter] = int(value)
        rows = [UsageDelta(day, t, k, m, **{c: n for c, n in counts.items() if c in COUNTERS})
                for (day, t, k, m), counts in cells.items()]
        return _select(rows, team, since, until)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
