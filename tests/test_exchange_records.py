"""Every admitted exchange ends in exactly one record, whatever its exit path."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import openai
import pytest

from gateway.exchange import ExchangeRecord
from gateway.testing.fake_inkeep import answer_text, create_fake_inkeep_app
from gateway.testing.server import run_server
from tests.gateway_fixtures import (
    CLIENT_KEY,
    UPSTREAM_KEY,
    async_client,
    gateway_config,
    serve_gateway,
    settled,
)


class Recorder:
    def __init__(self) -> None:
        self.url = ""
        self.records: list[ExchangeRecord] = []

    def exchange_finished(self, record: ExchangeRecord) -> None:
        self.records.append(record)

    async def wait(self) -> list[ExchangeRecord]:
        """Every record of the exchanges so far, once the gateway has finished them all."""
        await settled(self.url)
        return self.records


@pytest.fixture
async def setup() -> AsyncIterator[tuple[str, Recorder, Any]]:
    recorder = Recorder()
    app = create_fake_inkeep_app(api_key=UPSTREAM_KEY)
    async with run_server(app) as upstream:
        async with serve_gateway(gateway_config(upstream), observers=[recorder]) as url:
            recorder.url = url
            yield url, recorder, app


async def test_completed_stream(setup: tuple[str, Recorder, Any]) -> None:
    url, recorder, _ = setup
    question = "What is a gateway?"
    async with async_client(url) as client:
        stream = await client.chat.completions.create(
            model="qa", stream=True, messages=[{"role": "user", "content": question}],
            extra_headers={"x-conversation-id": "conv-1", "x-end-user-id": "u-9"})
        async for _ in stream:
            pass
    [record] = await recorder.wait()
    assert record.outcome == "completed" and record.status == 200 and record.stream
    assert record.answer == answer_text(question)
    assert record.finish_reason == "stop"
    assert record.team == "alpha" and record.key_id == "test"
    assert record.model == "qa" and record.backend == "inkeep"
    assert record.upstream_model == "inkeep-qa"
    assert record.conversation_id == "conv-1" and record.user == "u-9"
    assert record.usage["completion_tokens"] > 0 and record.usage.get("estimated")
    assert record.ttft_ms is not None and record.latency_ms >= record.ttft_ms
    assert record.messages == [{"role": "user", "content": question}]


async def test_non_streamed(setup: tuple[str, Recorder, Any]) -> None:
    url, recorder, _ = setup
    async with async_client(url) as client:
        await client.chat.completions.create(
            model="qa", messages=[{"role": "user", "content": "hi"}], user="end-user-7")
    [record] = await recorder.wait()
    assert record.outcome == "completed" and not record.stream
    assert record.user == "end-user-7"
    assert not record.usage.get("estimated")  # the fake upstream reports usage


async def test_upstream_error(setup: tuple[str, Recorder, Any]) -> None:
    url, recorder, _ = setup
    async with async_client(url) as client:
        with pytest.raises(openai.InternalServerError):
            await client.chat.completions.create(
                model="qa", messages=[{"role": "user", "content": "[500]"}])
        stream = await client.chat.completions.create(
            model="qa", stream=True, messages=[{"role": "user", "content": "[midstream-error]"}])
        with pytest.raises(openai.APIError):
            async for _ in stream:
                pass
    before, during = await recorder.wait()
    assert before.outcome == "error" and before.status == 502 and before.error
    assert during.outcome == "error" and during.status == 502 and during.answer


async def test_client_disconnect_mid_stream(setup: tuple[str, Recorder, Any]) -> None:
    url, recorder, _ = setup
    async with httpx.AsyncClient(base_url=url) as http:
        async with http.stream(
            "POST", "/v1/chat/completions", headers={"authorization": f"Bearer {CLIENT_KEY}"},
            json={"model": "qa", "stream": True,
                  "messages": [{"role": "user", "content": "[slow] [chunks=30]"}]},
        ) as response:
            async for line in response.aiter_lines():
                if "content" in line:
                    break
    [record] = await recorder.wait()
    assert record.outcome == "client_disconnected"
    assert record.status == 499


async def test_rejected_requests_make_no_record(setup: tuple[str, Recorder, Any]) -> None:
    url, recorder, _ = setup
    async with async_client(url, key="sk-nope") as client:
        with pytest.raises(openai.AuthenticationError):
            await client.chat.completions.create(
                model="qa", messages=[{"role": "user", "content": "hi"}])
    assert await recorder.wait() == []
