"""Usage metering: an `ExchangeObserver` that sums finished exchanges per (day, team, key,
model) in memory and flushes the sums to the `UsageStore` in the background.

`exchange_finished` only adds to a dict and bumps Prometheus counters (bounded labels: team,
model, backend, status, cached — never key ids). A background task writes the pending sums
every `flush_interval` seconds, or sooner once `max_pending` records are waiting, with one
`UsageStore.add` call (one Redis pipeline). A failed write keeps the sums for the next flush;
`stop()` makes a final flush.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from datetime import date

import structlog

from gateway.exchange import ExchangeRecord
from gateway.stores.usage import UsageDelta, UsageStore, day_of

log = structlog.get_logger("gateway.analytics.metering")

Cell = tuple[date, str, str, str]


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
        flush_interval: float = 1.0,
        max_pending: int = 1000,
    ) -> None:
        self.store = store
        self.counters = counters or MeterCounters()
        self.flush_interval = flush_interval
        self.max_pending = max_pending
        # per cell, the running sums in `COUNTERS` order (plain ints: one record adds to six
        # of them; a frozen `UsageDelta` per record cost a `replace` call on the hot path)
        self._pending: dict[Cell, list[int]] = {}
        self._records = 0
        self._second = -1  # the wall second whose UTC day is `_day`
        self._day = day_of(0)
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
            cell = (self._day, record.team, record.key_id, record.model)
            sums = self._pending.get(cell)
            if sums is None:
                sums = self._pending[cell] = [0, 0, 0, 0, 0, 0]
            sums[0] += 1
            sums[1] += record.prompt_tokens
            sums[2] += record.completion_tokens
            if record.outcome == "error":
                sums[3] += 1
            if record.cached:
                sums[4] += 1
            if record.estimated:
                sums[5] += 1
            self._records += 1
            if self._records >= self.max_pending:
                self._wake.set()
            self._count(record)
        except Exception:  # an observer must never raise into the pipeline
            log.exception("meter_record_failed", request_id=record.request_id)

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
        """Write what is pending with one store call; on failure keep it for the next try."""
        async with self._lock:
            if not self._pending:
                return
            batch, count = self._pending, self._records
            self._pending, self._records = {}, 0
            try:
                await self.store.add([UsageDelta(*cell, *sums) for cell, sums in batch.items()])
            except BaseException as exc:  # store down or cancelled: keep the sums for later
                for cell, sums in batch.items():
                    found = self._pending.get(cell)
                    if found is None:
                        self._pending[cell] = sums
                    else:
                        found[:] = [a + b for a, b in zip(found, sums, strict=True)]
                self._records += count
                if isinstance(exc, Exception):
                    log.warning("usage_flush_failed", records=count, error=type(exc).__name__)
                raise
            self.flushes += 1

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
