"""The routing table: each public model's deployments (a backend, its upstream model, a
weight), its fallback models and its retries, built once from the config."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from gateway.backends.base import Backend, Route
from gateway.config import GatewayConfig


@dataclass(frozen=True, slots=True)
class Deployment:
    """A backend serving a model. `name` is the backend's: it labels metrics and keys the
    circuit breaker, which protects the backend whichever model reaches it."""

    name: str
    route: Route
    backend: Backend
    weight: float
    # the variable its credentials come from, when they are missing (fixed at start-up)
    missing: str | None = None


@dataclass(frozen=True, slots=True)
class ModelPlan:
    model: str
    deployments: tuple[Deployment, ...]
    fallbacks: tuple[str, ...]
    retries: int
    # the variable to set when no deployment has its credentials (fixed at start-up), else None
    credentials_missing: str | None = None

    @property
    def route(self) -> Route:
        """The model's first deployment's route: what its cache keys are made of, so that
        answers of any of its deployments share entries."""
        return self.deployments[0].route


def build_table(config: GatewayConfig, backends: Mapping[str, Backend]) -> dict[str, ModelPlan]:
    table = {}
    for name, model in config.models.items():
        options = dict(model.nuclia)
        deployments = tuple(
            Deployment(d.backend, Route(name, d.backend, d.upstream_model or name, options),
                       backends[d.backend], d.weight, backends[d.backend].credentials_missing())
            for d in model.deployment_list(name))
        missing = None if any(d.missing is None for d in deployments) else deployments[0].missing
        table[name] = ModelPlan(name, deployments, tuple(model.fallbacks), model.retries,
                                missing)
    return table
