"""Nuclia end to end: the real openai SDK -> the gateway on uvicorn -> a fake Nuclia on uvicorn."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import openai
import pytest
from starlette.applications import Starlette

from gateway.config import parse_config
from gateway.testing.configs import config_yaml, static_key
from gateway.testing.fake_nuclia import answer_text, create_fake_nuclia_app, fake_tokens
from gateway.testing.server import run_server
from tests.gateway_fixtures import CLIENT_KEY, async_client, serve_gateway

KBID = "kb-e2e"
TOKEN = "nuclia-e2e-secret"


@pytest.fixture
def fake() -> Starlette:
    return create_fake_nuclia_app(kbid=KBID, token=TOKEN, slow_delay=0.3)


@pytest.fixture
async def gateway(fake: Starlette) -> AsyncIterator[str]:
    async with run_server(fake) as nuclia_url:
        config = parse_config(config_yaml(
            backends={"nuclia": {"kind": "nuclia", "base_url": f"{nuclia_url}/api/v1",
                                 "kbid": KBID, "api_key": TOKEN,
                                 "timeouts": {"connect": 1, "read": 2, "total": 10}}},
            models={"kb": {"backend": "nuclia", "nuclia": {"citations": True}}},
            keys=[static_key(CLIENT_KEY, id="test", team="alpha")],
        ), env={})
        async with serve_gateway(config) as url:
            yield url


def ask(question: str) -> list[Any]:
    return [{"role": "user", "content": question}]


async def test_streamed_text_and_usage(gateway: str) -> None:
    question = "What is in the Knowledge Box?"
    async with async_client(gateway) as client:
        stream = await client.chat.completions.create(
            model="kb", messages=ask(question), stream=True,
            stream_options={"include_usage": True})
        text, final, usage = "", None, None
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                if chunk.choices[0].finish_reason:
                    final = chunk
            if chunk.usage:
                usage = chunk.usage
    assert text == answer_text(question)
    assert final is not None and final.choices[0].finish_reason == "stop"
    nuclia = (final.model_extra or {})["nuclia"]
    assert nuclia["status"] == "success" and nuclia["citations"] and nuclia["learning_id"]
    prompt, completion = fake_tokens(question, answer_text(question))
    assert usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens) == (prompt, completion)


async def test_whole_answer_with_extension(gateway: str) -> None:
    async with async_client(gateway) as client:
        completion = await client.chat.completions.create(
            model="kb", messages=ask("Q?"), extra_body={"nuclia": {"top_k": 3}})
    message = completion.choices[0].message
    assert message.content == answer_text("Q?")
    assert (message.model_extra or {})["nuclia"]["sources"]
    assert completion.usage is not None and completion.usage.completion_tokens > 0


@pytest.mark.parametrize("stream", [False, True])
async def test_the_learning_id_is_a_header_streamed_or_not(gateway: str, stream: bool) -> None:
    async with async_client(gateway) as client:
        raw = await client.chat.completions.with_raw_response.create(
            model="kb", messages=ask("Which id?"), stream=stream)
        if stream:
            async for _ in raw.parse():
                pass
        else:
            raw.parse()
    learning_id = raw.headers.get("x-nuclia-learning-id")
    assert learning_id and len(learning_id) == 32


async def test_slow_upstream_first_token_is_not_delayed(gateway: str) -> None:
    async with async_client(gateway) as client:
        started = time.perf_counter()
        stream = await client.chat.completions.create(
            model="kb", messages=ask("q [slow] [chunks=4]"), stream=True)
        first = None
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                first = time.perf_counter() - started
                break
        await stream.close()
    assert first is not None and first < 1.0  # the whole upstream answer takes ~2.7 s


@pytest.mark.parametrize("marker", ["[llm-error]", "[stream-error]", "[cut]"])
async def test_mid_stream_errors_raise_in_the_sdk(gateway: str, marker: str) -> None:
    async with async_client(gateway) as client:
        stream = await client.chat.completions.create(
            model="kb", messages=ask(f"q {marker}"), stream=True)
        text = ""
        with pytest.raises(openai.APIError) as info:
            async for chunk in stream:
                if chunk.choices:
                    text += chunk.choices[0].delta.content or ""
    assert "nuclia" in str(info.value)
    assert TOKEN not in str(info.value)
    assert answer_text(f"q {marker}").startswith(text)


@pytest.mark.parametrize(("marker", "status"), [("[404]", 502), ("[412]", 400), ("[402]", 429),
                                                ("[429]", 429), ("[530]", 502)])
async def test_errors_before_the_stream(gateway: str, marker: str, status: int) -> None:
    async with async_client(gateway) as client:
        with pytest.raises(openai.APIStatusError) as info:
            await client.chat.completions.create(model="kb", messages=ask(f"q {marker}"),
                                                 stream=True)
    assert info.value.status_code == status
    assert TOKEN not in info.value.response.text


async def test_unsupported_parameter_is_a_400(gateway: str) -> None:
    async with async_client(gateway) as client:
        with pytest.raises(openai.BadRequestError) as info:
            await client.chat.completions.create(model="kb", messages=ask("q"), n=2)
    assert info.value.param == "n"
