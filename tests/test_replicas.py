"""Three real gateway processes (uvicorn) sharing one real Redis: limits stay exact and a
revocation reaches every replica within one second."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from gateway.auth import create_key
from gateway.config import load_config
from gateway.stores.keys import RedisKeyStore
from gateway.stores.redis_base import connect
from gateway.testing.configs import config_yaml
from gateway.testing.fake_inkeep import create_fake_inkeep_app
from gateway.testing.process import run_gateways
from gateway.testing.server import run_server

pytestmark = [pytest.mark.slow, pytest.mark.redis]

UPSTREAM_KEY = "upstream-secret-replicas"
N = 12


@pytest.fixture
async def upstream() -> AsyncIterator[str]:
    async with run_server(create_fake_inkeep_app(api_key=UPSTREAM_KEY)) as url:
        yield url


@pytest.fixture
def config_file(tmp_path: Path, redis_url: str, upstream: str) -> Path:
    path = tmp_path / "gateway.yaml"
    path.write_text(config_yaml(
        store=redis_url,
        backends={"inkeep": {"kind": "inkeep", "base_url": f"{upstream}/v1",
                             "api_key": UPSTREAM_KEY}},
        models={"qa": {"backend": "inkeep", "upstream_model": "inkeep-qa"}},
        extra={"server": {"log_level": "warning"}},
    ))
    return path


@pytest.fixture
def replicas(config_file: Path) -> Iterator[list[str]]:
    with run_gateways(config_file, 3) as gateways:
        yield [gateway.url for gateway in gateways]


async def _new_key(config_file: Path, **limits: int) -> tuple[str, RedisKeyStore, object]:
    config = load_config(config_file)
    assert config.redis_url is not None
    ns = connect(config.redis_url, config.store_prefix)
    store = RedisKeyStore(ns)
    issued = await create_key(config, store, team="alpha", **limits)  # type: ignore[arg-type]
    return issued.secret, store, ns


def _body(max_tokens: int = 16) -> dict[str, object]:
    return {"model": "qa", "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": "How do I rotate a key?"}]}


async def test_burst_over_three_replicas_admits_exactly_n(
    replicas: list[str], config_file: Path
) -> None:
    secret, store, ns = await _new_key(config_file, rpm=N)
    headers = {"authorization": f"Bearer {secret}"}
    try:
        async with httpx.AsyncClient(timeout=10) as client:
            async def one(i: int) -> httpx.Response:
                return await client.post(f"{replicas[i % 3]}/v1/chat/completions",
                                         json=_body(), headers=headers)

            replies = await asyncio.gather(*(one(i) for i in range(4 * N)))
        statuses = [r.status_code for r in replies]
        assert statuses.count(200) == N, statuses
        assert statuses.count(429) == 3 * N
        refused = next(r for r in replies if r.status_code == 429)
        assert refused.json()["error"]["code"] == "rate_limit_exceeded"
        assert int(refused.headers["retry-after"]) >= 1
        admitted = next(r for r in replies if r.status_code == 200)
        assert admitted.headers["x-ratelimit-limit-requests"] == str(N)
    finally:
        await ns.client.aclose()  # type: ignore[attr-defined]


async def test_token_limit_holds_within_one_estimate(
    replicas: list[str], config_file: Path
) -> None:
    tpm = 2000
    secret, store, ns = await _new_key(config_file, tpm=tpm)
    headers = {"authorization": f"Bearer {secret}"}
    try:
        async with httpx.AsyncClient(timeout=10) as client:
            async def one(i: int) -> httpx.Response:
                return await client.post(f"{replicas[i % 3]}/v1/chat/completions",
                                         json=_body(max_tokens=200), headers=headers)

            replies = await asyncio.gather(*(one(i) for i in range(30)))
        used = sum(r.json()["usage"]["total_tokens"] for r in replies if r.status_code == 200)
        admitted = sum(r.status_code == 200 for r in replies)
        assert 0 < admitted < 30
        estimate = 200 + 30  # max_tokens + a generous prompt estimate
        assert used <= tpm + estimate
    finally:
        await ns.client.aclose()  # type: ignore[attr-defined]


async def test_revocation_reaches_all_replicas_within_a_second(
    replicas: list[str], config_file: Path
) -> None:
    secret, store, ns = await _new_key(config_file)
    headers = {"authorization": f"Bearer {secret}"}
    try:
        async with httpx.AsyncClient(timeout=10) as client:
            for url in replicas:
                assert (await client.get(f"{url}/v1/models", headers=headers)).status_code == 200
            key_id = secret[3:].partition("_")[0]
            assert await store.revoke_key(key_id)
            started = time.monotonic()
            for url in replicas:
                while (await client.get(f"{url}/v1/models", headers=headers)).status_code != 401:
                    assert time.monotonic() - started < 1.0, url
                    await asyncio.sleep(0.02)
    finally:
        await ns.client.aclose()  # type: ignore[attr-defined]
