"""The Nuclia backend: request mapping, and the backend against the fake Nuclia on real uvicorn."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from nucliadb_models.search import AskResponseItem, SyncAskResponse
from starlette.applications import Starlette

from gateway.backends.base import Route, UpstreamCall
from gateway.backends.failures import json_message
from gateway.backends.nuclia import NucliaBackend, build_ask_request, nuclia_message
from gateway.config import BackendConfig, Timeouts
from gateway.errors import (
    GatewayError,
    InvalidRequest,
    QuotaExceeded,
    UnsupportedParameter,
    UpstreamAuthError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamRateLimited,
    UpstreamTimeout,
)
from gateway.testing.fake_nuclia import (
    NOT_ENOUGH_DATA,
    answer_text,
    create_fake_nuclia_app,
    encode,
    fake_tokens,
    scenario_items,
)
from gateway.testing.server import run_server
from gateway.upstream import UpstreamClient
from gateway.wire import parse_chat_request
from tests.eventually import eventually

KBID = "kb-test"
TOKEN = "nuclia-secret-do-not-leak"


def make_call(body: dict[str, Any], options: dict[str, Any] | None = None,
              headers: dict[str, str] | None = None) -> UpstreamCall:
    body = {"model": "kb", **body}
    parsed, chat = parse_chat_request(orjson.dumps(body))
    return UpstreamCall("req-1", Route("kb", "nuclia", "kb", options or {}), chat, parsed,
                        headers or {})


def ask(question: str, **extra: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": question}], **extra}


# -- request mapping -------------------------------------------------------------------------


def test_mapping_of_a_conversation() -> None:
    call = make_call({
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is X?"},
            {"role": "assistant", "content": "X is a thing."},
            {"role": "developer", "content": [{"type": "text", "text": "Cite."}]},
            {"role": "user", "content": [{"type": "text", "text": "And "},
                                         {"type": "text", "text": "Y?"}]},
        ],
        "seed": 7, "max_completion_tokens": 300, "user": "u-42",
        "metadata": {"ticket": "T-1"}, "temperature": 0.2,
    })
    assert build_ask_request(call) == {
        "query": "And \nY?",
        "chat_history": [{"author": "USER", "text": "What is X?"},
                         {"author": "NUCLIA", "text": "X is a thing."}],
        "prompt": {"system": "Be brief.\n\nCite."},
        "generative_model_seed": 7,
        "max_tokens": 300,
        "audit_metadata": {"ticket": "T-1", "user": "u-42"},
    }


def test_single_question_has_no_history_nor_context() -> None:
    request = build_ask_request(make_call(ask("Hi"), {"context": [{"author": "USER"}]}))
    assert request == {"query": "Hi"}


def test_model_defaults_merged_under_the_request_extension() -> None:
    defaults = {"generative_model": "chatgpt-azure-4o", "citations": True, "top_k": 5,
                "rag_strategies": [{"name": "neighbouring_paragraphs"}],
                "prompt": "Answer {question} from {context}",
                "max_tokens": {"context": 4000, "answer": 500}}
    call = make_call({"messages": [{"role": "system", "content": "Sys"},
                                   {"role": "user", "content": "Q"}],
                      "max_tokens": 100,
                      "nuclia": {"top_k": 10, "filters": ["/l/lang/en"]}}, defaults)
    request = build_ask_request(call)
    assert request["generative_model"] == "chatgpt-azure-4o"
    assert request["citations"] is True
    assert request["top_k"] == 10
    assert request["filters"] == ["/l/lang/en"]
    assert request["rag_strategies"] == [{"name": "neighbouring_paragraphs"}]
    assert request["prompt"] == {"user": "Answer {question} from {context}", "system": "Sys"}
    assert request["max_tokens"] == {"context": 4000, "answer": 100}
    assert "nuclia" not in request


def test_json_schema_response_format_maps_to_answer_json_schema() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "string"}}}
    call = make_call(ask("Q", response_format={"type": "json_schema",
                                               "json_schema": {"name": "x", "schema": schema}}))
    assert build_ask_request(call)["answer_json_schema"] == schema
    with pytest.raises(UnsupportedParameter) as info:
        build_ask_request(make_call(ask("Q", response_format={"type": "json_object"})))
    assert info.value.param == "response_format"


@pytest.mark.parametrize(("extra", "param"), [
    ({"n": 2}, "n"),
    ({"logprobs": True}, "logprobs"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"tool_choice": "auto"}, "tool_choice"),
    ({"stop": ["\n"]}, "stop"),
    ({"modalities": ["text", "audio"]}, "modalities"),
])
def test_unsupported_parameters_are_a_400_naming_them(extra: dict[str, Any],
                                                      param: str) -> None:
    with pytest.raises(UnsupportedParameter) as info:
        build_ask_request(make_call(ask("Q", **extra)))
    assert info.value.param == param and info.value.status == 400
    assert param in info.value.message


@pytest.mark.parametrize(("messages", "param"), [
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
     "messages[0].content"),
    ([{"role": "user", "content": "Q"}, {"role": "tool", "content": "r", "tool_call_id": "1"},
      {"role": "user", "content": "Q2"}], "messages[1].role"),
    ([{"role": "user", "content": "Q"},
      {"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]},
      {"role": "user", "content": "Q2"}], "messages[1].tool_calls"),
    ([{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}], "messages"),
    ([{"role": "system", "content": "S"}], "messages"),
    ([{"role": "user", "content": "   "}], "messages[0].content"),
    ([{"role": "user", "content": "x" * 20_001}], "messages[0].content"),
])
def test_messages_nuclia_cannot_take_are_a_400(messages: list[dict[str, Any]],
                                               param: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        build_ask_request(make_call({"messages": messages}))
    assert info.value.param == param and info.value.status == 400


def test_extension_must_be_an_object_and_not_context() -> None:
    with pytest.raises(InvalidRequest) as info:
        build_ask_request(make_call(ask("Q", nuclia="fast")))
    assert info.value.param == "nuclia"
    with pytest.raises(InvalidRequest) as info:
        build_ask_request(make_call(ask("Q", nuclia={"context": []})))
    assert info.value.param == "nuclia.context"


def test_nuclia_message_of_validation_errors() -> None:
    body = orjson.dumps({"detail": [{"loc": ["body", "chat_history", 0, "author"],
                                     "msg": "Input should be 'NUCLIA' or 'USER'"}]})
    assert json_message(body, nuclia_message) == \
        "body.chat_history.0.author: Input should be 'NUCLIA' or 'USER'"
    assert json_message(b'{"detail": "Knowledge Box not found"}', nuclia_message) == \
        "Knowledge Box not found"
    assert json_message(b"<html>oops</html>", nuclia_message) is None


# -- against the fake Nuclia on real uvicorn -------------------------------------------------


@pytest.fixture
def fake() -> Starlette:
    return create_fake_nuclia_app(kbid=KBID, token=TOKEN, slow_delay=0.3)


@pytest.fixture
async def base_url(fake: Starlette) -> AsyncIterator[str]:
    async with run_server(fake) as url:
        yield url + "/api/v1"


def backend_for(url: str, **overrides: Any) -> NucliaBackend:
    spec: dict[str, Any] = {"kind": "nuclia", "base_url": url, "kbid": KBID, "api_key": TOKEN,
                            "headers": {"x-extra": "configured"},
                            "timeouts": Timeouts(connect=1, read=1, total=5)}
    spec.update(overrides)
    config = BackendConfig(**spec)
    return NucliaBackend("nuclia-kb", config, UpstreamClient("nuclia-kb", config))


@pytest.fixture
async def backend(base_url: str) -> AsyncIterator[NucliaBackend]:
    nuclia = backend_for(base_url)
    yield nuclia
    await nuclia.aclose()


async def collect(nuclia: NucliaBackend, call: UpstreamCall
                  ) -> tuple[list[dict[str, Any]], dict[str, str], GatewayError | None]:
    stream = await nuclia.stream(call)
    chunks: list[dict[str, Any]] = []
    try:
        async for batch, _ in stream.batches():
            chunks.extend(batch)
    except GatewayError as exc:
        return chunks, call.reply_headers, exc
    finally:
        await stream.aclose()
    return chunks, call.reply_headers, None


def content(chunks: list[dict[str, Any]]) -> str:
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks
                   if c["choices"])


async def test_stream_end_to_end(backend: NucliaBackend, fake: Starlette) -> None:
    question = "What is a Knowledge Box? [all-items]"
    call = make_call(ask(question, stream=True, user="u-1"), {"citations": "llm_footnotes"},
                     {"x-forwarded-for": "10.0.0.1"})
    chunks, meta, error = await collect(backend, call)
    assert error is None
    assert content(chunks) == answer_text(question)
    assert meta == {"x-nuclia-learning-id": f"{fake.state.calls:032x}"}
    final = chunks[-1]
    assert final["choices"][0]["finish_reason"] == "stop"
    prompt, completion = fake_tokens(question, answer_text(question))
    assert final["usage"]["prompt_tokens"] == prompt
    assert final["usage"]["completion_tokens"] == completion
    ext = final["nuclia"]
    assert ext["learning_id"] == meta["x-nuclia-learning-id"]
    assert ext["citations"] and ext["footnote_citations"] and len(ext["sources"]) == 6
    sent = fake.state.last_headers
    assert sent["x-nuclia-serviceaccount"] == f"Bearer {TOKEN}"
    assert sent["x-ndb-client"] == "api" and sent["x-nucliadb-user"] == "u-1"
    assert sent["x-extra"] == "configured" and sent["x-forwarded-for"] == "10.0.0.1"
    assert "x-synchronous" not in sent
    assert fake.state.last_body["query"] == question
    assert fake.state.last_body["citations"] == "llm_footnotes"
    assert fake.state.streams_finished == 1


async def test_every_line_the_fake_emits_validates_with_the_real_models() -> None:
    body = {"query": "q [all-items]", "citations": "llm_footnotes", "reasoning": True,
            "answer_json_schema": {"type": "object"}}
    queries = ["q [all-items]", "q [no-retrieval]", "q [llm-error]", "q [stream-error]",
               "q [no-context]", "q [big-retrieval]", "q"]
    seen: set[str] = set()
    for query in queries:
        for item in scenario_items(query, {**body, "query": query},
                                   {"x-show-consumption": "true"}):
            parsed = AskResponseItem.model_validate_json(encode(item))
            seen.add(parsed.item.type)
    assert seen == {"reasoning", "answer", "answer_json", "retrieval", "prequeries", "status",
                    "augmented_context", "citations", "footnote_citations", "metadata",
                    "consumption", "relations", "debug", "error"}


async def test_every_streamed_line_over_http_validates(base_url: str) -> None:
    import aiohttp

    async with aiohttp.ClientSession() as session, session.post(
        f"{base_url}/kb/{KBID}/ask", json={"query": "q [all-items]"},
        headers={"x-nuclia-serviceaccount": f"Bearer {TOKEN}"},
    ) as resp:
        assert resp.headers["content-type"].startswith("application/x-ndjson")
        raw = await resp.read()
    lines = raw.splitlines()
    assert len(lines) > 15
    for line in lines:
        AskResponseItem.model_validate_json(line)
    async with aiohttp.ClientSession() as session, session.post(
        f"{base_url}/kb/{KBID}/ask", json={"query": "q [reasoning]"},
        headers={"x-nuclia-serviceaccount": f"Bearer {TOKEN}", "x-synchronous": "true"},
    ) as resp:
        sync = SyncAskResponse.model_validate_json(await resp.read())
    assert sync.answer == answer_text("q [reasoning]") and sync.learning_id


@pytest.mark.parametrize("synchronous", [False, True])
async def test_complete(base_url: str, fake: Starlette, synchronous: bool) -> None:
    nuclia = backend_for(base_url, synchronous=synchronous)
    try:
        question = "Non streamed? [reasoning]"
        completion = await nuclia.complete(make_call(ask(question), {"citations": True}))
    finally:
        await nuclia.aclose()
    assert (fake.state.last_headers.get("x-synchronous") == "true") is synchronous
    assert completion["object"] == "chat.completion"
    choice = completion["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert choice["message"]["content"] == answer_text(question)
    assert choice["message"]["reasoning_content"].startswith("Sample reasoning")
    ext = choice["message"]["nuclia"]
    assert ext["learning_id"] == f"{fake.state.calls:032x}"
    assert ext["status"] == "success" and ext["citations"] and len(ext["sources"]) == 6
    prompt, output = fake_tokens(question, answer_text(question))
    assert completion["usage"] == {"prompt_tokens": prompt, "completion_tokens": output,
                                   "total_tokens": prompt + output}


@pytest.mark.parametrize("synchronous", [False, True])
async def test_complete_no_retrieval_and_llm_error(base_url: str, synchronous: bool) -> None:
    nuclia = backend_for(base_url, synchronous=synchronous)
    try:
        completion = await nuclia.complete(make_call(ask("q [no-retrieval]")))
        message = completion["choices"][0]["message"]
        assert message["content"] == NOT_ENOUGH_DATA
        assert message["nuclia"]["no_retrieval_data"] is True
        assert "usage" not in completion  # the pipeline estimates it
        with pytest.raises(UpstreamError, match="could not generate the answer") as failed:
            await nuclia.complete(make_call(ask("q [llm-error]")))
        assert "Sample LLM failure" in (failed.value.detail or "")
    finally:
        await nuclia.aclose()


async def test_flat_lines_over_http(backend: NucliaBackend) -> None:
    chunks, _, error = await collect(backend, make_call(ask("q [flat]", stream=True)))
    assert error is None and content(chunks) == answer_text("q [flat]")


async def test_big_retrieval_line(backend: NucliaBackend) -> None:
    chunks, _, error = await collect(backend, make_call(ask("q [big-retrieval]", stream=True)))
    assert error is None and len(chunks[-1]["nuclia"]["sources"]) == 6


async def test_no_retrieval_stream_finishes_normally(backend: NucliaBackend) -> None:
    chunks, _, error = await collect(backend, make_call(ask("q [no-retrieval]", stream=True)))
    assert error is None
    assert content(chunks) == NOT_ENOUGH_DATA
    assert chunks[-1]["nuclia"]["no_retrieval_data"] is True and "usage" not in chunks[-1]


@pytest.mark.parametrize(("marker", "kind", "text"), [
    ("[llm-error]", UpstreamError, "Sample LLM failure"),
    ("[stream-error]", UpstreamError, "Sample unexpected failure"),
    ("[cut]", UpstreamProtocolError, "before the answer finished"),
    ("[malformed]", UpstreamProtocolError, "not JSON"),
])
async def test_mid_stream_failures_raise_after_the_text_so_far(
    backend: NucliaBackend, marker: str, kind: type[GatewayError], text: str
) -> None:
    chunks, _, error = await collect(backend, make_call(ask(f"q {marker}", stream=True)))
    assert isinstance(error, kind)
    assert text in error.message or (text in (error.detail or "") and text not in error.message)
    assert "nuclia-kb" in error.message and TOKEN not in error.message
    assert content(chunks) and answer_text(f"q {marker}").startswith(content(chunks))
    assert not any(c["choices"][0]["finish_reason"] for c in chunks)


@pytest.mark.parametrize(("marker", "kind", "status", "code"), [
    ("[401]", UpstreamAuthError, 502, "upstream_auth_error"),
    ("[403]", UpstreamAuthError, 502, "upstream_auth_error"),
    ("[404]", UpstreamAuthError, 502, "upstream_auth_error"),
    ("[412]", InvalidRequest, 400, "upstream_rejected"),
    ("[422]", InvalidRequest, 400, "upstream_rejected"),
    ("[402]", QuotaExceeded, 429, "insufficient_quota"),
    ("[429]", UpstreamRateLimited, 429, "rate_limit_exceeded"),
    ("[500]", UpstreamError, 502, "upstream_error"),
    ("[503]", UpstreamError, 502, "upstream_error"),
    ("[529]", UpstreamError, 502, "upstream_error"),
    ("[530]", UpstreamError, 502, "upstream_error"),
])
@pytest.mark.parametrize("stream", [True, False])
async def test_http_errors_before_the_stream(
    backend: NucliaBackend, marker: str, kind: type[GatewayError], status: int, code: str,
    stream: bool,
) -> None:
    call = make_call(ask(f"q {marker}", stream=stream))
    with pytest.raises(kind) as info:
        if stream:
            await backend.stream(call)
        else:
            await backend.complete(call)
    error = info.value
    assert (error.status, error.code) == (status, code)
    assert TOKEN not in error.message and TOKEN not in error.json().decode()
    if status == 400:
        assert "Invalid query" in error.message
    if marker == "[429]":
        assert error.headers["retry-after"] == "7"
    if status == 502:
        assert "nuclia-kb" in error.message


async def test_wrong_key_unknown_kb_and_validation(base_url: str) -> None:
    wrong = backend_for(base_url, api_key="not-the-key")
    unknown = backend_for(base_url, kbid="other-kb")
    try:
        with pytest.raises(UpstreamAuthError) as info:
            await wrong.stream(make_call(ask("q", stream=True)))
        assert "not-the-key" not in info.value.message
        with pytest.raises(UpstreamAuthError, match="Knowledge Box"):
            await unknown.complete(make_call(ask("q")))
    finally:
        await wrong.aclose()
        await unknown.aclose()


async def test_fake_validates_like_nuclia(base_url: str) -> None:
    import aiohttp

    auth = {"x-nuclia-serviceaccount": f"Bearer {TOKEN}"}
    bad = [({"query": "q", "chat_history": [], "context": []}, auth),
           ({"query": "q", "chat_history": [{"author": "BOT", "text": "x"}]}, auth),
           ({"chat_history": []}, auth),
           ({"query": "q"}, {**auth, "x-ndb-client": "robot"})]
    async with aiohttp.ClientSession() as session:
        for body, headers in bad:
            async with session.post(f"{base_url}/kb/{KBID}/ask", json=body,
                                    headers=headers) as resp:
                assert resp.status == 422, body
                assert isinstance((await resp.json())["detail"], list)


async def test_slow_upstream_first_chunk_before_the_upstream_finishes(
    backend: NucliaBackend, fake: Starlette
) -> None:
    # 0.3 s before each of ~16 items: the whole answer takes ~5 s upstream.
    started = time.perf_counter()
    stream = await backend.stream(make_call(ask("q [slow] [chunks=3]", stream=True)))
    try:
        batches = stream.batches()
        chunks: list[dict[str, Any]] = []
        while len(chunks) < 2:
            batch, _ = await anext(batches)
            chunks += batch
        role, first = chunks[:2]
        assert role["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        elapsed = time.perf_counter() - started
        assert first["choices"][0]["delta"].get("content")
        assert elapsed < 1.0
        assert fake.state.streams_finished == 0
    finally:
        await stream.aclose()
    # closing the stream cancels the upstream
    await eventually(lambda: fake.state.streams_cancelled == 1, within=5)


async def test_upstream_timeouts_are_504(base_url: str) -> None:
    nuclia = backend_for(base_url, timeouts=Timeouts(connect=1, read=0.3, total=0.5))
    try:
        with pytest.raises(UpstreamTimeout) as info:
            await nuclia.stream(make_call(ask("q [hang]", stream=True)))
        assert info.value.status == 504
        with pytest.raises(UpstreamTimeout):
            await nuclia.complete(make_call(ask("q [hang]")))
    finally:
        await nuclia.aclose()


def test_credentials_missing() -> None:
    def make(**kw: Any) -> NucliaBackend:
        config = BackendConfig(kind="nuclia", base_url="http://x", kbid="kb", **kw)
        return NucliaBackend("n", config, UpstreamClient("n", config))

    assert make(api_key="k").credentials_missing() is None
    assert make(requires_key=False).credentials_missing() is None
    assert make(api_key_env="NUCLIA_API_KEY").credentials_missing() == "NUCLIA_API_KEY"
    assert make().credentials_missing() == "the api_key of backend 'n'"
    assert make(api_key="").credentials_missing() is not None
    assert make(api_key="k").kind == "nuclia"
