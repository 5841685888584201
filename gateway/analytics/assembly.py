"""Assembly of usage metering and analytics mirroring, for the lifespan.

`build_analytics` starts the `Meter` on the usage and series stores and, when sinks are
configured, the `Mirror` that delivers through the outbox; their ``stop`` goes on the exit
stack, so shutdown flushes usage and leaves undelivered records in the outbox.
"""

from __future__ import annotations

from contextlib import AsyncExitStack
from dataclasses import dataclass

from gateway.analytics.metering import Meter, MeterCounters
from gateway.analytics.mirror import Mirror
from gateway.analytics.sinks import InkeepAnalyticsSink, make_sinks
from gateway.config import GatewayConfig
from gateway.exchange import ExchangeObserver
from gateway.metrics import Metrics
from gateway.stores.outbox import OutboxStore
from gateway.stores.series import SeriesStore
from gateway.stores.usage import UsageStore
from gateway.tracing import NO_TRACING, Tracing


@dataclass(frozen=True)
class Analytics:
    meter: Meter
    usage_store: UsageStore
    series_store: SeriesStore
    mirror: Mirror | None = None
    outbox: OutboxStore | None = None
    inkeep: InkeepAnalyticsSink | None = None  # the first inkeep sink, for /v1/feedback

    @property
    def observers(self) -> list[ExchangeObserver]:
        return [self.meter] if self.mirror is None else [self.meter, self.mirror]

    def reply_headers(self, request_id: str) -> dict[str, str]:
        """Headers for a successful answer: the Inkeep sink's message id, for feedback."""
        return self.inkeep.reply_headers(request_id) if self.inkeep is not None else {}


async def build_analytics(config: GatewayConfig, usage_store: UsageStore,
                          series_store: SeriesStore, outbox: OutboxStore | None,
                          metrics: Metrics, stack: AsyncExitStack,
                          tracing: Tracing = NO_TRACING) -> Analytics:
    """`outbox`: where records wait for the sinks (None when no sink is configured);
    `tracing`: for the spans of the deliveries."""
    meter = Meter(usage_store, MeterCounters(metrics.tally(metrics.tokens),
                                            metrics.tally(metrics.team_requests)),
                  series=series_store)
    meter.start()
    stack.push_async_callback(meter.stop)
    if outbox is None:
        return Analytics(meter, usage_store, series_store)
    sinks = make_sinks(config.analytics.sinks)
    mirror = Mirror(config, outbox, sinks, metrics, tracing=tracing)
    await mirror.start()
    stack.push_async_callback(mirror.stop)
    inkeep = next((s for s in sinks if isinstance(s, InkeepAnalyticsSink)), None)
    return Analytics(meter, usage_store, series_store, mirror, outbox, inkeep)
