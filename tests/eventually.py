"""Waiting for what another process does (a real redis-server, a real uvicorn server): poll an
observable condition until a deadline. Within the test's own process, wait on an event."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar, cast

T = TypeVar("T")


async def eventually(probe: Callable[[], T | Awaitable[T]], within: float = 10.0) -> T:
    """The first truthy result of `probe` (a function or a coroutine function), polled every
    10 ms; fails the test after `within` seconds."""
    deadline = time.monotonic() + within
    while True:
        found = probe()
        result = cast(T, await found if inspect.isawaitable(found) else found)
        if result:
            return result
        assert time.monotonic() < deadline, f"timed out after {within} s"
        await asyncio.sleep(0.01)
