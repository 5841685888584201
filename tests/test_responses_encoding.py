"""The Responses encoder and request translation on plain lists of chat chunks: the events
and objects it writes validate as the openai package's own types, in the order the SDKs
accumulate them."""

from __future__ import annotations

import time
from typing import Any, cast

import orjson
import pytest
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from gateway.auth import Principal
from gateway.backends.base import Route
from gateway.errors import UpstreamError
from gateway.pipeline import Exchange
from gateway.responses import ResponsesApi, ResponsesEncoder
from gateway.responses_request import input_messages
from gateway.routing.table import Deployment, ModelPlan
from gateway.stores.responses import MemoryResponseStore

EVENTS: TypeAdapter[Any] = TypeAdapter(ResponseStreamEvent)
PRINCIPAL = Principal("key", "alpha")
CITED = {"nuclia": {"citations": {"rid/f/text/0-20": [[0, 5]]},
                    "sources": [{"paragraph_id": "rid/f/text/0-20", "title": "Doc"}]}}


def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> dict[str, Any]:
    return {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}


ANSWER = [
    [chunk({"role": "assistant", "content": ""}), chunk({"reasoning_content": "Think. "})],
    [chunk({"reasoning_content": "Done."}), chunk({"content": "Hello "})],
    [chunk({"content": "world"})],
    [chunk({"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                            "function": {"name": "look", "arguments": '{"q":'}}]}),
     chunk({"tool_calls": [{"index": 0, "function": {"arguments": '"x"}'}}]})],
    [chunk({}, "tool_calls", **CITED),
     {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 5,
                               "total_tokens": 12}}],
]


async def exchange(request: dict[str, Any]) -> tuple[Exchange, ResponsesEncoder]:
    store = MemoryResponseStore(60)
    parsed = await ResponsesApi(store).parse(orjson.dumps({"model": "qa", **request}),
                                             PRINCIPAL)
    route = Route("qa", "inkeep", "inkeep-qa")
    plan = ModelPlan("qa", (Deployment("inkeep", route, cast(Any, None), 1.0),), (), 0)
    ex = Exchange("req", time.perf_counter(), time.time(), PRINCIPAL, plan, route, parsed.chat,
                  parsed.body, {}, 3, parsed.encoder, "responses")
    return ex, cast(ResponsesEncoder, parsed.encoder)


def events(data: bytes) -> list[Any]:
    """The SSE events of `data`, each validated as the SDK's event type."""
    found = []
    for block in data.decode().split("\n\n"):
        if block:
            event, payload = block.split("\n", 1)
            parsed = EVENTS.validate_python(orjson.loads(payload.removeprefix("data: ")))
            assert event == f"event: {parsed.type}"
            found.append(parsed)
    return found


async def streamed(request: dict[str, Any]) -> tuple[list[Any], Exchange]:
    ex, encoder = await exchange({**request, "stream": True})
    out: list[bytes] = []
    for batch in ANSWER:
        out += encoder.relay(ex, [dict(c) for c in batch])
    out += await encoder.close(ex)
    return events(b"".join(out)), ex


async def test_a_stream_of_reasoning_text_and_a_call() -> None:
    found, _ = await streamed({"input": "hi"})
    assert [e.sequence_number for e in found] == list(range(len(found)))
    kinds = [e.type for e in found]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    added = [e.item for e in found if e.type == "response.output_item.added"]
    assert [(item.type, e.output_index) for e, item in zip(
        [e for e in found if e.type == "response.output_item.added"], added, strict=True)] \
        == [("reasoning", 0), ("message", 1), ("function_call", 2)]
    final = found[-1]
    assert final.type == "response.completed"
    response = final.response
    assert [item.id for item in response.output] == [item.id for item in added]
    assert response.output_text == "Hello world"
    assert response.output[0].summary[0].text == "Think. Done."
    call = response.output[2]
    assert (call.call_id, call.name, call.arguments) == ("call_1", "look", '{"q":"x"}')
    annotation = response.output[1].content[0].annotations[0]
    assert (annotation.type, annotation.file_id, annotation.filename, annotation.index) \
        == ("file_citation", "rid/f/text/0-20", "Doc", 5)
    assert response.usage.input_tokens == 7 and response.usage.total_tokens == 12
    assert "".join(e.delta for e in found if e.type == "response.function_call_arguments.delta") \
        == '{"q":"x"}'
    # every item is closed before the next opens, and before the response completes
    done = [e.output_index for e in found if e.type == "response.output_item.done"]
    assert done == [0, 1, 2]


async def test_a_whole_response_and_its_replay_as_a_stream() -> None:
    _, ex = await streamed({"input": "hi"})
    again, encoder = await exchange({"input": "hi"})
    again.answer = ex.answer
    whole = Response.model_validate(orjson.loads(await encoder.whole(again, {})))
    assert [item.type for item in whole.output] == ["reasoning", "message", "function_call"]
    assert whole.output_text == "Hello world"
    replayed, encoder = await exchange({"input": "hi", "stream": True})
    replayed.answer = ex.answer
    found = events(await encoder.replay(replayed))
    assert found[-1].type == "response.completed"
    assert found[-1].response.output_text == "Hello world"


async def test_a_failure_mid_stream_ends_failed_never_completed() -> None:
    ex, encoder = await exchange({"input": "hi", "stream": True})
    out = encoder.relay(ex, [chunk({"content": "Hel"})])
    out.append(encoder.failure(ex, UpstreamError("The upstream failed.", code="upstream_error")))
    found = events(b"".join(out))
    assert [e.type for e in found][-2:] == ["error", "response.failed"]
    assert found[-2].code == "upstream_error"
    assert found[-1].response.status == "failed"
    assert found[-1].response.error.code == "server_error"


async def test_the_length_cut_is_an_incomplete_response() -> None:
    ex, encoder = await exchange({"input": "hi", "stream": True})
    out = encoder.relay(ex, [chunk({"content": "Hel"}), chunk({}, "length")])
    found = events(b"".join([*out, *await encoder.close(ex)]))
    assert found[-1].type == "response.incomplete"
    assert found[-1].response.incomplete_details.reason == "max_output_tokens"


def test_calls_join_the_assistant_message_and_outputs_follow() -> None:
    messages = input_messages([
        {"role": "user", "content": [{"type": "input_text", "text": "hi"}]},
        {"type": "message", "role": "assistant",
         "content": [{"type": "output_text", "text": "Let me look."}]},
        {"type": "function_call", "call_id": "a", "name": "f", "arguments": "{}"},
        {"type": "function_call", "call_id": "b", "name": "g", "arguments": "{}"},
        {"type": "reasoning", "id": "rs_1", "summary": []},
        {"type": "function_call_output", "call_id": "a", "output": "1"},
        {"type": "function_call_output", "call_id": "b", "output": "2"},
    ])
    assert messages == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "Let me look.", "tool_calls": [
            {"id": "a", "type": "function", "function": {"name": "f", "arguments": "{}"}},
            {"id": "b", "type": "function", "function": {"name": "g", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "a", "content": "1"},
        {"role": "tool", "tool_call_id": "b", "content": "2"},
    ]


@pytest.mark.parametrize(("text", "expected"), [
    ({"format": {"type": "json_schema", "name": "A", "schema": {"type": "object"},
                 "strict": True}},
     {"type": "json_schema", "json_schema": {"name": "A", "schema": {"type": "object"},
                                             "strict": True}}),
    ({"format": {"type": "json_object"}}, {"type": "json_object"}),
    ({"format": {"type": "text"}}, None),
])
async def test_text_format_is_the_response_format(text: dict[str, Any],
                                                  expected: dict[str, Any] | None) -> None:
    ex, _ = await exchange({"input": "hi", "text": text})
    assert ex.body.get("response_format") == expected
