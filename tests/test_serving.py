"""A real `gateway serve` process under faults of its clients and of its own life: sockets
that never finish their headers, a flood beyond its request cap, SIGTERM during streams, and
a port it cannot bind."""

from __future__ import annotations

import asyncio
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest

from gateway.testing.configs import config_yaml, static_key
from gateway.testing.fake_analytics import AnalyticsState, create_fake_analytics_app
from gateway.testing.fake_inkeep import create_fake_inkeep_app
from gateway.testing.process import GatewayProcess, gateway_env, run_gateway, spawn
from gateway.testing.server import run_server
from tests.eventually import eventually

pytestmark = pytest.mark.slow

KEY = "sk-serving-test"
AUTH = {"authorization": f"Bearer {KEY}"}


@pytest.fixture
async def upstream() -> AsyncIterator[str]:
    async with run_server(create_fake_inkeep_app()) as url:
        yield url


@pytest.fixture
async def analytics() -> AsyncIterator[tuple[str, AnalyticsState]]:
    app = create_fake_analytics_app()
    async with run_server(app) as url:
        yield url, app.state.analytics


def write_config(tmp_path: Path, upstream: str, server: dict[str, Any],
                 sinks: list[dict[str, Any]] | None = None) -> Path:
    path = tmp_path / "gateway.yaml"
    path.write_text(config_yaml(
        backends={"inkeep": {"kind": "inkeep", "base_url": f"{upstream}/v1",
                             "requires_key": False}},
        models={"qa": {"backend": "inkeep"}},
        keys=[static_key(KEY, id="t", team="alpha")],
        sinks=sinks or [],
        extra={"server": server,
               "analytics": {"outbox": {"spool_dir": str(tmp_path / "outbox")}}}))
    return path


def chat(text: str, *, stream: bool = True) -> dict[str, Any]:
    return {"model": "qa", "stream": stream, "messages": [{"role": "user", "content": text}]}


async def first_chunk_then_rest(client: httpx.AsyncClient, url: str, text: str,
                                started: asyncio.Event) -> str:
    """A streamed answer's whole body; `started` is set once its first chunk arrived."""
    body = b""
    async with client.stream("POST", f"{url}/v1/chat/completions", json=chat(text),
                             headers=AUTH) as reply:
        assert reply.status_code == 200
        async for piece in reply.aiter_bytes():
            body += piece
            started.set()
    return body.decode()


# -- slow clients ----------------------------------------------------------------------------


@pytest.fixture
def quick_deadline(tmp_path: Path, upstream: str) -> Iterator[GatewayProcess]:
    config = write_config(tmp_path, upstream, {"header_timeout": 0.5})
    with run_gateway(config) as gateway:
        yield gateway


def test_sockets_that_never_finish_their_headers_are_closed(
        quick_deadline: GatewayProcess) -> None:
    port = int(quick_deadline.url.rsplit(":", 1)[1])
    sockets = [socket.create_connection(("127.0.0.1", port)) for _ in range(50)]
    for i, sock in enumerate(sockets):
        if i % 2:  # half send part of a request, half nothing at all
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        sock.settimeout(5.0)
    started = time.monotonic()
    for sock in sockets:
        assert sock.recv(100) == b""  # closed by the gateway (a timeout would raise)
        sock.close()
    assert time.monotonic() - started < 3.0
    assert httpx.get(f"{quick_deadline.url}/healthz").status_code == 200


def test_a_slow_request_inside_the_deadline_is_served(quick_deadline: GatewayProcess) -> None:
    """The deadline covers the headers only, and each request of a kept-alive connection
    gets its own."""
    with httpx.Client(base_url=quick_deadline.url) as client:
        for _ in range(2):
            assert client.get("/healthz").status_code == 200
    port = int(quick_deadline.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\n")
        sock.sendall(b"Host: x\r\n\r\n")
        assert sock.recv(100).startswith(b"HTTP/1.1 200")


# -- a flood ---------------------------------------------------------------------------------


async def test_requests_beyond_the_cap_get_a_503_while_probes_answer(
        tmp_path: Path, upstream: str) -> None:
    config = write_config(tmp_path, upstream, {"max_concurrent_requests": 2})
    with run_gateway(config) as gateway:
        async with httpx.AsyncClient(timeout=30) as client:
            started = [asyncio.Event(), asyncio.Event()]
            streams = [asyncio.create_task(first_chunk_then_rest(
                client, gateway.url, "long [slow] [chunks=8]", event)) for event in started]
            await asyncio.gather(*(event.wait() for event in started))
            refused = await client.post(f"{gateway.url}/v1/chat/completions",
                                        json=chat("one too many", stream=False), headers=AUTH)
            assert refused.status_code == 503
            assert refused.headers["retry-after"] == "1"
            assert refused.json()["error"]["code"] == "server_overloaded"
            for probe in ("/healthz", "/readyz", "/metrics"):
                assert (await client.get(gateway.url + probe)).status_code == 200
            for body in await asyncio.gather(*streams):
                assert body.endswith("data: [DONE]\n\n")

            # A stream's slot frees when its exchange is settled, a moment after the client
            # read the last byte; the next request is then served.
            async def room_again() -> bool:
                served = await client.post(f"{gateway.url}/v1/chat/completions",
                                           json=chat("room again", stream=False), headers=AUTH)
                assert served.status_code in (200, 503)
                return served.status_code == 200
            await eventually(room_again, within=5)


# -- drain -----------------------------------------------------------------------------------


async def test_sigterm_drains_then_cuts_what_outlives_the_grace(
        tmp_path: Path, upstream: str, analytics: tuple[str, AnalyticsState]) -> None:
    hook_url, hook = analytics
    config = write_config(tmp_path, upstream, {"drain_delay": 1.5, "shutdown_grace": 2.0},
                          sinks=[{"name": "hook", "kind": "webhook", "url": hook_url + "/hook"}])
    with run_gateway(config) as gateway:
        sdk = openai.AsyncOpenAI(base_url=f"{gateway.url}/v1", api_key=KEY, max_retries=0)
        async with httpx.AsyncClient(timeout=30) as client:
            short_started, long_started = asyncio.Event(), asyncio.Event()
            short = asyncio.create_task(first_chunk_then_rest(
                client, gateway.url, "short [slow] [chunks=12]", short_started))

            async def long_answer() -> str:
                parts = []
                stream = await sdk.chat.completions.create(**chat("long [slow] [chunks=60]"))
                async for chunk in stream:
                    long_started.set()
                    parts.append(chunk.choices[0].delta.content or "" if chunk.choices else "")
                return "".join(parts)

            long = asyncio.create_task(long_answer())
            await asyncio.gather(short_started.wait(), long_started.wait())
            signalled = time.monotonic()
            gateway.send_signal(signal.SIGTERM)

            async def not_ready() -> bool:
                return (await client.get(f"{gateway.url}/readyz")).status_code == 503

            await eventually(not_ready, within=1.0)
            # still accepting during the delay: a load balancer may not have noticed yet
            late = await client.post(f"{gateway.url}/v1/chat/completions",
                                     json=chat("late", stream=False), headers=AUTH)
            assert late.status_code == 200

            async def refused() -> bool:
                try:
                    await client.get(f"{gateway.url}/healthz")
                except httpx.ConnectError:
                    return True
                return False

            await eventually(refused, within=3.0)
            assert time.monotonic() - signalled >= 1.4  # not before the drain delay
            assert (await short).endswith("data: [DONE]\n\n")  # finished within the grace
            with pytest.raises(openai.APIError, match="shutting down"):
                await long
        await asyncio.to_thread(gateway.proc.wait, 15)
        assert gateway.proc.returncode is not None
        log = gateway.log()
    events = [orjson.loads(line) for line in log.splitlines() if line.startswith("{")]
    names = [e.get("event") for e in events]
    assert names.index("shutdown_draining") < names.index("shutdown_cut")
    assert next(e for e in events if e.get("event") == "shutdown_cut")["requests"] == 1
    # the outbox delivered every exchange before the process ended, the cut one as an error
    records = [r.body for r in hook.on("/hook")]
    assert len(records) == 3
    cut = next(r for r in records if r["status"] != 200)
    assert (cut["status"], cut["outcome"]) == (503, "error")
    assert cut["error"]["error"]["code"] == "server_shutting_down"


# -- start-up --------------------------------------------------------------------------------


def test_no_ready_line_when_the_port_cannot_be_bound(tmp_path: Path, upstream: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = write_config(tmp_path, upstream, {})
        log = tmp_path / "refused.log"
        proc = spawn([sys.executable, "-m", "gateway", "serve", "--config", str(config),
                      "--port", str(port)], log=log, env=gateway_env())
        assert proc.wait(30) != 0
    text = log.read_text()
    assert "address already in use" in text.lower()
    assert "gateway_ready" not in text


def test_the_ready_line_comes_after_the_port_listens(tmp_path: Path, upstream: str) -> None:
    with run_gateway(write_config(tmp_path, upstream, {})) as gateway:
        lines = gateway.log().splitlines()
    bound = next(i for i, line in enumerate(lines) if "running on" in line.lower())
    ready = [i for i, line in enumerate(lines) if '"gateway_ready"' in line]
    assert len(ready) == 1 and ready[0] > bound
