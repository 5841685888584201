"""Usage metering: an `ExchangeObserver` that sums finished exchanges in memory, per (day,
team, key, model) for the `UsageStore` and per (minute, team, model, backend) for the
console's `SeriesStore`, and flushes the sums to them in the background.

`exchange_finished` only adds to dicts and bumps Prometheus counters (bounded labels: team,
model, backend, status, cached — never key ids). A background task writes the pending sums
every `flush_interval` seconds, or sooner once `max_pending` records are waiting, with one
`add` call per store (one Redis pipeline each). A failed write keeps its sums for the next
flush; `stop()` makes a final flush.
"""

from __future__ import annotations

import asyncio
import contextlib
from bisect import bisect_left
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import date
from typing import Any

import structlog

from gateway.exchange import ExchangeRecord
from gateway.stores.series import BOUNDS_MS, LATENCY, TTFT, WIDTH, SeriesRow, SeriesStore
from gateway.stores.usage import UsageDelta, UsageStore, day_of

log = structlog.get_logger("gateway.analytics.metering")

Cell = tuple[date, str, str, str]  # day, team, key id, model
Point = tuple[int, str, str, str]  # minute, team, model, backend


@dataclass(frozen=True, slots=True)
class MeterCounters:
    """Running counts for the lead's `Metrics.tokens` and `Metrics.team_requests`, made by
    `Metrics.tally` (plain ints added to the counters when the metrics are sampled); either
    may be None."""

    tokens: dict[tuple[str, ...], int] | None = None  # team, model, backend, prompt|completion
    requests: dict[tuple[str, ...], int] | None = None  # team, model, backend, status, cached


class Meter:
    def __init__(
        self,
        store: UsageStore,
        counters: MeterCounters | None = None,
        *,
        series: SeriesStore | None = None,
        flush_interval: float = 1.0,
        max_pending: int = 1000,
    ) -> None:
        self.store = store
        self.series = series
        self.counters = counters or MeterCounters()
        self.flush_interval = flush_interval
        self.max_pending = max_pending
        # per usage cell, the running sums in `COUNTERS` order (plain ints: one record adds
        # to six of them; a frozen `UsageDelta` per record cost a `replace` call on the hot
        # path); per series point, in the series' `FIELDS` order
        self._usage = _Sums(self._write_usage)
        self._series = _Sums(self._write_series)
        self._records = 0
        self._second = -1  # the wall second whose UTC day is `_day` and minute `_minute`
        self._day = day_of(0)
        self._minute = 0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._lock = asyncio.Lock()
        # label values per (team, model, backend, status, cached), made once
        self._labels: dict[tuple[str, str, str, int, bool], tuple[tuple[str, ...], ...]] = {}
        self.flushes = 0  # successful store writes (tests, debugging)

    # -- the observer ------------------------------------------------------------------------

    def exchange_finished(self, record: ExchangeRecord) -> None:
        try:
            second = int(record.time)
            if second != self._second:
                self._second, self._day = second, day_of(record.time)
                self._minute = second - second % 60
            prompt, completion = record.prompt_tokens, record.completion_tokens
            error = record.outcome == "error"
            cell = (self._day, record.team, record.key_id, record.model)
            cells = self._usage.cells
            sums = cells.get(cell)
            if sums is None:
                sums = cells[cell] = [0, 0, 0, 0, 0, 0]
            sums[0] += 1
            sums[1] += prompt
            sums[2] += completion
            if error:
                sums[3] += 1
            if record.cached:
                sums[4] += 1
            if record.estimated:
                sums[5] += 1
            if self.series is not None:
                self._point(record, prompt, completion, error)
            self._records += 1
            if self._records >= self.max_pending:
                self._wake.set()
            self._count(record)
        except Exception:  # an observer must never raise into the pipeline
            log.exception("meter_record_failed", request_id=record.request_id)

    def _point(self, record: ExchangeRecord, prompt: int, completion: int, error: bool) -> None:
        """Add the record to its minute's series sums."""
        point = (self._minute, record.team, record.model, record.backend)
        points = self._series.cells
        sums = points.get(point)
        if sums is None:
            sums = points[point] = [0] * WIDTH
        sums[0] += 1
        if error:
            sums[1] += 1
        sums[2] += prompt
        sums[3] += completion
        if record.cached:
            sums[4] += 1
        # a bucket counts the values up to its bound (bisect_left: a value on a bound is in)
        sums[LATENCY + bisect_left(BOUNDS_MS, record.latency_ms)] += 1
        if record.ttft_ms is not None and not record.cached:
            sums[TTFT + bisect_left(BOUNDS_MS, record.ttft_ms)] += 1

    def _count(self, record: ExchangeRecord) -> None:
        key = (record.team, record.model, record.backend, record.status, record.cached)
        labels = self._labels.get(key)
        if labels is None:
            cells = (record.team, record.model, record.backend)
            labels = self._labels[key] = (
                (*cells, str(record.status), "true" if record.cached else "false"),
                (*cells, "prompt"), (*cells, "completion"))
        requests, tokens = self.counters.requests, self.counters.tokens
        if requests is not None:
            requests[labels[0]] = requests.get(labels[0], 0) + 1
        if tokens is not None:
            if record.prompt_tokens:
                tokens[labels[1]] = tokens.get(labels[1], 0) + record.prompt_tokens
            if record.completion_tokens:
                tokens[labels[2]] = tokens.get(labels[2], 0) + record.completion_tokens

    # -- flushing ----------------------------------------------------------------------------

    @property
    def pending(self) -> int:
        """Records summed in memory and not yet written."""
        return self._records

    async def flush(self) -> None:
        """Write what is pending, one call per store; a store that fails keeps its sums for
        the next flush (the other's write goes on), and the first failure is raised."""
        async with self._lock:
            count, self._records = self._records, 0
            failed: Exception | None = None
            try:
                for sums in (self._usage, self._series):
                    try:
                        await sums.flush()
                    except Exception as exc:
                        failed = failed or exc
            except BaseException:  # cancelled: what was not written stays pending
                self._records += count
                raise
            if failed is not None:
                self._records += count
                log.warning("usage_flush_failed", records=count, error=type(failed).__name__)
                raise failed
            if count:
                self.flushes += 1

    async def _write_usage(self, batch: dict[Cell, list[int]]) -> None:
        await self.store.add([UsageDelta(*cell, *sums) for cell, sums in batch.items()])

    async def _write_series(self, batch: dict[Point, list[int]]) -> None:
        if self.series is not None:
            await self.series.add([SeriesRow(*point, tuple(sums))
                                   for point, sums in batch.items()])

    async def _run(self) -> None:
        while not self._stopping:
            with contextlib.suppress(TimeoutError):  # not wait_for: see mirror.wait_event
                async with asyncio.timeout(self.flush_interval):
                    await self._wake.wait()
            self._wake.clear()
            with contextlib.suppress(Exception):  # logged in flush(); retried next round
                await self.flush()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="usage-meter")

    async def stop(self) -> None:
        if self._task is not None:
            # Asked, not cancelled: on Python 3.11 a cancellation that lands as a Redis reply
            # arrives is lost inside redis-py (asyncio.wait_for), and the flusher ran on.
            self._stopping = True
            self._wake.set()
            done, _ = await asyncio.wait({self._task}, timeout=2.0)
            if not done:  # a write that hangs
                self._task.cancel()
            self._task = None
        try:
            await self.flush()
        except Exception:  # already logged; shutdown goes on
            log.error("usage_final_flush_failed", records=self._records)


class _Sums:
    """Running sums per key for one store, written by `write` (one call per flush); a
    write that fails adds its batch back to what gathered meanwhile, for the next flush."""

    def __init__(self, write: Callable[[dict[Any, list[int]]], Awaitable[None]]) -> None:
        self.cells: dict[Any, list[int]] = {}
        self.write = write

    async def flush(self) -> None:
        if not self.cells:
            return
        batch, self.cells = self.cells, {}
        try:
            await self.write(batch)
        except BaseException:  # store down or cancelled: keep the sums for later
            for key, sums in batch.items():
                found = self.cells.get(key)
                if found is None:
                    self.cells[key] = sums
                else:
                    found[:] = [a + b for a, b in zip(found, sums, strict=True)]
            raise
