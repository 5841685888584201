"""The Responses API and models retrieve end to end: the real openai SDK -> the gateway on
uvicorn -> fake Inkeep and Nuclia upstreams on uvicorn."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import openai
import pytest
from pydantic import BaseModel
from starlette.applications import Starlette

from gateway.config import parse_config
from gateway.testing.configs import config_yaml, static_key
from gateway.testing.fake_inkeep import answer_text, create_fake_inkeep_app
from gateway.testing.fake_nuclia import answer_text as nuclia_answer
from gateway.testing.fake_nuclia import create_fake_nuclia_app
from gateway.testing.server import run_server
from tests.eventually import eventually
from tests.gateway_fixtures import (
    CLIENT_KEY,
    OTHER_KEY,
    UPSTREAM_KEY,
    async_client,
    serve_gateway,
)
from tests.test_exchange_records import Recorder

QUESTION = "How do I rotate a key?"
TOOL = {"type": "function", "name": "provideLinks", "description": "Links to cite",
        "parameters": {"type": "object", "properties": {"links": {"type": "array"}}}}
TEXT_EVENTS = ["response.created", "response.in_progress", "response.output_item.added",
               "response.content_part.added", "response.output_text.delta"]
TEXT_END = ["response.output_text.done", "response.content_part.done",
            "response.output_item.done", "response.completed"]


class Setup:
    def __init__(self, url: str, inkeep: Starlette, nuclia: Starlette,
                 recorder: Recorder) -> None:
        self.url, self.inkeep, self.nuclia, self.recorder = url, inkeep, nuclia, recorder


@pytest.fixture
async def setup() -> AsyncIterator[Setup]:
    inkeep = create_fake_inkeep_app(api_key=UPSTREAM_KEY)
    nuclia = create_fake_nuclia_app(kbid="kb", token="nuclia-secret")
    recorder = Recorder()
    async with run_server(inkeep) as inkeep_url, run_server(nuclia) as nuclia_url:
        config_text = config_yaml(
            backends={"inkeep": {"kind": "inkeep", "base_url": f"{inkeep_url}/v1",
                                 "api_key": UPSTREAM_KEY},
                      "nuclia": {"kind": "nuclia", "base_url": f"{nuclia_url}/api/v1",
                                 "kbid": "kb", "api_key": "nuclia-secret"}},
            models={"qa": {"backend": "inkeep", "upstream_model": "inkeep-qa", "retries": 0},
                    "kb": {"backend": "nuclia", "retries": 0,
                           "nuclia": {"citations": True}}},
            keys=[static_key(CLIENT_KEY, id="test", team="alpha"),
                  static_key(OTHER_KEY, id="other", team="beta", models=["qa"])],
            extra={"cache": {"default": {"enabled": True, "ttl": 60}}},
        )
        async with serve_gateway(parse_config(config_text, env={}),
                                 observers=[recorder]) as url:
            recorder.url = url
            yield Setup(url, inkeep, nuclia, recorder)


def types(events: list[Any]) -> list[str]:
    """The event types, runs of deltas collapsed to one."""
    out: list[str] = []
    for event in events:
        if not (out and out[-1] == event.type and event.type.endswith(".delta")):
            out.append(event.type)
    return out


async def test_a_whole_response_from_inkeep(setup: Setup) -> None:
    async with async_client(setup.url) as client:
        response = await client.responses.create(model="qa", input=QUESTION,
                                                 instructions="Be brief.",
                                                 max_output_tokens=50, temperature=0.5)
    assert response.object == "response" and response.id.startswith("resp_")
    assert response.status == "completed" and response.model == "qa"
    assert response.output_text == answer_text(QUESTION)
    assert response.usage is not None and response.usage.output_tokens > 0
    assert response.usage.total_tokens == (response.usage.input_tokens
                                           + response.usage.output_tokens)
    sent = setup.inkeep.state.last_body
    assert sent["messages"] == [{"role": "system", "content": "Be brief."},
                                {"role": "user", "content": QUESTION}]
    assert (sent["max_tokens"], sent["temperature"]) == (50, 0.5)
    records = await setup.recorder.wait()
    assert [r.api for r in records] == ["responses"]


async def test_a_streamed_response_from_inkeep(setup: Setup) -> None:
    async with async_client(setup.url) as client:
        stream = await client.responses.create(model="qa", input=QUESTION, stream=True)
        events = [event async for event in stream]
    assert types(events) == [*TEXT_EVENTS, *TEXT_END]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    final = events[-1].response
    assert final.output_text == answer_text(QUESTION)
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") \
        == answer_text(QUESTION)
    assert final.usage is not None and final.usage.output_tokens > 0


async def test_the_stream_helper_accumulates_the_response(setup: Setup) -> None:
    async with async_client(setup.url) as client, \
            client.responses.stream(model="qa", input=QUESTION) as stream:
        async for _ in stream:
            pass
        final = await stream.get_final_response()
    assert final.output_text == answer_text(QUESTION)


async def test_nuclia_reasoning_and_citations(setup: Setup) -> None:
    question = "[reasoning] What is in the Knowledge Box?"
    async with async_client(setup.url) as client:
        whole = await client.responses.create(model="kb", input=question)
        stream = await client.responses.create(model="kb", input=question, stream=True)
        events = [event async for event in stream]
    for response in (whole, events[-1].response):
        kinds = [item.type for item in response.output]
        assert kinds == ["reasoning", "message"]
        reasoning = response.output[0]
        assert reasoning.type == "reasoning" and "Sample reasoning" in reasoning.summary[0].text
        assert response.output_text == nuclia_answer(question)
        message = response.output[1]
        assert message.type == "message" and message.content[0].type == "output_text"
        annotations = message.content[0].annotations
        assert annotations and all(a.type == "file_citation" for a in annotations)
    assert "response.reasoning_summary_text.delta" in types(events)
    assert "response.output_text.annotation.added" in types(events)


async def test_tools_on_nuclia_are_a_400_naming_them(setup: Setup) -> None:
    async with async_client(setup.url) as client:
        with pytest.raises(openai.BadRequestError) as caught:
            await client.responses.create(model="kb", input="Q?", tools=[TOOL])  # type: ignore[list-item]
    assert caught.value.body["param"] == "tools"  # type: ignore[index]


@pytest.mark.parametrize("stream", [False, True])
async def test_a_function_call_and_its_output(setup: Setup, stream: bool) -> None:
    question = "[tools] Where are the docs?"
    async with async_client(setup.url) as client:
        if stream:
            events = [e async for e in await client.responses.create(
                model="qa", input=question, tools=[TOOL], stream=True)]  # type: ignore[list-item]
            assert "response.function_call_arguments.delta" in types(events)
            assert "response.function_call_arguments.done" in types(events)
            first = events[-1].response
        else:
            first = await client.responses.create(model="qa", input=question,
                                                  tools=[TOOL])  # type: ignore[list-item]
        calls = [item for item in first.output if item.type == "function_call"]
        assert len(calls) == 1 and calls[0].name == "provideLinks"
        assert calls[0].arguments.startswith('{"links"')
        follow = await client.responses.create(model="qa", input=[
            {"role": "user", "content": question},
            {"type": "function_call", "call_id": calls[0].call_id, "name": calls[0].name,
             "arguments": calls[0].arguments},
            {"type": "function_call_output", "call_id": calls[0].call_id, "output": "done"},
        ], tools=[TOOL])  # type: ignore[list-item]
    assert follow.status == "completed"
    sent = setup.inkeep.state.last_body["messages"]
    assert sent[1]["role"] == "assistant" and sent[1]["tool_calls"][0]["id"] == calls[0].call_id
    assert sent[2] == {"role": "tool", "tool_call_id": calls[0].call_id, "content": "done"}
    assert setup.inkeep.state.last_body["tools"][0]["function"]["name"] == "provideLinks"


async def test_stored_responses_continue_and_belong_to_their_team(setup: Setup) -> None:
    async with async_client(setup.url) as client, \
            async_client(setup.url, OTHER_KEY) as other:
        first = await client.responses.create(model="qa", input="First question")
        second = await client.responses.create(model="qa", input="Second question",
                                               previous_response_id=first.id)
        sent = setup.inkeep.state.last_body["messages"]
        assert sent == [{"role": "user", "content": "First question"},
                        {"role": "assistant", "content": answer_text("First question")},
                        {"role": "user", "content": "Second question"}]
        fetched = await client.responses.retrieve(second.id)
        assert fetched.id == second.id and fetched.output_text == second.output_text
        with pytest.raises(openai.NotFoundError):
            await other.responses.retrieve(second.id)
        with pytest.raises(openai.NotFoundError) as caught:
            await other.responses.create(model="qa", input="x", previous_response_id=first.id)
        assert caught.value.code == "previous_response_not_found"
        assert caught.value.body["param"] == "previous_response_id"  # type: ignore[index]
        await client.responses.delete(second.id)
        with pytest.raises(openai.NotFoundError):
            await client.responses.retrieve(second.id)
        unstored = await client.responses.create(model="qa", input="x", store=False)
        with pytest.raises(openai.NotFoundError):
            await client.responses.retrieve(unstored.id)


async def test_a_failure_mid_stream_is_a_failed_response(setup: Setup) -> None:
    async with async_client(setup.url) as client:
        stream = await client.responses.create(model="qa", input="[midstream-error] Q?",
                                               stream=True)
        events = [event async for event in stream]
    kinds = types(events)
    assert "response.completed" not in kinds
    assert kinds[-2:] == ["error", "response.failed"]
    assert events[-1].response.status == "failed"
    assert events[-1].response.error is not None


async def test_the_cache_replays_a_responses_stream(setup: Setup) -> None:
    async with async_client(setup.url) as client:
        first = [e async for e in await client.responses.create(
            model="qa", input=QUESTION, stream=True, temperature=0)]
        calls = setup.inkeep.state.calls
        again = [e async for e in await client.responses.create(
            model="qa", input=QUESTION, stream=True, temperature=0)]
    assert setup.inkeep.state.calls == calls  # answered from the cache
    assert types(again) == types(first)
    assert again[-1].response.output_text == first[-1].response.output_text


@pytest.mark.parametrize(("body", "param"), [
    ({"model": "qa"}, "input"),
    ({"model": "qa", "input": 5}, "input"),
    ({"model": "qa", "input": [{"type": "computer_call"}]}, "input[0].type"),
    ({"model": "qa", "input": [{"role": "robot", "content": "x"}]}, "input[0].role"),
    ({"model": "qa", "input": "x", "max_output_tokens": "many"}, "max_output_tokens"),
    ({"model": "qa", "input": "x", "tools": [{"type": "web_search"}]}, "tools[0].type"),
    ({"model": "qa", "input": "x", "text": {"format": {"type": "xml"}}}, "text.format.type"),
])
async def test_bad_input_is_a_400_naming_the_param(setup: Setup, body: dict[str, Any],
                                                   param: str) -> None:
    async with httpx.AsyncClient(base_url=setup.url) as http:
        found = await http.post("/v1/responses", json=body,
                                headers={"authorization": f"Bearer {CLIENT_KEY}"})
    assert found.status_code == 400
    assert found.json()["error"]["param"] == param


async def test_models_retrieve(setup: Setup) -> None:
    async with async_client(setup.url) as client, \
            async_client(setup.url, OTHER_KEY) as other:
        model = await client.models.retrieve("kb")
        assert (model.id, model.object, model.owned_by) == ("kb", "model", "gateway:nuclia")
        with pytest.raises(openai.NotFoundError) as caught:
            await client.models.retrieve("nope")
        assert caught.value.code == "model_not_found"
        with pytest.raises(openai.NotFoundError):
            await other.models.retrieve("kb")  # not this key's to use


class Links(BaseModel):
    title: str
    urls: list[str]
    count: int


@pytest.mark.parametrize("model", ["qa", "kb"])
async def test_parse_with_a_pydantic_model(setup: Setup, model: str) -> None:
    async with async_client(setup.url) as client:
        response = await client.responses.parse(model=model, input="Links, please?",
                                                text_format=Links)
    parsed = response.output_parsed
    assert isinstance(parsed, Links)
    assert Links.model_validate_json(response.output_text) == parsed


@pytest.mark.redis
async def test_stored_responses_expire_on_redis(redis_url: str) -> None:
    inkeep = create_fake_inkeep_app()
    async with run_server(inkeep) as inkeep_url:
        config = parse_config(config_yaml(
            store=redis_url,
            backends={"inkeep": {"kind": "inkeep", "base_url": f"{inkeep_url}/v1",
                                 "requires_key": False}},
            models={"qa": {"backend": "inkeep", "retries": 0}},
            keys=[static_key(CLIENT_KEY, id="test", team="alpha")],
            extra={"responses": {"ttl_days": 0.5 / 86400}},  # half a second
        ), env={})
        async with serve_gateway(config) as url, async_client(url) as client:
            response = await client.responses.create(model="qa", input=QUESTION)
            assert (await client.responses.retrieve(response.id)).id == response.id

            async def expired() -> bool:
                try:
                    await client.responses.retrieve(response.id)
                except openai.NotFoundError:
                    return True
                return False

            await eventually(expired, within=5)
