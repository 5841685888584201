"""The retry budget: retries to a backend are at most a share of its requests over a recent
window, so that a full outage does not multiply the load on a struggling vendor."""

from __future__ import annotations

from gateway.config import RetryBudgetConfig
from gateway.routing.traffic import Traffic


class RetryBudget:
    """Per backend: its retries against its client requests (first attempts) over the
    window, from the `Traffic` the router records."""

    def __init__(self, config: RetryBudgetConfig, traffic: Traffic) -> None:
        self.ratio = config.ratio
        self.window = config.window
        self.min_retries = config.min_retries
        self.traffic = traffic

    def allows_retry(self, backend: str) -> bool:
        counts = self.traffic.counts(backend, self.window)
        return counts.retries + 1 <= self.min_retries + self.ratio * counts.first
