"""What each deployment was sent over the last few seconds and how much of it failed, in
one-second slots. The retry budget and the circuit breakers read the same counts, so an
attempt that succeeds costs the request path one addition."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

FIRST, RETRIES, FAILURES = 1, 2, 3  # a slot: [second, first attempts, retries, failures]


@dataclass(frozen=True, slots=True)
class Counts:
    first: int  # client requests' first attempts
    retries: int
    failures: int

    @property
    def attempts(self) -> int:
        return self.first + self.retries


class Traffic:
    def __init__(self, names: Iterable[str], seconds: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.seconds = seconds  # the longest span anyone reads
        self.clock = clock
        self._slots: dict[str, deque[list[int]]] = {name: deque() for name in names}

    def attempt(self, name: str, *, retry: bool) -> None:
        """An attempt begins on `name`: a client request's first one, or a retry."""
        self._add(name, RETRIES if retry else FIRST)

    def failed(self, name: str) -> None:
        """An attempt on `name` failed in a way that is the deployment's fault."""
        self._add(name, FAILURES)

    def _add(self, name: str, which: int) -> None:
        now = int(self.clock())
        slots = self._slots[name]
        if not slots or slots[-1][0] != now:
            slots.append([now, 0, 0, 0])
            while slots[0][0] <= now - self.seconds:
                slots.popleft()
        slots[-1][which] += 1

    def counts(self, name: str, seconds: float, since: float = float("-inf")) -> Counts:
        """The counts of the last `seconds`, leaving out the second of `since` (a clock
        reading) and those before it."""
        floor = max(int(self.clock()) - seconds, since)
        first = retries = failures = 0
        for second, a, r, f in self._slots[name]:
            if second > floor:
                first += a
                retries += r
                failures += f
        return Counts(first, retries, failures)
