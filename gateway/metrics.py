"""Prometheus metrics, all defined here on an injected registry.

With ``--workers N`` the CLI sets ``PROMETHEUS_MULTIPROC_DIR`` and `/metrics` aggregates every
worker's values. Labels stay bounded: model (configured names), backend, status, team, sink —
never key ids, user ids or anything a client can make up freely (`tests/test_prometheus.py`
sends such input and checks every label value against this list).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from typing import Any, Literal

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                    1)


# How the workers' process figures add up in multi-worker mode (see `_share_process_figures`)
WORKER_FIGURES: dict[str, tuple[Literal["livesum", "livemin"], str]] = {
    "process_resident_memory_bytes": ("livesum", "Resident memory of the live workers, bytes"),
    "process_virtual_memory_bytes": ("livesum", "Virtual memory of the live workers, bytes"),
    "process_open_fds": ("livesum", "Open file descriptors of the live workers"),
    "process_max_fds": ("livesum", "File descriptor limits of the live workers, summed"),
    "process_start_time_seconds": ("livemin", "Start of the oldest live worker, Unix seconds"),
}


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None, *,
                 multiprocess: bool | None = None) -> None:
        """`multiprocess`: one of several workers writing to ``PROMETHEUS_MULTIPROC_DIR``
        (by default: when that variable is set)."""
        self.registry = registry or CollectorRegistry(auto_describe=True)
        if multiprocess is None:
            multiprocess = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
        self.multiprocess = multiprocess
        r = self.registry
        self.requests = Counter(
            "gateway_requests", "Chat completion requests by outcome",
            ["model", "backend", "status"], registry=r)
        self.latency = Histogram(
            "gateway_request_duration_seconds", "Time from request to last byte",
            ["model", "backend", "status"], buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram(
            "gateway_time_to_first_token_seconds", "Time from request to first content chunk",
            ["model", "backend"], buckets=LATENCY_BUCKETS, registry=r)
        self.overhead = Histogram(
            "gateway_overhead_seconds", "Latency the gateway itself added (upstream wait excluded)",
            ["model", "backend"], buckets=OVERHEAD_BUCKETS, registry=r)
        self.upstream_attempts = Counter(
            "gateway_upstream_attempts", "Upstream calls by model, deployment and outcome "
            "(success|retryable_error|error|budget_exhausted)",
            ["model", "deployment", "outcome"], registry=r)
        self.circuit_state = Gauge(
            "gateway_circuit_state", "Circuit breaker per deployment: 0 closed, 1 half-open, "
            "2 open", ["deployment"], registry=r, multiprocess_mode="max")
        self.upstream_errors = Counter(
            "gateway_upstream_errors", "Upstream failures by kind",
            ["backend", "code"], registry=r)
        self.rejected = Counter(
            "gateway_rejected_requests", "Requests refused before reaching a backend",
            ["code"], registry=r)
        self.tokens = Counter(
            "gateway_tokens", "Tokens by team, model and kind (prompt|completion)",
            ["team", "model", "backend", "kind"], registry=r)
        self.team_requests = Counter(
            "gateway_team_requests", "Finished exchanges by team",
            ["team", "model", "backend", "status", "cached"], registry=r)
        self.store_unavailable = Counter(
            "gateway_store_unavailable", "Store operations that failed and fell back",
            ["component"], registry=r)
        self.cache_events = Counter(
            "gateway_cache_events", "Response cache lookups by result (hit|miss|bypass|coalesced)",
            ["model", "result"], registry=r)
        self.cache_bytes = Gauge(
            "gateway_cache_bytes", "Bytes held by the in-process response cache", registry=r,
            multiprocess_mode="livesum")
        self.cache_stored = Counter(
            "gateway_cache_stored_bytes", "Bytes written to the response cache", registry=r)
        self.outbox_depth = Gauge(
            "gateway_outbox_depth", "Records waiting in the analytics outbox", ["sink"], registry=r,
            multiprocess_mode="max")
        self.outbox_events = Counter(
            "gateway_outbox_deliveries", "Analytics deliveries by result "
            "(delivered|retried|dead_lettered)", ["sink", "result"], registry=r)
        self.in_flight = Gauge(
            "gateway_in_flight_requests", "Chat completion requests in progress", registry=r,
            multiprocess_mode="livesum")

        self._children: dict[tuple[Any, tuple[str, ...]], Any] = {}
        self._samplers: list[Callable[[], None]] = []
        self.in_flight_now = 0  # kept by the chat endpoint; the gauge reads it when sampled
        self.sample_gauge(self.in_flight, lambda: self.in_flight_now)

        # memory, CPU, file descriptors (from /proc) and python_info
        self.exposed = r
        if multiprocess:
            self._share_process_figures()
            self.exposed = CollectorRegistry()
            MultiProcessCollector(self.exposed)  # type: ignore[no-untyped-call]
            PlatformCollector(registry=self.exposed)
        else:
            ProcessCollector(registry=r)
            PlatformCollector(registry=r)

    def _share_process_figures(self) -> None:
        """prometheus-client's multiprocess mode aggregates only the metric files the workers
        write, so the process collector, which reads /proc of the process answering the
        scrape, would show one worker picked at random. Each worker writes its own figures
        instead, when sampled, and `/metrics` shows the workers together: memory and file
        descriptors summed over the live workers, the CPU time of every worker that ran (it
        never drops when one is replaced), the oldest worker's start. The supervisor process
        is not counted."""
        source = ProcessCollector(registry=None)
        gauges = {name: Gauge(name, text, registry=self.registry, multiprocess_mode=mode)
                  for name, (mode, text) in WORKER_FIGURES.items()}
        cpu = Counter("process_cpu_seconds", "User and system CPU time of every worker, seconds",
                      registry=self.registry)
        reported = [0.0]

        def sample() -> None:
            for family in source.collect():
                value = family.samples[0].value
                if family.name in gauges:
                    gauges[family.name].set(value)
                elif family.name == "process_cpu_seconds" and value > reported[0]:
                    cpu.inc(value - reported[0])
                    reported[0] = value
        self._samplers.append(sample)

    def child(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, looked up once per label set: `labels` takes a lock and
        builds tuples, measurably slow on a path taken several times per request."""
        key = (metric, labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    # Figures a component already keeps (bytes in a cache, bytes written) are read when the
    # metrics are rendered instead of being reported on every change: each Prometheus update
    # takes a lock, a cost worth keeping off the request path.

    def sample_gauge(self, gauge: Gauge, read: Callable[[], float | None]) -> None:
        """Set `gauge` to `read()` whenever the metrics are sampled (None: leave it)."""
        def sample() -> None:
            value = read()
            if value is not None:
                gauge.set(value)
        self._samplers.append(sample)

    def sample_total(self, counter: Counter, read: Callable[[], float]) -> None:
        """Advance `counter` to the running total `read()` whenever the metrics are sampled."""
        reported = [0.0]

        def sample() -> None:
            total = read()
            if total > reported[0]:
                counter.inc(total - reported[0])
                reported[0] = total
        self._samplers.append(sample)

    def tally(self, counter: Counter) -> dict[tuple[str, ...], int]:
        """Running counts by label values for `counter`, kept as plain integers by the
        caller (``counts[labels] = counts.get(labels, 0) + 1``) and added to the counter
        whenever the metrics are sampled."""
        counts: dict[tuple[str, ...], int] = {}
        reported: dict[tuple[str, ...], int] = {}

        def sample() -> None:
            for labels, total in list(counts.items()):
                done = reported.get(labels, 0)
                if total > done:
                    self.child(counter, *labels).inc(total - done)
                    reported[labels] = total
        self._samplers.append(sample)
        return counts

    def sample(self) -> None:
        for sampler in self._samplers:
            sampler()

    async def sample_every(self, seconds: float) -> None:
        """With several workers each renders only what the others wrote: sample on a clock."""
        while True:
            await asyncio.sleep(seconds)
            self.sample()

    def render(self) -> tuple[bytes, str]:
        self.sample()
        return generate_latest(self.exposed), CONTENT_TYPE_LATEST

    def worker_stopped(self) -> None:
        """A worker that stops takes its live figures (memory, requests in flight) with it."""
        if self.multiprocess:
            mark_process_dead(os.getpid())  # type: ignore[no-untyped-call]
