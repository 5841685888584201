"""Run an ASGI app on a real uvicorn server on a free loopback port (tests, demo, bench)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import uvicorn


class EmbeddedServer(uvicorn.Server):
    """A uvicorn server that leaves signal handling to its host (it may run beside another)."""

    @contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def bound_socket(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


@asynccontextmanager
async def run_server(app: Any, *, host: str = "127.0.0.1", port: int = 0,
                     **options: Any) -> AsyncIterator[str]:
    """Serve `app` in this event loop; yields its base URL (``http://127.0.0.1:PORT``)."""
    sock = bound_socket(host, port)
    options.setdefault("timeout_graceful_shutdown", 1)
    config = uvicorn.Config(app, log_level="warning", lifespan="on", **options)
    server = EmbeddedServer(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:
            if task.done():
                task.result()
                raise RuntimeError("server stopped before it started")
            await asyncio.sleep(0.005)
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        try:
            await asyncio.wait_for(task, 10)
        finally:
            sock.close()
