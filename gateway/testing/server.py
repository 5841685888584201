"""Run an ASGI app on a real uvicorn server on a free loopback port (tests, demo, bench): in
the caller's event loop, or in a thread of its own for synchronous tests."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
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


@contextmanager
def run_server_in_thread(app: Any, *, host: str = "127.0.0.1") -> Iterator[str]:
    """`run_server` for synchronous code: the server runs its own event loop in a thread."""
    sock = bound_socket(host)
    server = EmbeddedServer(uvicorn.Config(app, log_level="warning", lifespan="on",
                                           timeout_graceful_shutdown=1))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        while not server.started and thread.is_alive():
            time.sleep(0.005)
        if not server.started:
            raise RuntimeError("server stopped before it started")
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
