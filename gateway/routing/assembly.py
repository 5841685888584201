"""The router, its circuit breakers and retry budget, built from the config for the lifespan;
their figures reach Prometheus when it scrapes."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from contextlib import AsyncExitStack

from gateway.config import GatewayConfig
from gateway.metrics import Metrics
from gateway.routing.budget import RetryBudget
from gateway.routing.circuits import Circuits
from gateway.routing.router import Router
from gateway.routing.table import Deployment, ModelPlan
from gateway.routing.traffic import Traffic
from gateway.stores.circuits import CircuitStore


async def build_router(config: GatewayConfig, plans: Mapping[str, ModelPlan],
                       store: CircuitStore, metrics: Metrics,
                       stack: AsyncExitStack) -> Router:
    routing = config.routing
    traffic = Traffic(config.backends, max(routing.circuit.window, routing.retry_budget.window))
    circuits = Circuits(routing.circuit, store, config.backends, traffic)
    await circuits.start()
    stack.push_async_callback(circuits.aclose)
    attempts = metrics.tally(metrics.upstream_attempts)  # by model, deployment, outcome

    def on_attempt(deployment: Deployment, outcome: str) -> None:
        key = (deployment.route.model, deployment.name, outcome)
        attempts[key] = attempts.get(key, 0) + 1

    for name in config.backends:
        metrics.sample_gauge(metrics.child(metrics.circuit_state, name),
                             functools.partial(circuits.state, name))
    return Router(plans, routing, circuits, RetryBudget(routing.retry_budget, traffic),
                  traffic, on_attempt=on_attempt)
