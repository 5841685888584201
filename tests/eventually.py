"""Waiting for what another process does (a real redis-server, a real uvicorn server): poll an
observable condition until a deadline. Within the test's own process, wait on an event."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, overload

T = TypeVar("T")


@overload
async def eventually(probe: Callable[[], Awaitable[T]], within: float = ...) -> T: ...


@overload
async def eventually(probe: Callable[[], T], within: float = ...) -> T: ...


async def eventually(probe: Callable[[], Any], within: float = 10.0) -> Any:
    """The first truthy result of `probe` (a function or a coroutine function), polled every
    10 ms; fails the test after `within` seconds."""
    deadline = time.monotonic() + within
    while True:
        result = probe()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        assert time.monotonic() < deadline, f"timed out after {within} s"
        await asyncio.sleep(0.01)
