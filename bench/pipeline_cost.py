"""The in-process cost of `Pipeline.handle`: requests driven straight into the pipeline (no
HTTP server in front), against an in-process aiohttp upstream serving fixed bodies.

    .venv/bin/python bench/pipeline_cost.py [--requests 4000] [--rounds 5] [--env K=V ...]

Prints the best round's CPU µs per request for a whole answer and a streamed one. The
upstream's own work is included (the same in every run): compare runs, not absolutes.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from contextlib import AsyncExitStack

import orjson
from aiohttp import web

from bench.upstream import completion_body, stream_body
from gateway.app import assemble
from gateway.config import parse_config
from gateway.metrics import Metrics
from gateway.serving import Drain
from gateway.testing.configs import config_yaml, static_key

KEY = "sk-bench-pipeline"


def upstream_app() -> web.Application:
    whole, streamed = completion_body(), stream_body()

    async def chat(request: web.Request) -> web.Response:
        body = await request.json()
        if body.get("stream"):
            return web.Response(body=streamed, content_type="text/event-stream")
        return web.Response(body=whole, content_type="application/json")

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    return app


async def drive(pipeline: object, raw: bytes, headers: dict[str, str], n: int) -> float:
    """CPU seconds per request over `n` requests, streams read to their end."""
    handle = pipeline.handle  # type: ignore[attr-defined]
    started = time.process_time()
    for i in range(n):
        reply = await handle(f"req-{i}", raw, headers)
        if reply.stream is not None:
            async for _ in reply.stream:
                pass
        assert reply.status == 200, reply.body
    return (time.process_time() - started) / n


async def main(requests: int, rounds: int) -> None:
    runner = web.AppRunner(upstream_app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    config = parse_config(config_yaml(
        backends={"up": {"kind": "openai", "base_url": f"http://127.0.0.1:{port}/v1",
                         "requires_key": False}},
        models={"m": {"backend": "up", "retries": 0}},
        keys=[static_key(KEY, id="bench", team="bench")],
        extra={"server": {"request_log": False}}), env=dict(os.environ))
    headers = {"authorization": f"Bearer {KEY}", "content-type": "application/json"}
    messages = [{"role": "user", "content": "How much does the pipeline cost?"}]
    async with AsyncExitStack() as stack:
        state = await assemble(config, stack, Metrics(), Drain(0, 1))
        for stream in (False, True):
            raw = orjson.dumps({"model": "m", "messages": messages, "stream": stream})
            await drive(state.pipeline, raw, headers, 200)  # warm up
            best = min([await drive(state.pipeline, raw, headers, requests)
                        for _ in range(rounds)])
            print(f"{'stream' if stream else 'whole '}: {best * 1e6:7.1f} µs CPU/request")
    await runner.cleanup()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--env", action="append", default=[],
                        help="K=V: set in the environment before assembling (e.g. OTEL_*)")
    args = parser.parse_args()
    for pair in args.env:
        name, _, value = pair.partition("=")
        os.environ[name] = value
    asyncio.run(main(args.requests, args.rounds))
