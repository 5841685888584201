"""Sinks: the Inkeep Analytics payload (tool folding, ids, properties), the signed webhook,
and how HTTP outcomes map to retryable and permanent errors (real fake server)."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from pydantic import SecretStr, ValidationError

from gateway.analytics.feedback import forward_feedback
from gateway.analytics.sinks import (
    Delivery,
    InkeepAnalyticsSink,
    WebhookSink,
    fit,
    fold_messages,
    inkeep_payload,
    message_ids,
    retryable,
    text_of,
)
from gateway.config import SinkConfig
from gateway.errors import (
    InvalidRequest,
    UpstreamError,
    UpstreamRateLimited,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from gateway.exchange import ExchangeRecord
from gateway.testing.fake_analytics import AnalyticsState, create_fake_analytics_app
from gateway.testing.server import run_server
from tests.analytics_records import record

API_KEY = "ink-analytics-secret"
TOOL_HISTORY: list[dict[str, Any]] = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": [{"type": "text", "text": "Weather"},
                                 {"type": "image_url", "image_url": {"url": "x"}},
                                 {"type": "text", "text": "in Paris?"}]},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function",
         "function": {"name": "weather", "arguments": '{"city":"Paris"}'}}]},
    {"role": "tool", "tool_call_id": "c1", "content": "18C, sunny"},
    {"role": "user", "content": "And tomorrow?"},
]


def test_text_of_flattens_content_parts() -> None:
    assert text_of("plain") == "plain"
    assert text_of(None) == ""
    assert text_of([{"type": "text", "text": "a"}, {"type": "image_url"}, "b"]) == "a\nb"


def test_tool_messages_are_folded_into_the_assistant_message() -> None:
    folded = fold_messages(TOOL_HISTORY)
    assert [m["role"] for m in folded] == ["system", "user", "assistant", "user"]
    assert folded[1]["content"] == "Weather\nin Paris?"
    assert folded[2]["content"] == (
        '[tool call] weather({"city":"Paris"})\n[tool result] 18C, sunny')


def test_a_tool_message_without_an_assistant_before_it_is_dropped() -> None:
    folded = fold_messages([{"role": "tool", "content": "x"}, {"role": "user", "content": "q"},
                            {"role": "developer", "content": "d"}])
    assert folded == [{"role": "user", "content": "q"}, {"role": "system", "content": "d"}]


def test_inkeep_payload_shape() -> None:
    rec = record(request_id="req1", messages=TOOL_HISTORY, answer="Rain.", user="u-42",
                 conversation_id="conv-7", cached=True,
                 extensions={"citations": [{"url": "https://x"}]})
    body = inkeep_payload(rec)
    assert body["id"] == "conv-7" and body["type"] == "openai"
    assert all(m["role"] != "tool" for m in body["messages"])
    assert body["messages"][-1] == {"id": "req1-assistant", "role": "assistant",
                                    "content": "Rain."}
    assert body["messages"][-2]["id"] == "req1-user"  # the turn's user message
    assert body["userProperties"] == {"id": "u-42"}
    props = body["properties"]
    assert props["model"] == "qa" and props["team"] == "alpha" and props["backend"] == "inkeep"
    assert props["cached"] is True and props["request_id"] == "req1"
    assert props["latency_ms"] == 12.5 and props["finish_reason"] == "stop"
    assert props["usage"]["total_tokens"] == 15
    assert props["citations"] == [{"url": "https://x"}]
    # what answered, when a fallback model did after retries
    fallback = inkeep_payload(record(served_model="qa-spare", attempts=3))["properties"]
    assert (fallback["model"], fallback["served_model"], fallback["attempts"]) == (
        "qa", "qa-spare", 3)
    assert "key_1" not in orjson.dumps(body).decode()  # no key ids in analytics


def test_history_message_ids_are_stable_across_turns() -> None:
    turn1 = record(request_id="r1", conversation_id="c", messages=TOOL_HISTORY[:2])
    turn2 = record(request_id="r2", conversation_id="c", messages=[
        *TOOL_HISTORY[:2], {"role": "assistant", "content": "Hello there."},
        {"role": "user", "content": "More"}])
    ids1 = [m["id"] for m in inkeep_payload(turn1)["messages"]]
    ids2 = [m["id"] for m in inkeep_payload(turn2)["messages"]]
    assert ids1[0] == ids2[0]  # the system message
    assert ids2[-1] == "r2-assistant" and ids2[-2] == "r2-user"
    assert len(set(ids2)) == len(ids2)


def test_without_a_conversation_id_each_request_is_its_own_conversation() -> None:
    body = inkeep_payload(record(request_id="abc"))
    assert body["id"] == "conv-abc"
    assert "userProperties" not in body
    assert message_ids("abc") == {"user": "abc-user", "assistant": "abc-assistant"}


def test_an_error_without_text_says_so() -> None:
    rec = record(answer="", outcome="error", status=502,
                 error={"error": {"message": "upstream down", "type": "api_error"}})
    assert inkeep_payload(rec)["messages"][-1]["content"] == "[error] upstream down"


def test_fit_drops_the_oldest_history_to_stay_under_the_limit() -> None:
    messages = [{"role": "system", "content": "s"}] + [
        {"role": "user", "content": "x" * 1000} for _ in range(10)]
    body = {"id": "c", "type": "openai", "messages": messages}
    data = fit(body, limit=4000)
    kept = orjson.loads(data)["messages"]
    assert len(data) <= 4000 and kept[0]["role"] == "system" and len(kept) == 4


def test_retryable_classification() -> None:
    assert retryable(UpstreamRateLimited("x"))
    assert retryable(UpstreamTimeout("x"))
    assert retryable(UpstreamUnavailable("x"))
    assert not retryable(UpstreamError("x", code="sink_rejected"))


@pytest.fixture
async def analytics() -> AsyncIterator[tuple[str, AnalyticsState]]:
    app = create_fake_analytics_app(API_KEY)
    async with run_server(app) as url:
        yield url, app.state.analytics


def one(rec: ExchangeRecord, key: str) -> list[Delivery]:
    return [Delivery(rec, key, orjson.dumps(rec))]


def ink(url: str, key: str = API_KEY, timeout: float = 2.0) -> InkeepAnalyticsSink:
    return InkeepAnalyticsSink(SinkConfig(name="ink", kind="inkeep", url=url,
                                          api_key=SecretStr(key), timeout=timeout))


async def test_inkeep_sink_posts_an_upsert(analytics: tuple[str, AnalyticsState]) -> None:
    url, state = analytics
    sink = ink(url)
    await sink.start()
    try:
        await sink.deliver(one(record(request_id="t1", conversation_id="cv"), "idem-1"))
        await sink.deliver(one(record(request_id="t2", conversation_id="cv", messages=[
            {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there."},
            {"role": "user", "content": "Again"}]), "idem-2"))
    finally:
        await sink.aclose()
    got = state.on("/conversations")
    assert [r.key for r in got] == ["idem-1", "idem-2"]
    assert got[0].headers["authorization"] == f"Bearer {API_KEY}"
    stored = state.conversations["cv"]["messages"]
    assert [m["content"] for m in stored] == ["Hi", "Hello there.", "Again", "Hello there."]


async def test_http_outcomes_map_to_errors(analytics: tuple[str, AnalyticsState]) -> None:
    url, state = analytics
    sink = ink(url, timeout=0.3)
    try:
        state.faults.fail_next(1, 500)
        with pytest.raises(UpstreamUnavailable):
            await sink.deliver(one(record(), "k"))
        state.faults.fail_next(1, 429)
        with pytest.raises(UpstreamRateLimited) as limited:
            await sink.deliver(one(record(), "k"))
        assert limited.value.headers.get("retry-after") == "0"
        state.faults.fail_next(1, 500, hang=1.0)
        with pytest.raises(UpstreamTimeout):
            await sink.deliver(one(record(), "k"))
        wrong = ink(url, key="wrong")
        with pytest.raises(UpstreamError) as refused:
            await wrong.deliver(one(record(), "k"))
        await wrong.aclose()
        assert not retryable(refused.value) and "wrong" not in refused.value.message
    finally:
        await sink.aclose()
    unreachable = ink("http://127.0.0.1:9")
    with pytest.raises(UpstreamUnavailable):
        await unreachable.deliver(one(record(), "k"))
    await unreachable.aclose()


async def test_webhook_is_signed(analytics: tuple[str, AnalyticsState]) -> None:
    url, state = analytics
    sink = WebhookSink(SinkConfig(name="hook", kind="webhook", url=url + "/hook",
                                  secret=SecretStr("s3cret")))
    rec = record(request_id="w1")
    await sink.deliver(one(rec, "idem-w"))
    await sink.aclose()
    [got] = state.on("/hook")
    assert got.key == "idem-w" and got.body["request_id"] == "w1"
    expected = hmac.new(b"s3cret", got.raw, hashlib.sha256).hexdigest()
    assert got.headers["x-gateway-signature"] == f"sha256={expected}"
    assert got.headers["x-gateway-timestamp"].isdigit()
    assert "s3cret" not in got.raw.decode()


async def test_webhook_batch_is_one_signed_array(analytics: tuple[str, AnalyticsState]) -> None:
    url, state = analytics
    sink = WebhookSink(SinkConfig(name="hook", kind="webhook", url=url + "/hook",
                                  secret=SecretStr("s3cret"), batch=10))
    first_record, second_record = record(request_id="b1"), record(request_id="b2")
    await sink.deliver([Delivery.of(first_record), Delivery.of(second_record)])
    await sink.aclose()
    first, second = state.on("/hook")
    assert [first.body["request_id"], second.body["request_id"]] == ["b1", "b2"]
    assert [first.key, second.key] == ["gw-b1", "gw-b2"]
    assert first.headers["x-gateway-batch"] == "2" and state.batches == [2]
    expected = hmac.new(b"s3cret", first.raw, hashlib.sha256).hexdigest()
    assert first.headers["x-gateway-signature"] == f"sha256={expected}"


def test_only_webhooks_take_batches() -> None:
    with pytest.raises(ValidationError, match="only webhook sinks take batches"):
        SinkConfig(name="ink", kind="inkeep", url="http://x", batch=5)


async def test_feedback_is_validated_and_forwarded(
        analytics: tuple[str, AnalyticsState]) -> None:
    url, state = analytics
    sink = ink(url)
    try:
        reply = await forward_feedback(sink, {
            "type": "negative", "messageId": "r1-assistant",
            "reasons": ["inaccurate", {"label": "too_long", "details": "way"}],
            "userProperties": {"id": "u1"}})
        assert reply["messageId"] == "r1-assistant"
        [got] = state.on("/feedback")
        assert got.body["reasons"] == [{"label": "inaccurate"},
                                       {"label": "too_long", "details": "way"}]
        with pytest.raises(InvalidRequest) as bad:
            await forward_feedback(sink, {"type": "meh", "messageId": "x"})
        assert bad.value.param == "type"
        with pytest.raises(InvalidRequest) as missing:
            await forward_feedback(sink, {"type": "positive"})
        assert missing.value.param == "messageId"
        with pytest.raises(InvalidRequest):
            await forward_feedback(sink, {"type": "positive", "messageId": "x", "extra": 1})
    finally:
        await sink.aclose()
