"""Resilient routing with real sockets, through the openai SDK: deployments, retries,
fallbacks, circuit breakers, the retry budget, and limits charged once per client request."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from typing import Any

import httpx
import openai
import pytest
from starlette.applications import Starlette

from gateway.config import GatewayConfig, parse_config
from gateway.exchange import ExchangeRecord
from gateway.testing.configs import config_yaml, static_key
from gateway.testing.fake_inkeep import answer_text, create_fake_inkeep_app
from gateway.testing.fake_nuclia import create_fake_nuclia_app
from gateway.testing.process import free_port
from gateway.testing.server import run_server
from tests.eventually import eventually
from tests.gateway_fixtures import serve_gateway, settled

KEY = "sk-routing"
ADMIN = "admin-routing"
Q = [{"role": "user", "content": "Where is the changelog?"}]


class Recorder:
    def __init__(self) -> None:
        self.records: list[ExchangeRecord] = []

    def exchange_finished(self, record: ExchangeRecord) -> None:
        self.records.append(record)


@pytest.fixture
async def fakes() -> AsyncIterator[dict[str, tuple[Starlette, str]]]:
    apps = {"a": create_fake_inkeep_app(), "b": create_fake_inkeep_app(),
            "kb": create_fake_nuclia_app(kbid="kb")}
    async with AsyncExitStack() as stack:
        urls = {name: await stack.enter_async_context(run_server(app))
                for name, app in apps.items()}
        yield {name: (apps[name], urls[name]) for name in apps}


def config(fakes: dict[str, tuple[Starlette, str]], models: dict[str, Any], *,
           circuit: dict[str, Any] | None = None, rpm: int | None = None,
           store: str = "memory", budget: dict[str, Any] | None = None) -> GatewayConfig:
    limits = {"rpm": rpm} if rpm else {}
    return parse_config(config_yaml(
        store=store,
        backends={
            "inkeep-a": {"kind": "inkeep", "base_url": f"{fakes['a'][1]}/v1",
                         "requires_key": False},
            "inkeep-b": {"kind": "inkeep", "base_url": f"{fakes['b'][1]}/v1",
                         "requires_key": False},
            "nuclia": {"kind": "nuclia", "base_url": f"{fakes['kb'][1]}/api/v1", "kbid": "kb",
                       "requires_key": False},
            "nuclia-down": {"kind": "nuclia", "base_url": f"http://127.0.0.1:{free_port()}/v1",
                            "kbid": "kb", "requires_key": False},
        },
        models=models, keys=[static_key(KEY, id="k", team="alpha", **limits)],
        extra={"server": {"admin_key": ADMIN},
               "routing": {"backoff": {"initial": 0.01, "max": 0.05},
                           "circuit": circuit or {}, "retry_budget": budget or {}}}), env={})


def client(url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)


TWO = {"qa": {"deployments": [{"backend": "inkeep-a", "upstream_model": "inkeep-qa"},
                              {"backend": "inkeep-b", "upstream_model": "inkeep-qa"}]}}


async def ask(sdk: openai.AsyncOpenAI, model: str = "qa") -> Any:
    return await sdk.chat.completions.with_raw_response.create(model=model, messages=Q)


async def test_a_failing_deployment_is_taken_out_then_probed_back(
        fakes: dict[str, tuple[Starlette, str]]) -> None:
    a = fakes["a"][0]
    a.state.faults.fail_for(3600, 503)
    cfg = config(fakes, TWO, circuit={"failures": 3, "cooldown": 2})
    async with serve_gateway(cfg) as url, client(url) as sdk:
        for _ in range(20):
            raw = await ask(sdk)
            assert raw.headers["x-gateway-backend"] == "inkeep-b"
            assert raw.parse().choices[0].message.content == answer_text(Q[0]["content"])
        assert a.state.calls == 3  # then its circuit opened: no traffic while it cools down
        async with httpx.AsyncClient() as http:
            health = (await http.get(f"{url}/admin/deployments",
                                     headers={"authorization": f"Bearer {ADMIN}"})).json()
        rows = {d["deployment"]: d for d in health["data"][0]["deployments"]}
        assert {name: row["state"] for name, row in rows.items()} == {
            "inkeep-a": "open", "inkeep-b": "closed"}
        cooled = time.monotonic() + rows["inkeep-a"]["reopens_in"]
        a.state.faults.clear()  # A is healthy again

        async def probed() -> bool:
            await ask(sdk)
            return a.state.calls == 4

        await eventually(probed, within=10)
        assert time.monotonic() >= cooled - 0.05  # not before the cooldown ended
        before = a.state.calls
        for _ in range(20):
            await ask(sdk)
        assert a.state.calls > before  # back in the rotation


async def test_a_429_with_retry_after_waits_and_succeeds(
        fakes: dict[str, tuple[Starlette, str]]) -> None:
    a = fakes["a"][0]
    a.state.faults.fail_next(1, 429, retry_after="1")
    cfg = config(fakes, {"qa": {"backend": "inkeep-a", "upstream_model": "inkeep-qa"}})
    async with serve_gateway(cfg) as url, client(url) as sdk:
        started = time.monotonic()
        raw = await ask(sdk)
        assert raw.parse().choices[0].message.content
        assert time.monotonic() - started >= 1.0
        assert raw.headers["x-gateway-attempts"] == "2" and a.state.calls == 2


async def test_a_stream_cut_midway_is_not_retried(
        fakes: dict[str, tuple[Starlette, str]]) -> None:
    a = fakes["a"][0]
    cfg = config(fakes, TWO)
    async with serve_gateway(cfg) as url, client(url) as sdk:
        stream = await sdk.chat.completions.create(
            model="qa", stream=True, messages=[{"role": "user", "content": "[cut] why"}])
        with pytest.raises(openai.APIError):
            async for _ in stream:
                pass
    assert a.state.calls + fakes["b"][0].state.calls == 1


@pytest.mark.parametrize("stream", [False, True])
async def test_a_nuclia_model_falls_back_to_an_inkeep_model(
        fakes: dict[str, tuple[Starlette, str]], stream: bool) -> None:
    recorder = Recorder()
    cfg = config(fakes, {
        "kb": {"backend": "nuclia-down", "fallbacks": ["qa"], "retries": 1},
        "qa": {"backend": "inkeep-a", "upstream_model": "inkeep-qa"}})
    async with serve_gateway(cfg, observers=[recorder]) as url, client(url) as sdk:
        raw = await sdk.chat.completions.with_raw_response.create(
            model="kb", messages=Q, stream=stream)
        if stream:
            text = "".join([c.choices[0].delta.content or "" async for c in raw.parse()
                            if c.choices])
        else:
            text = raw.parse().choices[0].message.content or ""
        await settled(url)
    assert text == answer_text(Q[0]["content"])
    assert raw.headers["x-gateway-backend"] == "inkeep-a"
    assert raw.headers["x-gateway-attempts"] == "3"  # two on Nuclia, one on the fallback
    [record] = recorder.records
    assert (record.model, record.served_model, record.backend, record.upstream_model) == (
        "kb", "qa", "inkeep-a", "inkeep-qa")
    assert record.attempts == 3 and record.status == 200


async def test_a_total_outage_stays_within_the_retry_budget(
        fakes: dict[str, tuple[Starlette, str]]) -> None:
    a, b = fakes["a"][0], fakes["b"][0]
    for fake in (a, b):
        fake.state.faults.fail_for(3600, 503)
    models = {"qa": {**TWO["qa"], "retries": 2}}
    cfg = config(fakes, models, circuit={"failures": 1000, "min_requests": 1000})
    async with serve_gateway(cfg) as url, client(url) as sdk:
        for _ in range(50):
            with pytest.raises(openai.InternalServerError):
                await ask(sdk)
    calls = a.state.calls + b.state.calls
    # 50 first attempts; retries at most 20% of each backend's requests plus 3 each
    assert 50 <= calls <= 50 + 0.2 * 50 + 2 * 3, calls


async def test_a_limit_of_n_admits_n_requests_that_each_needed_a_retry(
        fakes: dict[str, tuple[Starlette, str]]) -> None:
    a = fakes["a"][0]
    # every request needs a retry: a budget that allows them all (it has a test of its own)
    cfg = config(fakes, {"qa": {"backend": "inkeep-a", "upstream_model": "inkeep-qa"}},
                 rpm=5, budget={"ratio": 1.0})
    async with serve_gateway(cfg) as url, client(url) as sdk:
        remaining = []
        for _ in range(5):
            a.state.faults.fail_next(1, 503)
            raw = await ask(sdk)
            assert raw.headers["x-gateway-attempts"] == "2"
            remaining.append(int(raw.headers["x-ratelimit-remaining-requests"]))
        with pytest.raises(openai.RateLimitError):
            await ask(sdk)
    assert remaining == [4, 3, 2, 1, 0]
    assert a.state.calls == 10


@pytest.mark.redis
async def test_one_replicas_evidence_protects_the_others(
        fakes: dict[str, tuple[Starlette, str]], redis_url: str) -> None:
    a = fakes["a"][0]
    a.state.faults.fail_for(3600, 503)
    cfg = config(fakes, TWO, circuit={"failures": 3, "cooldown": 60}, store=redis_url)
    async with serve_gateway(cfg) as one, serve_gateway(cfg) as two, \
            client(one) as first, client(two) as second:
        while a.state.calls < 3:  # replica one sees A fail and opens its circuit
            await ask(first)
        seen = a.state.calls

        async def closed_to_a() -> bool:  # replica two learns it from Redis
            async with httpx.AsyncClient() as http:
                health = (await http.get(f"{two}/admin/deployments",
                                         headers={"authorization": f"Bearer {ADMIN}"})).json()
            return bool(health["data"][0]["deployments"][0]["state"] == "open")

        await eventually(closed_to_a, within=5)
        for _ in range(20):
            assert (await ask(second)).headers["x-gateway-backend"] == "inkeep-b"
        assert a.state.calls == seen


async def test_traffic_is_shared_by_weight(fakes: dict[str, tuple[Starlette, str]]) -> None:
    a, b = fakes["a"][0], fakes["b"][0]
    models = {"qa": {"deployments": [
        {"backend": "inkeep-a", "upstream_model": "inkeep-qa", "weight": 3},
        {"backend": "inkeep-b", "upstream_model": "inkeep-qa", "weight": 1}]}}
    async with serve_gateway(config(fakes, models)) as url, client(url) as sdk:
        for _ in range(200):
            await ask(sdk)
    assert a.state.calls + b.state.calls == 200
    assert 0.6 <= a.state.calls / 200 <= 0.9, (a.state.calls, b.state.calls)
