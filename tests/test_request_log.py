"""The request log of a real `gateway serve`: one JSON line per finished exchange with what
an operator looks for, never a secret or a message's content; uvicorn's own lines in the same
JSON format; and a switch to turn it off."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from gateway.testing.configs import config_yaml, static_key
from gateway.testing.fake_inkeep import create_fake_inkeep_app
from gateway.testing.process import run_gateway
from gateway.testing.server import run_server
from tests.eventually import eventually

pytestmark = pytest.mark.slow

KEY = "sk-request-log-secret"
QUESTION = "a question that must stay out of the log"


@pytest.fixture
async def upstream() -> AsyncIterator[str]:
    async with run_server(create_fake_inkeep_app()) as url:
        yield url


def write_config(tmp_path: Path, upstream: str, **server: Any) -> Path:
    path = tmp_path / "gateway.yaml"
    path.write_text(config_yaml(
        backends={"inkeep": {"kind": "inkeep", "base_url": f"{upstream}/v1",
                             "requires_key": False}},
        models={"qa": {"backend": "inkeep"}},
        keys=[static_key(KEY, id="k1", team="alpha")], extra={"server": server}))
    return path


def requests_logged(log: str) -> list[dict[str, Any]]:
    entries = [orjson.loads(line) for line in log.splitlines() if line.startswith("{")]
    return [e for e in entries if e.get("event") == "request"]


async def test_one_line_per_exchange(tmp_path: Path, upstream: str) -> None:
    with run_gateway(write_config(tmp_path, upstream)) as gateway:
        async with httpx.AsyncClient(base_url=gateway.url, timeout=30,
                                     headers={"authorization": f"Bearer {KEY}"}) as client:
            for stream in (False, True):
                reply = await client.post("/v1/chat/completions", headers={
                    "x-request-id": f"req-stream-{stream}"}, json={
                    "model": "qa", "stream": stream,
                    "messages": [{"role": "user", "content": QUESTION}]})
                assert reply.status_code == 200
            failed = await client.post("/v1/chat/completions", json={
                "model": "qa", "messages": [{"role": "user", "content": "[500]"}]})
            assert failed.status_code == 502
        await eventually(lambda: len(requests_logged(gateway.log())) == 3, within=5)
        log = gateway.log()
    lines = [line for line in log.splitlines() if line.strip()]
    assert all(line.startswith("{") for line in lines), lines  # uvicorn's lines too
    whole, streamed, error = requests_logged(log)
    assert whole["request_id"] == "req-stream-False" and streamed["stream"] is True
    for entry in (whole, streamed):
        assert (entry["team"], entry["key_id"], entry["model"], entry["backend"]) == (
            "alpha", "k1", "qa", "inkeep")
        assert (entry["status"], entry["outcome"], entry["cached"]) == (200, "completed", False)
        assert entry["latency_ms"] > 0 and entry["ttft_ms"] > 0
        assert entry["prompt_tokens"] > 0 and entry["completion_tokens"] > 0
    assert (error["status"], error["outcome"], error["error_code"]) == (
        502, "error", "upstream_error")
    assert KEY not in log and QUESTION not in log


async def test_the_switch_turns_it_off(tmp_path: Path, upstream: str) -> None:
    with run_gateway(write_config(tmp_path, upstream, request_log=False)) as gateway:
        async with httpx.AsyncClient(timeout=30) as client:
            reply = await client.post(
                f"{gateway.url}/v1/chat/completions", headers={"authorization": f"Bearer {KEY}"},
                json={"model": "qa", "messages": [{"role": "user", "content": "x"}]})
        assert reply.status_code == 200
    assert requests_logged(gateway.log()) == []
