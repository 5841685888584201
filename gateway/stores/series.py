"""Time-bucketed usage for the console's charts: per bucket and (team, model, backend), the
counts of requests, errors, tokens and cached answers, and fixed-boundary histograms of
latency and time to first token (counts per boundary, never samples, so that a percentile
of any sum of buckets can be estimated).

Rows are added at minute resolution and rolled up into minute, hour and day buckets (one
`Step` each). Hour and day buckets are kept for ``keep_days``; minute buckets for a day at
most (only the last hour is drawn from them). A bucket is gone once it ended longer ago than
that, by the store's clock.

- `MemorySeriesStore`: dicts in the process (one replica; lost at restart).
- `RedisSeriesStore`: one hash per step and bucket, ``{prefix}:{series}:<step>:<start>``,
  fields ``<team>\\t<model>\\t<backend>\\t<field>`` incremented with HINCRBY, all of one
  `add` in ONE pipeline, each hash expiring with its bucket.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

import redis.exceptions

from gateway.stores.redis_base import RedisNamespace, unavailable

# Upper bounds (ms) of the histogram buckets; one more count holds what is above the last.
BOUNDS_MS = (5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10_000, 30_000, 60_000, 120_000)
COUNTERS = ("requests", "errors", "prompt_tokens", "completion_tokens", "cached")
HISTOGRAM = len(BOUNDS_MS) + 1
LATENCY = len(COUNTERS)  # where the latency histogram starts in `SeriesRow.values`
TTFT = LATENCY + HISTOGRAM  # where the time-to-first-token histogram starts
FIELDS = (*COUNTERS, *(f"l{i}" for i in range(HISTOGRAM)), *(f"t{i}" for i in range(HISTOGRAM)))
WIDTH = len(FIELDS)
_INDEX = {name: i for i, name in enumerate(FIELDS)}

Clock = Callable[[], float]


@dataclass(frozen=True, slots=True)
class Step:
    name: str
    seconds: int
    longest: float | None = None  # kept at most this many seconds, whatever `keep_days` says

    def start(self, ts: float) -> int:
        """The start of the bucket `ts` falls in."""
        return int(ts) - int(ts) % self.seconds


MINUTE = Step("minute", 60, longest=86_400)
HOUR = Step("hour", 3600)
DAY = Step("day", 86_400)
STEPS = (MINUTE, HOUR, DAY)

Cell = tuple[str, str, str]  # team, model, backend


@dataclass(frozen=True, slots=True)
class SeriesRow:
    """One bucket's counts for one (team, model, backend); `values` in `FIELDS` order."""

    start: int  # unix seconds
    team: str
    model: str
    backend: str
    values: tuple[int, ...]

    @property
    def cell(self) -> Cell:
        return (self.team, self.model, self.backend)

    def get(self, name: str) -> int:
        return self.values[_INDEX[name]]

    @property
    def latency(self) -> tuple[int, ...]:
        return self.values[LATENCY:TTFT]

    @property
    def ttft(self) -> tuple[int, ...]:
        return self.values[TTFT:]


def add_values(a: Iterable[int], b: Iterable[int]) -> tuple[int, ...]:
    return tuple(x + y for x, y in zip(a, b, strict=True))


class SeriesStore(Protocol):
    async def add(self, rows: list[SeriesRow]) -> None:
        """Add minute rows to the minute, hour and day buckets they fall in (one round trip
        on Redis); rows whose buckets are past keeping are dropped."""
        ...

    async def query(self, step: Step, since: float, until: float) -> list[SeriesRow]:
        """The rows of `step`'s buckets that start in ``[since, until)`` and are still kept,
        sorted by start, team, model, backend."""
        ...


class _Retention:
    """How long each step's buckets are kept, by an injectable clock."""

    def __init__(self, keep_days: int, clock: Clock) -> None:
        self.keep = keep_days * 86_400.0
        self.clock = clock

    def _kept(self, step: Step) -> float:
        return self.keep if step.longest is None else min(self.keep, step.longest)

    def ttl(self, step: Step, start: int) -> float:
        """Seconds until the bucket is gone (<= 0: gone already)."""
        return start + step.seconds + self._kept(step) - self.clock()

    def starts(self, step: Step, since: float, until: float) -> range:
        """The kept buckets' starts in ``[since, until)``."""
        gone_before = self.clock() - step.seconds - self._kept(step)  # ttl(start) > 0 after
        first = max(math.ceil(since), step.start(gone_before) + step.seconds)
        first += -first % step.seconds  # the first bucket start at or after it
        return range(first, math.ceil(until), step.seconds)


def _sorted(rows: Iterable[SeriesRow]) -> list[SeriesRow]:
    return sorted(rows, key=lambda r: (r.start, r.team, r.model, r.backend))


class MemorySeriesStore:
    """Buckets in dicts; expired ones are dropped as new ones are added."""

    def __init__(self, keep_days: int = 30, clock: Clock = time.time) -> None:
        self.retention = _Retention(keep_days, clock)
        self._buckets: dict[Step, dict[int, dict[Cell, tuple[int, ...]]]] = {
            step: {} for step in STEPS}

    async def add(self, rows: list[SeriesRow]) -> None:
        for step in STEPS:
            buckets = self._buckets[step]
            for row in rows:
                start = step.start(row.start)
                if self.retention.ttl(step, start) <= 0:
                    continue
                cells = buckets.setdefault(start, {})
                found = cells.get(row.cell)
                cells[row.cell] = row.values if found is None else add_values(found, row.values)
            # buckets arrive roughly in time order: drop from the front while expired
            while buckets and self.retention.ttl(step, oldest := next(iter(buckets))) <= 0:
                del buckets[oldest]

    async def query(self, step: Step, since: float, until: float) -> list[SeriesRow]:
        buckets = self._buckets[step]
        return _sorted(SeriesRow(start, *cell, values)
                       for start in self.retention.starts(step, since, until)
                       for cell, values in buckets.get(start, {}).items())


class RedisSeriesStore:
    """One hash per step and bucket under the hash tag ``{series}``; see the module doc."""

    def __init__(self, ns: RedisNamespace, keep_days: int = 30, clock: Clock = time.time
                 ) -> None:
        self.ns = ns
        self.retention = _Retention(keep_days, clock)

    def _hash(self, step: Step, start: int) -> str:
        return self.ns.key("series", step.name, str(start))

    async def add(self, rows: list[SeriesRow]) -> None:
        if not rows:
            return
        pipe = self.ns.client.pipeline(transaction=False)
        expiring: dict[str, float] = {}
        for step in STEPS:
            for row in rows:
                start = step.start(row.start)
                ttl = self.retention.ttl(step, start)
                if ttl <= 0:
                    continue
                key = self._hash(step, start)
                prefix = f"{row.team}\t{row.model}\t{row.backend}\t"
                for name, value in zip(FIELDS, row.values, strict=True):
                    if value:
                        pipe.hincrby(key, prefix + name, value)
                expiring[key] = ttl
        for key, ttl in expiring.items():
            pipe.expire(key, max(1, int(ttl) + 1))
        try:
            await pipe.execute()
        except redis.exceptions.RedisError as exc:
            raise unavailable(exc) from exc

    async def query(self, step: Step, since: float, until: float) -> list[SeriesRow]:
        starts = self.retention.starts(step, since, until)
        pipe = self.ns.client.pipeline(transaction=False)
        for start in starts:
            pipe.hgetall(self._hash(step, start))
        try:
            hashes = await pipe.execute() if starts else []
        except redis.exceptions.RedisError as exc:
            raise unavailable(exc) from exc
        rows: list[SeriesRow] = []
        for start, found in zip(starts, hashes, strict=True):
            cells: dict[Cell, list[int]] = {}
            for field_name, value in found.items():
                team, model, backend, name = _text(field_name).split("\t")
                index = _INDEX.get(name)
                if index is not None:
                    cells.setdefault((team, model, backend), [0] * WIDTH)[index] = int(value)
            rows.extend(SeriesRow(start, *cell, tuple(values)) for cell, values in cells.items())
        return _sorted(rows)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
