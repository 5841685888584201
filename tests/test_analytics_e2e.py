"""Metering, mirroring and feedback through the assembled gateway (real uvicorn, the real openai
SDK, the fake Inkeep upstream and the fake Analytics API): what a team sees end to end."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from gateway.testing.fake_analytics import AnalyticsState, create_fake_analytics_app
from gateway.testing.fake_inkeep import answer_text, create_fake_inkeep_app
from gateway.testing.server import run_server
from tests.eventually import eventually
from tests.gateway_fixtures import (
    CLIENT_KEY,
    OTHER_KEY,
    UPSTREAM_KEY,
    async_client,
    gateway_config,
    serve_gateway,
)

ANALYTICS_KEY = "analytics-secret-do-not-leak"
ADMIN_KEY = "admin-secret-e2e"
HOOK_SECRET = "hook-secret-do-not-leak"


def ask(text: str) -> list[Any]:
    return [{"role": "system", "content": "Be brief."}, {"role": "user", "content": text}]


@pytest.fixture
async def setup(tmp_path: Path) -> AsyncIterator[tuple[str, AnalyticsState]]:
    sink_app = create_fake_analytics_app(ANALYTICS_KEY)
    async with run_server(create_fake_inkeep_app(api_key=UPSTREAM_KEY)) as upstream, \
            run_server(sink_app) as sink_url:
        extra = f"""
            cache: {{default: {{enabled: true, ttl: 60}}}}
            analytics:
              sinks:
                - {{name: ink, kind: inkeep, url: "{sink_url}", api_key: {ANALYTICS_KEY}}}
                - {{name: hook, kind: webhook, url: "{sink_url}/hook", secret: {HOOK_SECRET}}}
              outbox: {{spool_dir: outbox, shutdown_grace: 2}}
        """
        config = gateway_config(upstream, base_dir=tmp_path, extra=extra)
        server = config.server.model_copy(update={"admin_key": SecretStr(ADMIN_KEY)})
        config = config.model_copy(update={"server": server})
        async with serve_gateway(config) as url:
            yield url, sink_app.state.analytics


async def test_every_exchange_is_mirrored_metered_and_can_get_feedback(
    setup: tuple[str, AnalyticsState],
) -> None:
    url, sink = setup
    client = async_client(url)
    plain = await client.chat.completions.with_raw_response.create(
        model="qa", messages=ask("what is a gateway?"),
        extra_headers={"x-conversation-id": "conv-42", "x-end-user-id": "user-7"})
    reply = plain.parse()
    message_id = plain.headers["x-gateway-message-id"]
    assert reply.choices[0].message.content == answer_text("what is a gateway?")

    stream = await client.chat.completions.create(
        model="rag", messages=ask("stream it"), stream=True,
        stream_options={"include_usage": True})
    streamed_usage = None
    async for chunk in stream:
        streamed_usage = chunk.usage or streamed_usage
    hit = await client.chat.completions.with_raw_response.create(
        model="qa", messages=ask("what is a gateway?"))
    assert hit.headers["x-gateway-cache"] == "hit"
    await client.close()

    # three exchanges: each reaches both sinks once, the conversation id threads the first
    await eventually(lambda: len(sink.on("/conversations")) == 3
                     and len(sink.on("/hook")) == 3)
    conversations = sink.on("/conversations")
    first = conversations[0].body
    assert first["id"] == "conv-42" and first["type"] == "openai"
    assert [m["role"] for m in first["messages"]] == ["system", "user", "assistant"]
    assert first["messages"][-1]["id"] == message_id
    assert first["messages"][-1]["content"] == answer_text("what is a gateway?")
    assert first["properties"]["team"] == "alpha" and first["properties"]["model"] == "qa"
    assert first["userProperties"]["id"] == "user-7"
    assert [c.body["properties"]["cached"] for c in conversations] == [False, False, True]
    hooks = [h.body for h in sink.on("/hook")]
    assert {h["outcome"] for h in hooks} == {"completed"}
    assert len({h["request_id"] for h in hooks}) == 3
    for received in [*conversations, *sink.on("/hook")]:
        for secret in (CLIENT_KEY, UPSTREAM_KEY, HOOK_SECRET, ADMIN_KEY):
            assert secret.encode() not in received.raw

    # feedback on the first answer, by the id its response carried
    async with httpx.AsyncClient(base_url=url) as http:
        given = await http.post("/v1/feedback", json={
            "type": "positive", "messageId": message_id, "reasons": ["accurate"]},
            headers={"authorization": f"Bearer {CLIENT_KEY}"})
        assert given.status_code == 200, given.text
        assert given.json()["messageId"] == message_id
        forwarded = sink.on("/feedback")[-1]
        assert forwarded.key is None or ANALYTICS_KEY not in forwarded.key
        assert forwarded.headers["authorization"] == f"Bearer {ANALYTICS_KEY}"
        assert forwarded.body == {"type": "positive", "messageId": message_id,
                                  "reasons": [{"label": "accurate"}]}

        bad = await http.post("/v1/feedback", json={"type": "meh", "messageId": "x"},
                              headers={"authorization": f"Bearer {CLIENT_KEY}"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "type"
        broken = await http.post("/v1/feedback", content=b"{not json",
                                 headers={"authorization": f"Bearer {CLIENT_KEY}"})
        assert broken.status_code == 400
        anonymous = await http.post("/v1/feedback", json={"type": "positive",
                                                          "messageId": message_id})
        assert anonymous.status_code == 401
        assert anonymous.json()["error"]["code"] == "invalid_api_key"

        # usage, as the admin API serves it, equals what the upstream reported (the hit is
        # counted as a request and a cached answer, with the tokens it replayed)
        async def usage() -> list[dict[str, Any]]:
            got = await http.get("/admin/usage", params={"team": "alpha"},
                                 headers={"authorization": f"Bearer {ADMIN_KEY}"})
            assert got.status_code == 200, got.text
            rows: list[dict[str, Any]] = got.json()["data"]
            return rows

        async def all_three() -> list[dict[str, Any]]:
            rows = await usage()  # the meter writes in the background, about once a second
            return rows if sum(r["requests"] for r in rows) >= 3 else []

        rows = await eventually(all_three)
        assert reply.usage is not None and streamed_usage is not None
        by_model = {r["model"]: r for r in rows}
        assert by_model["qa"]["requests"] == 2 and by_model["qa"]["cached"] == 1
        assert by_model["qa"]["prompt_tokens"] == 2 * reply.usage.prompt_tokens
        assert by_model["rag"]["completion_tokens"] == streamed_usage.completion_tokens
        assert {r["key_id"] for r in rows} == {"test"}

        wrong = await http.get("/admin/usage", params={"since": "yesterday"},
                               headers={"authorization": f"Bearer {ADMIN_KEY}"})
        assert wrong.status_code == 400 and wrong.json()["error"]["param"] == "since"
        refused = await http.get("/admin/usage",
                                 headers={"authorization": f"Bearer {OTHER_KEY}"})
        assert refused.status_code == 401


async def test_feedback_without_an_inkeep_sink_is_a_clear_503() -> None:
    async with run_server(create_fake_inkeep_app(api_key=UPSTREAM_KEY)) as upstream:
        async with serve_gateway(gateway_config(upstream)) as url:
            async with httpx.AsyncClient(base_url=url) as http:
                got = await http.post("/v1/feedback",
                                      json={"type": "negative", "messageId": "m-1"},
                                      headers={"authorization": f"Bearer {CLIENT_KEY}"})
    assert got.status_code == 503
    assert "analytics.sinks" in got.json()["error"]["message"]
