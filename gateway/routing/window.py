"""Two running counts over the last few seconds, in one-second slots: cheap to add to on every
request, summed only when a decision needs them."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable


class Window:
    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.seconds = seconds
        self.clock = clock
        self._slots: deque[list[int]] = deque()  # [second, first count, second count]

    def add(self, first: int = 0, second: int = 0) -> None:
        now = int(self.clock())
        slots = self._slots
        if slots and slots[-1][0] == now:
            slot = slots[-1]
            slot[1] += first
            slot[2] += second
            return
        slots.append([now, first, second])
        while slots[0][0] <= now - self.seconds:
            slots.popleft()

    def totals(self) -> tuple[int, int]:
        """Both counts over the window."""
        now = int(self.clock())
        first = second = 0
        for when, a, b in self._slots:
            if when > now - self.seconds:
                first += a
                second += b
        return first, second

    def clear(self) -> None:
        self._slots.clear()
