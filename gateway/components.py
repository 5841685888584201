"""Assembly: the stores and the pipeline's collaborators, built from the config.

Everything lives on Redis when the config names one (``store: redis://...``), in process
otherwise. The stores themselves never read the config: the ``make_*`` factories here turn
its settings into constructor arguments, for the gateway's lifespan and the CLI alike.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path

from gateway.analytics.assembly import Analytics, build_analytics
from gateway.auth import KeyAuthority
from gateway.config import GatewayConfig
from gateway.errors import ServiceUnavailable
from gateway.limiter import Limiter
from gateway.metrics import Metrics
from gateway.response_cache import CacheHooks, ResponseCache
from gateway.stores.cache import CacheStore, MemoryCacheStore, RedisCacheStore
from gateway.stores.circuits import CircuitStore, MemoryCircuitStore, RedisCircuitStore
from gateway.stores.fallback_outbox import FORWARD, FallbackOutbox
from gateway.stores.keys import KeyStore, MemoryKeyStore, RedisKeyStore
from gateway.stores.limits import LimitStore, MemoryLimitStore, RedisLimitStore
from gateway.stores.outbox import OutboxStore, RedisOutbox
from gateway.stores.redis_base import RedisNamespace, connect
from gateway.stores.responses import MemoryResponseStore, RedisResponseStore, ResponseStore
from gateway.stores.series import MemorySeriesStore, RedisSeriesStore, SeriesStore
from gateway.stores.spool import SpoolOutbox
from gateway.stores.usage import MemoryUsageStore, RedisUsageStore, UsageStore
from gateway.tracing import NO_TRACING, Tracing, otlp_endpoint


def connect_store(config: GatewayConfig) -> RedisNamespace | None:
    """The Redis connection every store shares, or None for the in-process stores."""
    if not config.redis_url:
        return None
    return connect(config.redis_url, config.store_prefix)


def make_key_store(config: GatewayConfig, ns: RedisNamespace | None) -> KeyStore:
    """Redis, else the key file ``keys.file`` next to the config."""
    if ns is not None:
        return RedisKeyStore(ns)
    return MemoryKeyStore(config.resolve(config.keys.file))


def make_limit_store(config: GatewayConfig, ns: RedisNamespace | None,
                     on_error: Callable[[ServiceUnavailable], None] | None = None) -> LimitStore:
    """Redis, else in process (which never fails: `on_error` is for Redis only)."""
    return RedisLimitStore(ns, on_error) if ns is not None else MemoryLimitStore()


def make_cache_store(config: GatewayConfig, ns: RedisNamespace | None) -> CacheStore:
    if ns is not None:
        return RedisCacheStore(ns, config.cache.max_entry_bytes)
    return MemoryCacheStore(config.cache.memory_max_bytes, config.cache.max_entry_bytes)


def make_response_store(config: GatewayConfig, ns: RedisNamespace | None) -> ResponseStore:
    """Redis (any replica continues a conversation), else in process."""
    settings = config.responses
    if ns is not None:
        return RedisResponseStore(ns, settings.ttl_seconds)
    return MemoryResponseStore(settings.ttl_seconds, settings.memory_max_entries)


def usage_file(config: GatewayConfig) -> Path:
    """Where the in-process usage store appends: ``usage.jsonl`` beside the spool dir."""
    return config.resolve(config.analytics.outbox.spool_dir).parent / "usage.jsonl"


def make_usage_store(config: GatewayConfig, ns: RedisNamespace | None) -> UsageStore:
    if ns is not None:
        return RedisUsageStore(ns)
    return MemoryUsageStore(usage_file(config))


def make_series_store(config: GatewayConfig, ns: RedisNamespace | None) -> SeriesStore:
    """Redis (every replica draws the same charts), else in process."""
    days = config.analytics.series_days
    return RedisSeriesStore(ns, days) if ns is not None else MemorySeriesStore(days)


def make_outbox(config: GatewayConfig, ns: RedisNamespace | None, *,
                fallback: bool = True) -> OutboxStore:
    """Redis streams (with a local spool for when Redis is away, unless `fallback` is off:
    the CLI looks at Redis only), else the spool under ``analytics.outbox.spool_dir``."""
    sinks = [s.name for s in config.analytics.sinks]
    box = config.analytics.outbox
    spool_dir = config.resolve(box.spool_dir)
    if ns is None:
        return SpoolOutbox(spool_dir, sinks, max_resident=box.max_queue)
    redis = RedisOutbox(ns, sinks, claim_idle_seconds=box.claim_idle_seconds)
    if not fallback:
        return redis
    spool = SpoolOutbox(spool_dir / "redis-fallback", [FORWARD], max_resident=box.max_queue)
    return FallbackOutbox(redis, spool, remember=box.max_queue)


def make_tracing(config: GatewayConfig, environ: Mapping[str, str]) -> Tracing:
    """OpenTelemetry spans exported to the configured OTLP endpoint (or the standard
    variables'), else nothing: chosen here once, so that the hot path never asks."""
    endpoint = otlp_endpoint(config.observability.otlp_endpoint, environ)
    if endpoint is None:
        return NO_TRACING
    from gateway.otel import OtelTracing  # the SDK and the exporter load only when used

    systems = {name: backend.kind for name, backend in config.backends.items()}
    return OtelTracing(endpoint, systems,
                       capture_content=config.observability.capture_content)


@dataclass(frozen=True)
class Components:
    """What the lifespan hands on: the pipeline's collaborators and what the admin API and
    the operational endpoints read."""

    redis: RedisNamespace | None
    key_store: KeyStore
    authority: KeyAuthority
    limiter: Limiter
    cache: ResponseCache
    analytics: Analytics
    circuit_store: CircuitStore
    response_store: ResponseStore
    ping: Callable[[], Awaitable[object]]


async def _nothing() -> None:
    return None


async def build_components(config: GatewayConfig, stack: AsyncExitStack,
                           metrics: Metrics, tracing: Tracing = NO_TRACING) -> Components:
    """Build and start every collaborator; `stack` stops and closes them in reverse."""
    ns = connect_store(config)
    ping: Callable[[], Awaitable[object]] = _nothing
    if ns is not None:
        stack.push_async_callback(ns.aclose)
        ping = ns.client.ping

    key_store = make_key_store(config, ns)
    authority = KeyAuthority(config, key_store)
    await authority.start()
    stack.push_async_callback(authority.aclose)

    limits_down = metrics.store_unavailable.labels("limits").inc
    limit_store = make_limit_store(config, ns, on_error=lambda exc: limits_down())
    limiter = Limiter(config, limit_store, MemoryLimitStore(), on_unavailable=limits_down)
    await limiter.start()
    stack.push_async_callback(limiter.aclose)

    cache_store = make_cache_store(config, ns)
    cache = ResponseCache(config, cache_store,
                          CacheHooks(store_error=metrics.store_unavailable.labels("cache").inc))
    metrics.sample_gauge(metrics.cache_bytes, lambda: cache_store.stats().bytes)
    metrics.sample_total(metrics.cache_stored, lambda: cache.stored_bytes)

    analytics = await build_analytics(config, make_usage_store(config, ns),
                                      make_series_store(config, ns),
                                      make_outbox(config, ns) if config.analytics.sinks
                                      else None, metrics, stack, tracing)
    circuits = RedisCircuitStore(ns, list(config.backends)) if ns is not None \
        else MemoryCircuitStore()
    return Components(ns, key_store, authority, limiter, cache, analytics, circuits,
                      make_response_store(config, ns), ping)
