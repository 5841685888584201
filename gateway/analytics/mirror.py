"""Analytics mirroring: every finished exchange goes to the outbox, then to every sink.

`Mirror.exchange_finished` serialises the record and appends it to an in-memory list; a
writer task moves that list into the outbox (spool append, or one pipelined XADD), at most
once per ``write_interval`` (10 ms) so that a loaded gateway writes batches rather than one
record per event-loop turn. One delivery worker per sink claims records from the outbox and
delivers them, at most one at a time per conversation (turn 2 never overtakes turn 1); a sink
with ``batch`` > 1 gets the heads of up to that many conversations in one call (one batch
that is not full in flight at a time, so that under load the POSTs fill up). Failures
(429, 5xx, timeouts) are retried with exponential backoff and full jitter; a record that has
kept failing for ``dead_letter_after`` seconds (or that a sink refused outright) is
dead-lettered. `stop()` moves every accepted record into the outbox, delivers what it can
within ``shutdown_grace`` and leaves the rest in the outbox for the next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
import structlog

from gateway.analytics.sinks import Delivery, Sink, idempotency_key, retryable
from gateway.config import GatewayConfig
from gateway.errors import UpstreamError
from gateway.exchange import ExchangeRecord
from gateway.metrics import Metrics
from gateway.stores.outbox import Outbox, OutboxItem
from gateway.tracing import NO_TRACING, Tracing

log = structlog.get_logger("gateway.analytics.mirror")
LOCAL_RECORDS = 4096
DELIVERY_RESULTS = ("delivered", "retried", "dead_lettered")


@dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential backoff with full jitter: uniform(0, min(cap, initial * factor**n))."""

    initial: float = 0.1
    factor: float = 2.0
    cap: float = 30.0

    def delay(self, attempts: int, retry_after: float | None = None) -> float:
        ceiling = min(self.cap, self.initial * self.factor ** max(0, attempts - 1))
        wait = random.uniform(0, ceiling)
        if retry_after:
            wait = max(wait, min(retry_after, self.cap))
        return wait


async def wait_event(event: asyncio.Event, seconds: float) -> None:
    """Wait for `event` at most `seconds`. Not ``wait_for``: on Python 3.11 it can swallow a
    cancellation that races with the event, and a worker would then never stop."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await event.wait()


def default_consumer() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


@dataclass(slots=True)
class _Held:
    item: OutboxItem
    record: ExchangeRecord | None  # None: undecodable data (dead-lettered)
    due: float = 0.0  # monotonic time of the next attempt
    delivered: bool = False  # the sink has it; only the outbox's ack is still to do


@dataclass
class _SinkWorker:
    sink: Sink
    # a conversation's held records, oldest first (it seldom holds more than one)
    convs: dict[str, list[_Held]] = field(default_factory=dict)
    busy: set[str] = field(default_factory=set)
    inflight: int = 0  # delivery tasks running (each one record or one batch)
    partial: bool = False  # one of them is a batch smaller than the sink's
    ids: set[str] = field(default_factory=set)
    task: asyncio.Task[None] | None = None
    wake: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def held(self) -> int:
        return len(self.ids)


class Mirror:
    def __init__(
        self,
        config: GatewayConfig,
        outbox: Outbox,
        sinks: list[Sink],
        metrics: Metrics | None = None,
        *,
        consumer: str | None = None,
        backoff: Backoff | None = None,
        batch: int = 64,
        concurrency: int = 16,
        poll_interval: float = 0.2,
        write_interval: float = 0.01,
        clock: Callable[[], float] = time.time,
        tracing: Tracing = NO_TRACING,
    ) -> None:
        box = config.analytics.outbox
        self.outbox = outbox
        self.sinks = list(sinks)
        self.metrics = metrics
        self.consumer = consumer or default_consumer()
        self.backoff = backoff or Backoff()
        self.batch = batch
        self.concurrency = concurrency
        self.poll_interval = poll_interval
        self.write_interval = write_interval
        self.dead_letter_after = box.dead_letter_after
        self.shutdown_grace = box.shutdown_grace
        self.max_queue = box.max_queue
        self.touch_every = box.claim_idle_seconds / 3
        self.clock = clock
        self.tracing = tracing
        self._accepted: list[tuple[bytes, str]] = []
        # records accepted here and not yet done with by every sink, by idempotency key:
        # claimed back without decoding their JSON (bounded; a miss just decodes)
        self._local: dict[str, list[Any]] = {}
        self._put_wake = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self._workers = {s.name: _SinkWorker(s) for s in self.sinks}
        self._stopping = False
        self._writer_done = False
        if metrics is not None:
            # every series exists from the start: Prometheus sees no increase in a series'
            # first value, and the first dead letter must raise the alert too
            for sink in self.sinks:
                for result in DELIVERY_RESULTS:
                    metrics.child(metrics.outbox_events, sink.name, result)

    # -- accepting ---------------------------------------------------------------------------

    def exchange_finished(self, record: ExchangeRecord) -> None:
        if not self.sinks:
            return
        try:
            key = idempotency_key(record)
            accepted = self._accepted
            # sliced: orjson's output keeps its whole working buffer, and the in-process
            # outbox holds the data
            accepted.append((orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE)[:-1], key))
            self._local[key] = [record, len(self.sinks)]
            if len(self._local) > LOCAL_RECORDS:
                del self._local[next(iter(self._local))]
            if len(accepted) == 1:  # the writer clears the event when it takes the list
                self._put_wake.set()
            elif len(accepted) == self.max_queue:
                log.warning("outbox_backlog", accepted=len(accepted))
        except Exception:  # an observer must never raise into the pipeline
            log.exception("mirror_accept_failed", request_id=record.request_id)

    async def _write_accepted(self) -> None:
        """Move accepted records into the outbox; on failure keep them and retry."""
        if not self._accepted:
            return
        batch, self._accepted = self._accepted, []
        try:
            await self.outbox.put(batch)
        except BaseException:
            self._accepted[:0] = batch
            raise
        for worker in self._workers.values():
            worker.wake.set()

    async def _writer_loop(self) -> None:
        while True:
            await self._put_wake.wait()
            self._put_wake.clear()
            if self._writer_done:
                return
            try:
                await self._write_accepted()
            except Exception:  # the store may be down: keep the records, try again soon
                log.warning("outbox_put_failed", waiting=len(self._accepted), exc_info=True)
                await asyncio.sleep(0.5)
                self._put_wake.set()
                continue
            if self.write_interval and not self._writer_done:
                # let the next records gather: one write (a thread hop, or one Redis round
                # trip) per interval instead of one per event-loop turn under load
                await asyncio.sleep(self.write_interval)

    # -- delivering --------------------------------------------------------------------------

    def _count(self, sink: str, result: str, n: int = 1) -> None:
        if self.metrics is not None:
            self.metrics.child(self.metrics.outbox_events, sink, result).inc(n)

    async def _claim(self, worker: _SinkWorker) -> None:
        # room for two full sink batches: one in flight while the next one fills
        room = max(self.batch, 2 * worker.sink.batch) - worker.held
        if room <= 0:
            return
        items = await self.outbox.claim(worker.sink.name, room, self.consumer)
        ids, convs, local = worker.ids, worker.convs, self._local
        for item in items:
            if item.id in ids:
                continue
            record: ExchangeRecord | None
            try:
                mine = local.get(item.key)
                record = (mine[0] if mine is not None
                          else ExchangeRecord.from_dict(orjson.loads(item.data)))
                conv = record.conversation_id or record.request_id
            except (orjson.JSONDecodeError, TypeError, ValueError):
                record, conv = None, f"bad-{item.id}"
            ids.add(item.id)
            queue = convs.get(conv)
            if queue is None:
                convs[conv] = [_Held(item, record)]
            else:
                queue.append(_Held(item, record))

    async def _deliver(self, worker: _SinkWorker, group: list[tuple[str, _Held]],
                       partial: bool = False) -> None:
        """Deliver the heads of some conversations: one record, or one batch (a batch
        succeeds or fails as a whole; each of its records is then retried on its own
        schedule, so later turns of a conversation still wait for earlier ones)."""
        name = worker.sink.name
        try:
            ready: list[tuple[str, _Held]] = []
            for conv, held in group:
                if held.record is None:
                    await self._dead(worker, conv, held, "undecodable record")
                else:
                    ready.append((conv, held))
            if ready and await self._send(worker, ready):
                await self.outbox.ack([held.item for _, held in ready])
                self._pop(worker, [conv for conv, _ in ready])
                self._count(name, "delivered", len(ready))
        except Exception:  # the outbox may be down: the records stay claimed, try later
            log.warning("sink_delivery_failed", sink=name, exc_info=True)
            for _, held in group:
                held.due = time.monotonic() + 1.0
        finally:
            worker.busy.difference_update([conv for conv, _ in group])
            worker.inflight -= 1
            if partial:
                worker.partial = False
            worker.wake.set()

    async def _send(self, worker: _SinkWorker, ready: list[tuple[str, _Held]]) -> bool:
        """Hand the records the sink does not have yet to it; False when it failed (each
        record is then retried or dead-lettered)."""
        to_send = [h for _, h in ready if not h.delivered]
        if not to_send:
            return True
        try:
            await self._hand_over(worker.sink, to_send)
        except UpstreamError as exc:
            for conv, held in ready:
                if not held.delivered:
                    await self._failed(worker, conv, held, exc)
            return False
        for held in to_send:  # an ack that fails now is retried without delivering again
            held.delivered = True
        return True

    async def _hand_over(self, sink: Sink, held: list[_Held]) -> None:
        deliveries = [Delivery(h.record, h.item.key, h.item.data)
                      for h in held if h.record is not None]
        # a span of its own, linked to each record's request span: a delivery comes later,
        # maybe from another replica, and one batch carries many requests
        with self.tracing.delivery(sink.name, [d.record for d in deliveries]):
            await sink.deliver(deliveries)

    async def _failed(self, worker: _SinkWorker, conv: str, held: _Held,
                      exc: UpstreamError) -> None:
        name, item = worker.sink.name, held.item
        if not retryable(exc):
            await self._dead(worker, conv, held, exc.message)
            return
        failed = await self.outbox.nack(item, self.clock())
        first = failed.first_failure or self.clock()
        if self.clock() - first >= self.dead_letter_after:
            await self._dead(worker, conv, held, f"kept failing: {exc.message}")
            return
        retry_after = exc.headers.get("retry-after")
        wait = self.backoff.delay(failed.attempts, float(retry_after) if retry_after else None)
        held.item, held.due = failed, time.monotonic() + wait
        self._count(name, "retried")
        log.info("sink_retry", sink=name, attempts=failed.attempts, wait=round(wait, 3),
                 error=exc.code, detail=exc.message)

    async def _dead(self, worker: _SinkWorker, conv: str, held: _Held, reason: str) -> None:
        await self.outbox.dead_letter(held.item, reason)
        self._count(worker.sink.name, "dead_lettered")
        log.warning("sink_dead_letter", sink=worker.sink.name, reason=reason,
                    attempts=held.item.attempts)
        self._pop(worker, [conv])

    def _pop(self, worker: _SinkWorker, done: list[str]) -> None:
        """Drop the heads of these conversations: their records are done with for the sink."""
        convs, ids, local = worker.convs, worker.ids, self._local
        for conv in done:
            queue = convs[conv]
            item = queue.pop(0).item
            ids.discard(item.id)
            mine = local.get(item.key)
            if mine is not None:
                mine[1] -= 1
                if mine[1] <= 0:
                    del local[item.key]
            if not queue:
                del convs[conv]

    async def _work(self, worker: _SinkWorker) -> None:
        """One sink's loop: claim records, keep the claims alive, start deliveries."""
        tasks: set[asyncio.Task[None]] = set()
        last_touch = last_depth = time.monotonic()
        try:
            while not self._stopping:
                worker.wake.clear()
                now = time.monotonic()
                try:
                    await self._claim(worker)
                    if now - last_touch >= self.touch_every and worker.held:
                        last_touch = now
                        await self.outbox.touch([h.item for q in worker.convs.values()
                                                 for h in q], self.consumer)
                    if self.metrics is not None and now - last_depth >= 1.0:
                        last_depth = now
                        await self._report_depth(worker)
                except Exception:  # the outbox may be down: the worker must go on
                    log.warning("outbox_claim_failed", sink=worker.sink.name, exc_info=True)
                next_due = self._dispatch(worker, tasks, now)
                await wait_event(worker.wake, max(0.0, next_due - now))
        finally:
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)

    async def _report_depth(self, worker: _SinkWorker) -> None:
        assert self.metrics is not None
        depth = await self.outbox.depth()
        self.metrics.outbox_depth.labels(worker.sink.name).set(depth.get(worker.sink.name, 0))

    def _dispatch(self, worker: _SinkWorker, tasks: set[asyncio.Task[None]], now: float
                  ) -> float:
        """Start deliveries of the conversations whose head is due (full batches, and at most
        one batch that is not full); returns when the next head falls due."""
        next_due = now + self.poll_interval
        group: list[tuple[str, _Held]] = []
        for conv, queue in list(worker.convs.items()):
            if conv in worker.busy:
                continue
            head = queue[0]
            if head.due > now:
                next_due = min(next_due, head.due)
                continue
            if worker.inflight >= self.concurrency:
                break
            worker.busy.add(conv)
            group.append((conv, head))
            if len(group) >= worker.sink.batch:
                self._start(tasks, worker, group)
                group = []
        if group and not worker.partial:
            self._start(tasks, worker, group, partial=True)
        elif group:
            # A batch that is not full waits while another one is in flight (which wakes the
            # loop when it ends): under load the records that arrive meanwhile go with it, in
            # fewer and fuller POSTs; alone, a record goes at once. Full batches never wait.
            worker.busy.difference_update([conv for conv, _ in group])
        return next_due

    def _start(self, tasks: set[asyncio.Task[None]], worker: _SinkWorker,
               group: list[tuple[str, _Held]], partial: bool = False) -> None:
        worker.inflight += 1
        if partial:
            worker.partial = True
        task = asyncio.create_task(self._deliver(worker, group, partial))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        await self.outbox.start()
        for sink in self.sinks:
            await sink.start()
        self._writer = asyncio.create_task(self._writer_loop(), name="outbox-writer")
        for worker in self._workers.values():
            worker.task = asyncio.create_task(self._work(worker), name=f"sink-{worker.sink.name}")

    async def _idle(self) -> bool:
        if self._accepted or any(w.held for w in self._workers.values()):
            return False
        return not any((await self.outbox.depth()).values())

    async def stop(self) -> None:
        """Accepted records into the outbox, deliver within the grace, the rest stays."""
        deadline = time.monotonic() + self.shutdown_grace
        if self._writer is not None:
            # let a put in progress finish (cancelling it midway could write a record twice)
            self._writer_done = True
            self._put_wake.set()
            done, _ = await asyncio.wait({self._writer}, timeout=max(1.0, self.shutdown_grace))
            if not done:
                self._writer.cancel()
            self._writer = None
        for attempt in range(3):
            try:
                await self._write_accepted()
                break
            except Exception:
                log.error("outbox_put_failed_at_shutdown", waiting=len(self._accepted),
                          attempt=attempt, exc_info=True)
                await asyncio.sleep(0.2)
        with contextlib.suppress(Exception):
            # polls a count that may live in Redis: there is no event to wait on
            while time.monotonic() < deadline and not await self._idle():  # noqa: ASYNC110
                await asyncio.sleep(0.02)
        self._stopping = True
        held: list[OutboxItem] = []
        for worker in self._workers.values():
            worker.wake.set()
            if worker.task is not None:
                worker.task.cancel()
                done, _ = await asyncio.wait({worker.task}, timeout=2.0)
                if not done:
                    log.error("sink_worker_did_not_stop", sink=worker.sink.name)
                worker.task = None
            held.extend(h.item for q in worker.convs.values() for h in q)
            worker.convs.clear()
            worker.ids.clear()
            worker.busy.clear()
            worker.inflight = 0
            worker.partial = False
        with contextlib.suppress(Exception):
            await self.outbox.release(held, self.consumer)
        left = {}
        with contextlib.suppress(Exception):
            left = await self.outbox.depth()
        log.info("mirror_stopped", left_in_outbox=left)
        await self.outbox.close()
        for sink in self.sinks:
            await sink.aclose()

    def stats(self) -> dict[str, Any]:
        return {"accepted_waiting": len(self._accepted),
                "held": {n: w.held for n, w in self._workers.items()}}
