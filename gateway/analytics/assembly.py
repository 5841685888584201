"""Assembly of usage metering and analytics mirroring from the config, for the lifespan.

`build_analytics` creates the usage store, the `Meter`, and (when sinks are configured) the
outbox, the sinks and the `Mirror`; it starts them and registers their ``stop`` on the exit
stack, so shutdown flushes usage and leaves undelivered records in the outbox.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass

from gateway.config import GatewayConfig
from gateway.exchange import ExchangeObserver
from gateway.analytics.metering import Meter, MeterCounters
from gateway.metrics import Metrics
from gateway.analytics.mirror import Mirror
from gateway.analytics.sinks import InkeepAnalyticsSink, make_sinks, message_ids
from gateway.stores.outbox import Outbox, make_outbox
from gateway.stores.redis_base import RedisNamespace
from gateway.stores.usage import UsageStore, make_usage_store


@dataclass(frozen=True)
class Analytics:
    meter: Meter
    usage_store: UsageStore
    mirror: Mirror | None = None
    outbox: Outbox | None = None
    inkeep: InkeepAnalyticsSink | None = None  # the first inkeep sink, for /v1/feedback

    @property
    def observers(self) -> list[ExchangeObserver]:
        return [self.meter] if self.mirror is None else [self.meter, self.mirror]

    @property
    def message_ids(self) -> Callable[[str], dict[str, str]] | None:
        """`sinks.message_ids` when an Inkeep sink is configured (for the response header)."""
        return message_ids if self.inkeep is not None else None


async def build_analytics(config: GatewayConfig, ns: RedisNamespace | None, metrics: Metrics,
                          stack: AsyncExitStack) -> Analytics:
    store = make_usage_store(config, ns)
    meter = Meter(store, MeterCounters(metrics.tally(metrics.tokens),
                                      metrics.tally(metrics.team_requests)))
    meter.start()
    stack.push_async_callback(meter.stop)
    if not config.analytics.sinks:
        return Analytics(meter, store)
    outbox = make_outbox(config, ns)
    sinks = make_sinks(config.analytics.sinks)
    mirror = Mirror(config, outbox, sinks, metrics)
    await mirror.start()
    stack.push_async_callback(mirror.stop)
    inkeep = next((s for s in sinks if isinstance(s, InkeepAnalyticsSink)), None)
    return Analytics(meter, store, mirror, outbox, inkeep)
