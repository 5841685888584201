"""Serving the gateway in a process: uvicorn on a socket bound first, a deadline for request
headers, and a drain for rolling deploys.

On SIGTERM (or Ctrl-C) a served process drains:

    t0                      /readyz answers 503; requests are still accepted
    t0 + drain_delay        the listener closes (load balancers have noticed by now);
                            requests and streams in flight go on
    t0 + delay + grace      what is still running is cut: a whole answer gets a 503, a
                            stream an error event (never a stream that looks complete);
                            then the lifespan stops (the outbox flushes what it can)

A second signal stops at once. The socket is bound before the app starts, so the app's
ready line means the port is listening, and a port that cannot be bound leaves no ready line.
"""

from __future__ import annotations

import asyncio
import functools
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

import structlog
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.supervisors import Multiprocess

from gateway.errors import SHUTDOWN_CUT

log = structlog.get_logger("gateway.serving")

Handler = Callable[[int, FrameType | None], Any]


class ServeConfig(uvicorn.Config):
    """uvicorn's config, plus the seconds a connection may take to send complete headers."""

    def __init__(self, app: Any, *, header_timeout: float, **options: Any) -> None:
        super().__init__(app, **options)
        self.header_timeout = header_timeout


class GuardedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, closing a connection whose request headers are not
    complete within `header_timeout` of its opening or of the previous response: without
    it, sockets that never finish their headers stay open until the fd limit."""

    def __init__(self, config: uvicorn.Config, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)
        assert isinstance(config, ServeConfig)
        self.header_timeout = config.header_timeout
        self._header_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._await_headers()

    def on_headers_complete(self) -> None:
        self._headers_arrived()
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        pipelined = bool(self.pipeline)  # their headers are in already
        super().on_response_complete()
        if not pipelined:
            self._await_headers()

    def connection_lost(self, exc: Exception | None) -> None:
        self._headers_arrived()
        super().connection_lost(exc)

    def _await_headers(self) -> None:
        self._headers_arrived()
        self._header_deadline = self.loop.call_later(self.header_timeout, self._too_slow)

    def _headers_arrived(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _too_slow(self) -> None:
        self._header_deadline = None
        if not self.transport.is_closing():
            self.transport.close()


class Drain:
    """One process's shutdown (see the module docstring): `draining` for readiness, and the
    requests in flight that are cut when the grace runs out."""

    def __init__(self, delay: float, grace: float) -> None:
        self.delay = delay
        self.grace = grace
        self.draining = False
        self._running: set[asyncio.Task[Any]] = set()

    def watch_signals(self) -> None:
        """Take SIGTERM and SIGINT from uvicorn (from the main thread, in the lifespan); its
        own handler runs when the delay is over, or at once on a second signal."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous = signal.getsignal(sig)
            if callable(previous):
                signal.signal(sig, functools.partial(self._signalled, loop, previous))

    def _signalled(self, loop: asyncio.AbstractEventLoop, stop: Handler, sig: int,
                   frame: FrameType | None) -> None:
        if self.draining:
            stop(sig, frame)
            return
        self.draining = True
        loop.call_soon_threadsafe(self._begin, loop, stop, sig)

    def _begin(self, loop: asyncio.AbstractEventLoop, stop: Handler, sig: int) -> None:
        log.info("shutdown_draining", signal=signal.Signals(sig).name, drain_delay=self.delay,
                 shutdown_grace=self.grace, in_flight=len(self._running))
        loop.call_later(self.delay, stop, sig, None)
        loop.call_later(self.delay + self.grace, self.cut)

    @contextmanager
    def tracking(self, task: asyncio.Task[Any] | None = None) -> Iterator[None]:
        """Count `task` (the current one by default) as in flight while the block runs."""
        task = task or asyncio.current_task()
        assert task is not None
        self._running.add(task)
        try:
            yield
        finally:
            self._running.discard(task)

    def cut(self) -> None:
        """End what is still running: each task is cancelled with `SHUTDOWN_CUT` as its
        message, which the pipeline records and the endpoint answers as `ShuttingDown`."""
        if self._running:
            log.warning("shutdown_cut", requests=len(self._running))
        for task in list(self._running):
            task.cancel(SHUTDOWN_CUT)


def run(config: ServeConfig) -> None:
    """Bind the socket, then serve on it: one process, or `config.workers` under uvicorn's
    supervisor (which then needs the app as an import string)."""
    sock = config.bind_socket()
    if config.workers > 1:
        Multiprocess(config, sockets=[sock]).run()
    else:
        uvicorn.Server(config).run(sockets=[sock])
