"""The gateway's resources, built once in the lifespan and handed to the endpoints as state."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from gateway.backends.base import Backend, Route
from gateway.config import GatewayConfig
from gateway.metrics import Metrics
from gateway.pipeline import Authenticator, Pipeline


@dataclass
class GatewayState:
    config: GatewayConfig
    metrics: Metrics
    routes: Mapping[str, Route]
    backends: Mapping[str, Backend]
    authenticator: Authenticator
    pipeline: Pipeline
    ping_store: Callable[[], Awaitable[Any]]
    started: int
    components: dict[str, Any] = field(default_factory=dict)
