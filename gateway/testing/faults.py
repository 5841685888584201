"""Injected failures for the fake upstreams: the next N requests, or every request for a while,
get an HTTP error (or hang) instead of their normal answer."""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass
class Faults:
    """What the next requests get instead of a normal answer."""

    status: int = 500
    next_n: int = 0
    until: float = 0.0  # monotonic deadline of a failure window
    hang: float = 0.0  # > 0: sleep this long instead of answering with `status`
    paths: tuple[str, ...] = ()  # empty: every path
    retry_after: str | None = None  # a 429's retry-after, when the fake gives one

    def fail_next(self, n: int, status: int = 500, *, hang: float = 0.0,
                  retry_after: str | None = None) -> None:
        self.next_n, self.status, self.hang, self.retry_after = n, status, hang, retry_after

    def fail_for(self, seconds: float, status: int = 500, *, hang: float = 0.0) -> None:
        self.until, self.status, self.hang = time.monotonic() + seconds, status, hang

    def clear(self) -> None:
        self.next_n, self.until, self.hang = 0, 0.0, 0.0

    def take(self, path: str) -> bool:
        if self.paths and path not in self.paths:
            return False
        if self.next_n > 0:
            self.next_n -= 1
            return True
        return time.monotonic() < self.until
