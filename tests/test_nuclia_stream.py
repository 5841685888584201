"""The Nuclia -> OpenAI translation, fed plain lists of lines built with the real Nuclia models."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nucliadb_models import search as ns
from structlog.testing import capture_logs

from gateway.answer import Answer
from gateway.backends.nuclia_stream import (
    completion_from_sync,
    summarise_retrieval,
    translate_ask_stream,
)
from gateway.errors import UpstreamError, UpstreamProtocolError
from gateway.ndjson import iter_lines
from gateway.testing.fake_nuclia import find_results

BACKEND = "nuclia-kb"
RID = "a" * 32
PID = f"{RID}/t/text/0-20"


def line(item: Any) -> bytes:
    return ns.AskResponseItem(item=item).model_dump_json().encode()


def results() -> ns.KnowledgeboxFindResults:
    return ns.KnowledgeboxFindResults.model_validate(find_results("q"))


ANSWERS = ["The contract ", "renews every ", "year."]


def normal_answer() -> list[bytes]:
    """Every item type of the table in UPSTREAMS.md, in Nuclia's real order."""
    found = results()
    best = found.best_matches
    return [
        line(ns.ReasoningAskResponseItem(text="Think first. ")),
        *(line(ns.AnswerAskResponseItem(text=t)) for t in ANSWERS),
        line(ns.JSONAskResponseItem(object={"renews": "yearly"})),
        line(ns.RetrievalAskResponseItem(
            results=found, best_matches=[ns.AskRetrievalMatch(id=p) for p in best])),
        line(ns.PrequeriesAskResponseItem(results={"pre": found})),
        line(ns.StatusAskResponseItem(code="0", status="success")),
        line(ns.AugmentedContextResponseItem(augmented=ns.AugmentedContext(
            paragraphs={}, fields={}))),
        line(ns.CitationsAskResponseItem(citations={best[0]: [[0, 12]]})),
        line(ns.FootnoteCitationsAskResponseItem(footnote_to_context={"block-AA": best[0]})),
        line(ns.MetadataAskResponseItem(
            tokens=ns.AskTokens(input=120, output=7, input_nuclia=0.1, output_nuclia=0.01),
            timings=ns.AskTimings(generative_first_chunk=0.2, generative_total=0.9))),
        line(ns.ConsumptionResponseItem(
            normalized_tokens=ns.TokensDetail(input=1.0, output=2.0, image=0.0),
            customer_key_tokens=ns.TokensDetail(input=0.0, output=0.0, image=0.0))),
        line(ns.RelationsAskResponseItem(relations=ns.Relations(entities={}))),
        line(ns.DebugAskResponseItem(metadata={"x": 1}, metrics={})),
    ]


async def aiter_of(items: list[bytes]) -> AsyncIterator[bytes]:
    for item in items:
        yield item


async def run(lines: list[bytes], learning_id: str | None = "lid-1", *,
              structured: bool = False) -> tuple[list[dict[str, Any]], BaseException | None]:
    out: list[dict[str, Any]] = []
    try:
        async for data in translate_ask_stream(aiter_of(lines), backend=BACKEND, cid="c1",
                                               model="m", created=1, learning_id=learning_id,
                                               structured=structured):
            out.append(data)
    except UpstreamError as exc:
        return out, exc
    return out, None


def deltas(chunks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [c["choices"][0]["delta"] for c in chunks]


async def test_every_item_type_of_a_normal_answer() -> None:
    chunks, error = await run(normal_answer())
    assert error is None
    assert deltas(chunks)[0] == {"role": "assistant", "content": ""}
    assert deltas(chunks)[1] == {"reasoning_content": "Think first. "}
    assert [d["content"] for d in deltas(chunks)[2:5]] == ANSWERS
    final = chunks[-1]
    assert len(chunks) == 6  # role, reasoning, 3 answers, finish
    assert final["choices"][0] == {"index": 0, "delta": {}, "finish_reason": "stop"}
    assert final["usage"] == {"prompt_tokens": 120, "completion_tokens": 7, "total_tokens": 127}
    ext = final["nuclia"]
    best = results().best_matches
    assert ext["status"] == "success" and ext["status_code"] == "0"
    assert ext["learning_id"] == "lid-1"
    assert ext["citations"] == {best[0]: [[0, 12]]}
    assert ext["footnote_citations"] == {"block-AA": best[0]}
    assert ext["answer_json"] == {"renews": "yearly"}
    assert ext["no_context"] is False and ext["no_retrieval_data"] is False
    assert [s["paragraph_id"] for s in ext["sources"]] == best
    assert ext["sources"][0]["title"] == "Sample resource 1"
    assert set(ext["sources"][0]) == {"resource_id", "title", "field", "paragraph_id", "score",
                                      "score_type"}
    assert all(c["id"] == "c1" and c["object"] == "chat.completion.chunk" for c in chunks)


async def test_reasoning_never_reaches_content() -> None:
    chunks, _ = await run(normal_answer())
    answer = Answer()
    for data in chunks:
        answer.add_chunk(data)
    assert answer.text == "".join(ANSWERS)
    assert "".join(answer.reasoning) == "Think first. "


async def test_flat_seed_spec_lines_are_accepted() -> None:
    flat = [
        b'{"item_type":"retrieval","results":{"resources":{},"total":0}}',
        b'{"item_type":"answer","text":"Hello "}',
        b'{"item_type":"answer","text":"world"}',
        b'{"item_type":"citations","citations":{}}',
        b'{"item_type":"status","status":"success","learning_id":"ln_01"}',
    ]
    chunks, error = await run(flat, learning_id=None)
    assert error is None
    assert [d.get("content") for d in deltas(chunks)[1:3]] == ["Hello ", "world"]
    assert chunks[-1]["nuclia"]["learning_id"] == "ln_01"
    assert "usage" not in chunks[-1]


async def test_answer_json_alone_becomes_the_content() -> None:
    lines = [line(ns.JSONAskResponseItem(object={"a": 1})),
             line(ns.StatusAskResponseItem(code="0", status="success"))]
    chunks, error = await run(lines)
    assert error is None
    assert deltas(chunks)[1] == {"content": '{"a":1}'}


async def test_structured_the_json_is_the_content_and_prose_is_not_sent() -> None:
    chunks, error = await run(normal_answer(), structured=True)
    assert error is None
    answer = Answer()
    for data in chunks:
        answer.add_chunk(data)
    assert orjson.loads(answer.text) == {"renews": "yearly"}
    assert not any("renews every" in str(d) for d in deltas(chunks))  # the prose
    assert "".join(answer.reasoning) == "Think first. "  # reasoning as without a schema
    assert chunks[-1]["nuclia"]["answer_json"] == {"renews": "yearly"}
    assert chunks[-1]["nuclia"]["citations"]


async def test_structured_without_json_is_an_honest_error() -> None:
    lines = [line(ns.StatusAskResponseItem(code="-3", status="no_retrieval_data")),
             line(ns.AnswerAskResponseItem(text="Not enough data to answer this."))]
    chunks, error = await run(lines, structured=True)
    assert isinstance(error, UpstreamError)
    assert "JSON that response_format asked for" in error.message
    assert "no_retrieval_data" in error.message
    assert error.detail == "Not enough data to answer this."  # for the log only
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks)


def test_structured_sync_response() -> None:
    sync = {"answer": "Prose.", "answer_json": {"a": [1]}, "status": "success",
            "retrieval_results": {"resources": {}}}
    completion = completion_from_sync(sync, backend=BACKEND, cid="c", model="m", created=1,
                                      structured=True)
    message = completion["choices"][0]["message"]
    assert message["content"] == '{"a":[1]}' and message["nuclia"]["answer_json"] == {"a": [1]}
    with pytest.raises(UpstreamError, match="response_format"):
        completion_from_sync({**sync, "answer_json": None}, backend=BACKEND, cid="c",
                             model="m", created=1, structured=True)


@pytest.mark.parametrize(("code", "status", "flag"), [("-2", "no_context", "no_context"),
                                                      ("-3", "no_retrieval_data",
                                                       "no_retrieval_data")])
async def test_no_context_and_no_retrieval_finish_normally(code: str, status: str,
                                                           flag: str) -> None:
    lines = [line(ns.StatusAskResponseItem(code=code, status=status)),
             line(ns.AnswerAskResponseItem(text="Not enough data to answer this.")),
             line(ns.RetrievalAskResponseItem(results=ns.KnowledgeboxFindResults(resources={}),
                                              best_matches=[]))]
    chunks, error = await run(lines)
    assert error is None
    assert deltas(chunks)[1] == {"content": "Not enough data to answer this."}
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["nuclia"][flag] is True
    assert chunks[-1]["nuclia"]["status"] == status
    assert "usage" not in chunks[-1]  # no metadata: the pipeline estimates


async def test_error_status_raises_after_the_answers_so_far() -> None:
    lines = [line(ns.AnswerAskResponseItem(text="Partial ")),
             line(ns.RetrievalAskResponseItem(results=results(), best_matches=[])),
             line(ns.StatusAskResponseItem(code="-1", status="error", details="LLM down"))]
    chunks, error = await run(lines)
    assert deltas(chunks)[1] == {"content": "Partial "}
    assert not any(c["choices"][0]["finish_reason"] for c in chunks)
    assert isinstance(error, UpstreamError) and not isinstance(error, UpstreamProtocolError)
    assert BACKEND in error.message and "LLM down" not in error.message
    assert error.detail == "LLM down"  # for the log only
    assert error.status == 502


async def test_error_status_by_code_alone() -> None:
    lines = [b'{"item":{"type":"status","code":"-1","status":""}}']
    _, error = await run(lines)
    assert isinstance(error, UpstreamError)


async def test_error_item_raises() -> None:
    lines = [line(ns.AnswerAskResponseItem(text="A")),
             line(ns.ErrorAskResponseItem(error="boom"))]
    chunks, error = await run(lines)
    assert len(chunks) == 2
    assert isinstance(error, UpstreamError) and "boom" not in error.message
    assert BACKEND in error.message and error.detail == "boom"


@pytest.mark.parametrize("bad", [b'{"item": {"type": "answer", "text": ',
                                 b"[1, 2]", b'{"item": {"text": "x"}}', b'{"other": 1}',
                                 b'{"item": {"type": "answer"}}',
                                 b'{"item": {"type": "answer", "text": 5}}'])
async def test_malformed_line_raises_protocol_error(bad: bytes) -> None:
    chunks, error = await run([line(ns.AnswerAskResponseItem(text="ok")), bad])
    assert deltas(chunks)[1] == {"content": "ok"}
    assert isinstance(error, UpstreamProtocolError) and BACKEND in error.message


async def test_closing_early_raises_protocol_error() -> None:
    chunks, error = await run([line(ns.AnswerAskResponseItem(text="Half an "))])
    assert deltas(chunks)[1] == {"content": "Half an "}
    assert isinstance(error, UpstreamProtocolError)
    assert "before the answer finished" in error.message


async def test_empty_body_raises_after_the_role_chunk() -> None:
    chunks, error = await run([])
    assert deltas(chunks) == [{"role": "assistant", "content": ""}]
    assert isinstance(error, UpstreamProtocolError)


async def test_unknown_item_types_are_skipped_with_a_debug_event() -> None:
    lines = [b'{"item":{"type":"hologram","data":1}}', *normal_answer()]
    with capture_logs() as logs:
        chunks, error = await run(lines)
    assert error is None
    assert [d.get("content") for d in deltas(chunks)[2:5]] == ANSWERS
    skipped = [e for e in logs if e["event"] == "nuclia_item_skipped"]
    assert skipped == [{"event": "nuclia_item_skipped", "backend": BACKEND,
                        "item_type": "hologram", "log_level": "debug"}]


async def test_empty_answer_items_send_no_chunk() -> None:
    lines = [line(ns.AnswerAskResponseItem(text="")),
             line(ns.StatusAskResponseItem(code="0", status="success"))]
    chunks, _ = await run(lines)
    assert len(chunks) == 2


def test_sources_follow_best_matches_and_are_capped() -> None:
    found = find_results("q")
    order = list(reversed(found["best_matches"]))
    sources = summarise_retrieval(found, [{"id": p} for p in order])
    assert [s["paragraph_id"] for s in sources] == order
    assert summarise_retrieval(None) == [] and summarise_retrieval({"resources": 3}) == []


def visible(chunks: list[dict[str, Any]]) -> bytes:
    return b"".join(orjson.dumps(c) for c in chunks)


def body_of(lines: list[bytes]) -> bytes:
    return b"".join(item + b"\n" for item in lines)


async def split_run(body: bytes, cuts: list[int]) -> tuple[bytes, str | None]:
    reads = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]
    out: list[dict[str, Any]] = []
    error = None
    try:
        async for data in translate_ask_stream(iter_lines(aiter_of(reads)), backend=BACKEND,
                                               cid="c", model="m", created=1):
            out.append(data)
    except UpstreamError as exc:
        error = exc.message
    return visible(out), error


UNICODE = [line(ns.AnswerAskResponseItem(text=t)) for t in ("Réponse ", "日本語 ", "🎉")]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(["normal", "unicode", "error", "cut"]), st.data())
async def test_any_split_of_the_byte_stream_gives_identical_output(
    kind: str, data: st.DataObject
) -> None:
    lines = {
        "normal": normal_answer(),
        "unicode": [*UNICODE, line(ns.StatusAskResponseItem(code="0", status="success"))],
        "error": [*UNICODE, line(ns.ErrorAskResponseItem(error="boom"))],
        "cut": UNICODE,
    }[kind]
    body = body_of(lines)
    if data.draw(st.booleans()):
        body = body.replace(b"\n", b"\r\n")
    if data.draw(st.booleans()):
        body = body.rstrip(b"\n")  # a missing trailing newline
    cuts = sorted(data.draw(st.lists(st.integers(0, len(body)), max_size=12)))
    expected = await split_run(body, [])
    assert await split_run(body, cuts) == expected
    one_byte_reads = await split_run(body, list(range(1, len(body))))
    assert one_byte_reads == expected


def test_completion_from_sync_response() -> None:
    found = results()
    sync = ns.SyncAskResponse(
        answer="The answer.", reasoning="Because.", status="success",
        retrieval_results=found, retrieval_best_matches=[], learning_id="lid-9",
        citations={found.best_matches[0]: [[0, 3]]},
        metadata=ns.SyncAskMetadata(tokens=ns.AskTokens(input=10, output=3)),
    )
    data = orjson.loads(sync.model_dump_json())
    completion = completion_from_sync(data, backend=BACKEND, cid="c", model="m", created=1)
    message = completion["choices"][0]["message"]
    assert message["content"] == "The answer." and message["reasoning_content"] == "Because."
    assert message["nuclia"]["learning_id"] == "lid-9"
    assert message["nuclia"]["status_code"] == "0"
    assert len(message["nuclia"]["sources"]) == 6
    assert completion["usage"]["total_tokens"] == 13


def test_sync_error_status_raises() -> None:
    data = {"answer": "", "status": "error", "error_details": "LLM down",
            "retrieval_results": {"resources": {}}}
    with pytest.raises(UpstreamError, match="could not generate") as failed:
        completion_from_sync(data, backend=BACKEND, cid="c", model="m", created=1)
    assert failed.value.detail == "LLM down" and "LLM down" not in failed.value.message
    with pytest.raises(UpstreamProtocolError):
        completion_from_sync([], backend=BACKEND, cid="c", model="m", created=1)
