"""Structured outputs end to end on every backend: the real openai SDK's ``parse`` and
``stream`` with a pydantic model -> the gateway on uvicorn -> fake Nuclia and Inkeep upstreams."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Literal

import openai
import orjson
import pytest
from pydantic import BaseModel, Field
from starlette.applications import Starlette

from gateway.config import parse_config
from gateway.testing.configs import config_yaml, static_key
from gateway.testing.fake_inkeep import answer_text as inkeep_answer
from gateway.testing.fake_inkeep import create_fake_inkeep_app
from gateway.testing.fake_nuclia import answer_text as nuclia_answer
from gateway.testing.fake_nuclia import create_fake_nuclia_app
from gateway.testing.server import run_server
from tests.gateway_fixtures import CLIENT_KEY, async_client, serve_gateway

KBID = "kb-structured"
QUESTION = "How often does the contract renew?"
ANSWERS = {"kb": nuclia_answer, "kb-sync": nuclia_answer, "qa": inkeep_answer}


class Source(BaseModel):
    title: str
    score: float = Field(ge=0, le=1)


class Renewal(BaseModel):
    answer: str
    period: Literal["monthly", "yearly"]
    months: int
    automatic: bool
    sources: list[Source]
    note: str | None


class Fakes:
    def __init__(self) -> None:
        self.nuclia: Starlette = create_fake_nuclia_app(kbid=KBID)
        self.inkeep: Starlette = create_fake_inkeep_app()

    def upstream(self, model: str) -> Starlette:
        return self.inkeep if model == "qa" else self.nuclia


@pytest.fixture
def fakes() -> Fakes:
    return Fakes()


@pytest.fixture
async def gateway(fakes: Fakes) -> AsyncIterator[str]:
    async with run_server(fakes.nuclia) as nuclia_url, run_server(fakes.inkeep) as inkeep_url:
        nuclia = {"kind": "nuclia", "base_url": f"{nuclia_url}/api/v1", "kbid": KBID,
                  "requires_key": False}
        config = parse_config(config_yaml(
            backends={"nuclia": nuclia, "nuclia-sync": {**nuclia, "synchronous": True},
                      "inkeep": {"kind": "inkeep", "base_url": f"{inkeep_url}/v1",
                                 "requires_key": False}},
            models={"kb": {"backend": "nuclia", "nuclia": {"citations": True}},
                    "kb-sync": {"backend": "nuclia-sync"},
                    "qa": {"backend": "inkeep", "upstream_model": "inkeep-qa"}},
            keys=[static_key(CLIENT_KEY, id="test", team="alpha")],
        ), env={})
        async with serve_gateway(config) as url:
            yield url


def ask(question: str = QUESTION) -> list[Any]:
    return [{"role": "user", "content": question}]


def check(parsed: Renewal | None, model: str) -> None:
    """The fakes answer with an instance of the schema whose first string is their answer."""
    assert isinstance(parsed, Renewal)
    assert parsed.answer == ANSWERS[model](QUESTION)
    assert parsed.period == "monthly" and parsed.sources and parsed.sources[0].title


@pytest.mark.parametrize("model", ["kb", "kb-sync", "qa"])
async def test_parse_returns_the_pydantic_object(gateway: str, fakes: Fakes,
                                                 model: str) -> None:
    async with async_client(gateway) as client:
        completion = await client.chat.completions.parse(
            model=model, messages=ask(), response_format=Renewal)
    message = completion.choices[0].message
    check(message.parsed, model)
    assert orjson.loads(message.content or "") == message.parsed.model_dump()  # type: ignore[union-attr]


@pytest.mark.parametrize("model", ["kb", "qa"])
async def test_streamed_parse_returns_the_pydantic_object(gateway: str, model: str) -> None:
    question = f"{QUESTION} [reasoning]"
    async with async_client(gateway) as client:
        async with client.chat.completions.stream(
                model=model, messages=ask(question), response_format=Renewal) as stream:
            deltas = [event.delta async for event in stream if event.type == "content.delta"]
            final = await stream.get_final_completion()
    parsed = final.choices[0].message.parsed
    assert isinstance(parsed, Renewal)
    assert parsed.answer == ANSWERS[model](question)
    assert "".join(deltas) == final.choices[0].message.content


async def test_nuclia_keeps_reasoning_and_citations_beside_the_json(gateway: str) -> None:
    question = f"{QUESTION} [reasoning]"
    response_format = {"type": "json_schema", "json_schema": {
        "name": "Renewal", "schema": Renewal.model_json_schema()}}
    async with async_client(gateway) as client:
        stream = await client.chat.completions.create(
            model="kb", messages=ask(question), stream=True,
            response_format=response_format)  # type: ignore[arg-type]
        content, reasoning, extension = "", "", {}
        async for chunk in stream:
            delta = chunk.choices[0].delta
            content += delta.content or ""
            reasoning += (delta.model_extra or {}).get("reasoning_content") or ""
            extension = (chunk.model_extra or {}).get("nuclia") or extension
    assert Renewal.model_validate_json(content).answer == nuclia_answer(question)
    assert reasoning.startswith("Sample reasoning")
    assert extension["citations"] and extension["answer_json"] == orjson.loads(content)


async def test_nuclia_receives_the_schema(gateway: str, fakes: Fakes) -> None:
    async with async_client(gateway) as client:
        await client.chat.completions.parse(model="kb", messages=ask(), response_format=Renewal)
    sent = fakes.nuclia.state.last_body["answer_json_schema"]
    assert set(sent["properties"]) == set(Renewal.model_fields)
    assert set(sent["required"]) == set(Renewal.model_fields)  # the SDK's strict schema
    assert sent["additionalProperties"] is False and "Source" in sent["$defs"]


async def test_inkeep_gets_response_format_unchanged(gateway: str, fakes: Fakes) -> None:
    response_format = {"type": "json_schema", "json_schema": {
        "name": "pick", "strict": True, "schema": {
            "type": "object", "properties": {"colour": {"enum": ["red", "blue"]}},
            "required": ["colour"], "additionalProperties": False}}}
    async with async_client(gateway) as client:
        completion = await client.chat.completions.create(
            model="qa", messages=ask(), response_format=response_format)  # type: ignore[arg-type]
    assert fakes.inkeep.state.last_body["response_format"] == response_format
    assert orjson.loads(completion.choices[0].message.content or "") == {"colour": "red"}


async def test_json_object_passes_through_on_inkeep(gateway: str, fakes: Fakes) -> None:
    async with async_client(gateway) as client:
        completion = await client.chat.completions.create(
            model="qa", messages=ask("Answer in JSON."), response_format={"type": "json_object"})
    assert fakes.inkeep.state.last_body["response_format"] == {"type": "json_object"}
    assert orjson.loads(completion.choices[0].message.content or "") == {
        "answer": inkeep_answer("Answer in JSON.")}


@pytest.mark.parametrize("stream", [False, True])
async def test_json_object_on_nuclia_is_a_400_that_says_what_to_use(
        gateway: str, fakes: Fakes, stream: bool) -> None:
    async with async_client(gateway) as client:
        with pytest.raises(openai.BadRequestError) as refused:
            await client.chat.completions.create(
                model="kb", messages=ask("Answer in JSON."), stream=stream,
                response_format={"type": "json_object"})
    error = refused.value.body
    assert isinstance(error, dict) and error["param"] == "response_format"
    assert "json_schema" in error["message"]
    assert fakes.nuclia.state.calls == 0


@pytest.mark.parametrize("model", ["kb", "kb-sync"])
async def test_nuclia_without_json_is_an_error_not_prose(gateway: str, model: str) -> None:
    async with async_client(gateway) as client:
        with pytest.raises(openai.APIStatusError) as failed:
            await client.chat.completions.parse(
                model=model, messages=ask("[no-retrieval] renewal?"), response_format=Renewal)
    assert failed.value.status_code == 502
    assert "no_retrieval_data" in failed.value.message
    assert "Not enough data" not in failed.value.message


async def test_nuclia_without_json_streamed_is_an_error_event(gateway: str) -> None:
    async with async_client(gateway) as client:
        with pytest.raises(openai.APIError, match="response_format asked for"):
            async with client.chat.completions.stream(
                    model="kb", messages=ask("[no-retrieval] renewal?"),
                    response_format=Renewal) as stream:
                async for _ in stream:
                    pass


@pytest.mark.parametrize("model", ["kb", "qa"])
async def test_a_schema_the_upstream_refuses_is_a_400(gateway: str, model: str) -> None:
    endless = {"type": "object", "properties": {"again": {"$ref": "#"}}, "required": ["again"]}
    async with async_client(gateway) as client:
        with pytest.raises(openai.BadRequestError):
            await client.chat.completions.create(
                model=model, messages=ask(), response_format={  # type: ignore[arg-type]
                    "type": "json_schema", "json_schema": {"name": "x", "schema": endless}})
