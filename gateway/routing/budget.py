"""The retry budget: retries to a backend are at most a share of its requests over a recent
window, so that a full outage does not multiply the load on a struggling vendor."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

from gateway.config import RetryBudgetConfig


class RetryBudget:
    """Per backend, first attempts and retries counted in one-second slots."""

    def __init__(self, config: RetryBudgetConfig,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.ratio = config.ratio
        self.window = config.window
        self.min_retries = config.min_retries
        self.clock = clock
        # backend -> slots of [second, first attempts, retries], oldest first
        self._slots: dict[str, deque[list[int]]] = {}

    def _slot(self, backend: str) -> tuple[deque[list[int]], list[int]]:
        second = int(self.clock())
        slots = self._slots.setdefault(backend, deque())
        while slots and slots[0][0] <= second - self.window:
            slots.popleft()
        if not slots or slots[-1][0] != second:
            slots.append([second, 0, 0])
        return slots, slots[-1]

    def allows_retry(self, backend: str) -> bool:
        slots, _ = self._slot(backend)
        requests = sum(slot[1] for slot in slots)
        retries = sum(slot[2] for slot in slots)
        return retries + 1 <= self.min_retries + self.ratio * requests

    def count(self, backend: str, *, retry: bool) -> None:
        """An attempt on `backend`: a client request's first one, or a retry."""
        self._slot(backend)[1][2 if retry else 1] += 1
