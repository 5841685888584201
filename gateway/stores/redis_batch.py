"""Auto-pipelining: Redis commands issued by concurrent requests during one turn of the event
loop leave together, as one pipeline (one round trip, one pooled connection).

A request that calls `Batcher.call` waits for its own reply as before; under load the calls
of every request that became ready in the same loop iteration share the round trip, which
costs the gateway a fraction of the CPU of one command at a time. Nothing waits for a batch
to fill: the pipeline goes out as soon as the loop has run the callbacks that were ready
when the first call was queued.

Scripts go as ``EVALSHA``; a ``NOSCRIPT`` reply (Redis restarted or flushed its scripts)
loads them and sends those calls once more. A reply that arrives for a caller that was
cancelled meanwhile is handed to the call's `abandoned` callback (e.g. to give back what a
limit check reserved), so cancellation never leaks state.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError, RedisError

MAX_BATCH = 256  # commands per pipeline; more calls in one turn go out as several pipelines


@dataclass(slots=True)
class _Call:
    args: tuple[Any, ...]
    script: AsyncScript | None
    future: asyncio.Future[Any] | None  # None: nobody waits (errors go to `failed`)
    abandoned: Callable[[Any], None] | None = None
    failed: Callable[[BaseException], None] | None = None

    def deliver(self, result: Any) -> None:
        future = self.future
        if isinstance(result, BaseException):
            if future is None:
                if self.failed is not None:
                    self.failed(result)
            elif not future.done():
                future.set_exception(result)
        elif future is None:
            return
        elif future.done():  # the caller was cancelled: its call took effect all the same
            if self.abandoned is not None:
                self.abandoned(result)
        else:
            future.set_result(result)


class Batcher:
    def __init__(self, client: aioredis.Redis) -> None:
        self.client = client
        self._calls: list[_Call] = []
        self._running: set[asyncio.Task[None]] = set()

    def call(self, *args: Any, script: AsyncScript | None = None,
             abandoned: Callable[[Any], None] | None = None) -> asyncio.Future[Any]:
        """Queue one command; the future resolves to its reply (or its error)."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue(_Call(args, script, future, abandoned))
        return future

    def cast(self, *args: Any, script: AsyncScript | None = None,
             failed: Callable[[BaseException], None] | None = None) -> None:
        """Queue one command nobody waits for; an error goes to `failed`."""
        self._queue(_Call(args, script, None, failed=failed))

    def run_script(self, script: AsyncScript, keys: Sequence[Any], args: Sequence[Any],
                   abandoned: Callable[[Any], None] | None = None) -> asyncio.Future[Any]:
        return self.call("EVALSHA", script.sha, len(keys), *keys, *args, script=script,
                         abandoned=abandoned)

    def cast_script(self, script: AsyncScript, keys: Sequence[Any], args: Sequence[Any],
                    failed: Callable[[BaseException], None] | None = None) -> None:
        self.cast("EVALSHA", script.sha, len(keys), *keys, *args, script=script, failed=failed)

    def _queue(self, call: _Call) -> None:
        self._calls.append(call)
        if len(self._calls) == 1:
            # the task's first step runs after every callback already ready in this turn
            task = asyncio.ensure_future(self._flush())
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _flush(self) -> None:
        calls, self._calls = self._calls, []
        for start in range(0, len(calls), MAX_BATCH):
            await self._send(calls[start:start + MAX_BATCH])

    async def _send(self, calls: list[_Call]) -> None:
        try:
            results = await self._execute(calls)
            missing = [i for i, r in enumerate(results) if isinstance(r, NoScriptError)]
            if missing:
                for script in {id(calls[i].script): calls[i].script for i in missing}.values():
                    if script is not None:
                        await self.client.script_load(script.script)
                again = await self._execute([calls[i] for i in missing])
                for i, result in zip(missing, again, strict=True):
                    results[i] = result
        except (RedisError, OSError) as exc:
            results = [exc] * len(calls)
        except BaseException as exc:  # cancelled at shutdown: nobody is left hanging
            for call in calls:
                call.deliver(RedisError(f"the Redis batch did not complete ({exc!r})"))
            raise
        for call, result in zip(calls, results, strict=True):
            call.deliver(result)

    async def _execute(self, calls: list[_Call]) -> list[Any]:
        pipe = self.client.pipeline(transaction=False)
        for call in calls:
            pipe.execute_command(*call.args)
        results: list[Any] = await pipe.execute(raise_on_error=False)
        return results

    async def drain(self) -> None:
        """Wait for the batches in flight (at shutdown, before the client closes)."""
        while self._running:
            await asyncio.gather(*self._running, return_exceptions=True)
