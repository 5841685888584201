"""Assembly of the pipeline's collaborators from the config: stores, auth, limits, cache,
metering and analytics mirroring — on Redis when a URL is configured, in-process otherwise.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any

from gateway.config import GatewayConfig
from gateway.exchange import ExchangeObserver
from gateway.metrics import Metrics
from gateway.pipeline import Admitter, Authenticator, ResponseCache


@dataclass
class Components:
    authenticator: Authenticator
    admitter: Admitter | None
    cache: ResponseCache | None
    observers: list[ExchangeObserver]
    ping: Callable[[], Awaitable[Any]]
    message_ids: Callable[[str], dict[str, str]] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


async def _nothing() -> None:
    return None


async def build_components(
    config: GatewayConfig, stack: AsyncExitStack, metrics: Metrics
) -> Components:
    from gateway.analytics.assembly import build_analytics
    from gateway.auth import KeyAuthority
    from gateway.limiter import Limiter
    from gateway.response_cache import CacheHooks
    from gateway.response_cache import ResponseCache as Cache
    from gateway.stores.cache import make_cache_store
    from gateway.stores.keys import make_key_store
    from gateway.stores.limits import make_limit_store

    ns = None
    ping: Callable[[], Awaitable[Any]] = _nothing
    if config.redis_url:
        from gateway.stores.redis_base import connect

        ns = connect(config.redis_url, config.store_prefix)
        stack.push_async_callback(ns.aclose)
        ping = ns.client.ping

    key_store = make_key_store(config, ns)
    authority = KeyAuthority(config, key_store)
    if hasattr(authority, "start"):
        await authority.start()
    if hasattr(authority, "aclose"):
        stack.push_async_callback(authority.aclose)

    limits_down = metrics.store_unavailable.labels("limits").inc
    limit_store = make_limit_store(config, ns, on_error=lambda exc: limits_down())
    fallback = make_limit_store(config, None) if ns is not None else None
    limiter = Limiter(config, limit_store, fallback, on_unavailable=limits_down)

    cache_store = make_cache_store(config, ns)
    cache = Cache(config, cache_store,
                  CacheHooks(store_error=metrics.store_unavailable.labels("cache").inc))
    metrics.sample_gauge(metrics.cache_bytes, lambda: cache_store.stats().bytes)
    metrics.sample_total(metrics.cache_stored, lambda: cache.stored_bytes)

    analytics = await build_analytics(config, ns, metrics, stack)

    extra: dict[str, Any] = {"redis": ns, "key_store": key_store, "authority": authority,
                             "limit_store": limit_store, "analytics": analytics}
    return Components(
        authenticator=authority,
        admitter=limiter,
        cache=cache,
        observers=analytics.observers,
        ping=ping,
        message_ids=analytics.message_ids,
        extra=extra,
    )
