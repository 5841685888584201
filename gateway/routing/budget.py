"""The retry budget: retries to a backend are at most a share of its requests over a recent
window, so that a full outage does not multiply the load on a struggling vendor."""

from __future__ import annotations

import time
from collections.abc import Callable

from gateway.config import RetryBudgetConfig
from gateway.routing.window import Window


class RetryBudget:
    """Per backend: first attempts and retries over the window."""

    def __init__(self, config: RetryBudgetConfig,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.ratio = config.ratio
        self.window = config.window
        self.min_retries = config.min_retries
        self.clock = clock
        self._counts: dict[str, Window] = {}

    def _of(self, backend: str) -> Window:
        counts = self._counts.get(backend)
        if counts is None:
            counts = self._counts[backend] = Window(self.window, self.clock)
        return counts

    def allows_retry(self, backend: str) -> bool:
        requests, retries = self._of(backend).totals()
        return retries + 1 <= self.min_retries + self.ratio * requests

    def count(self, backend: str, *, retry: bool) -> None:
        """An attempt on `backend`: a client request's first one, or a retry."""
        self._of(backend).add(*((0, 1) if retry else (1, 0)))
