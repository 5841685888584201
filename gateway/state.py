"""The gateway's resources, built once in the lifespan and handed to the endpoints as state."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from starlette.types import ASGIApp

from gateway.analytics.assembly import Analytics
from gateway.auth import KeyAuthority
from gateway.backends.base import Backend
from gateway.components import Components
from gateway.config import GatewayConfig
from gateway.health import HealthSource
from gateway.metrics import Metrics
from gateway.pipeline import Pipeline
from gateway.responses import ResponsesApi
from gateway.routing.table import ModelPlan
from gateway.serving import Drain


@dataclass(frozen=True)
class GatewayState:
    config: GatewayConfig
    metrics: Metrics
    plans: Mapping[str, ModelPlan]  # by public model name
    backends: Mapping[str, Backend]
    pipeline: Pipeline
    components: Components
    drain: Drain
    started: int  # unix time: the `created` of every model object
    health: HealthSource  # the deployments' circuits (the router, unless a test gives one)
    responses: ResponsesApi  # /v1/responses on the pipeline, with the stored responses
    admin: ASGIApp | None = None  # the admin API, when `server.admin_key` is set

    @property
    def authority(self) -> KeyAuthority:
        return self.components.authority

    @property
    def analytics(self) -> Analytics:
        return self.components.analytics
