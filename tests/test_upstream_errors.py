"""An upstream's own error text never reaches a client: for 5xx, 429, HTML pages and
mid-stream failures, on both backend kinds, streamed or not, the client gets the gateway's
words (the backend, the upstream's status, the request id) and the log gets the upstream's."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import openai
import pytest
import pytest_asyncio
from structlog.testing import capture_logs

from gateway.config import parse_config
from gateway.testing.configs import config_yaml, static_key
from gateway.testing.fake_inkeep import INTERNAL_DETAIL, create_fake_inkeep_app
from gateway.testing.fake_nuclia import create_fake_nuclia_app
from gateway.testing.server import run_server
from tests.gateway_fixtures import serve_gateway

KEY = "sk-upstream-errors"
KBID = "kb-errors"
LEAKS = (INTERNAL_DETAIL, "svc.cluster.local", "/srv/app", "nginx", "<html",
         "internal-lb-3", "Sample LLM failure", "Sample unexpected failure", "model crashed")


# one gateway and its upstreams for the whole module: each case is one request
pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def gateway() -> AsyncIterator[str]:
    async with run_server(create_fake_inkeep_app()) as inkeep, \
            run_server(create_fake_nuclia_app(kbid=KBID)) as nuclia:
        config = parse_config(config_yaml(
            backends={
                "inkeep": {"kind": "inkeep", "base_url": f"{inkeep}/v1", "requires_key": False},
                "nuclia": {"kind": "nuclia", "base_url": f"{nuclia}/api/v1", "kbid": KBID,
                           "requires_key": False},
            },
            # one attempt per request, and circuits that never open: every case is a failure
            models={"qa": {"backend": "inkeep", "retries": 0},
                    "kb": {"backend": "nuclia", "retries": 0}},
            keys=[static_key(KEY, id="t", team="alpha")],
            extra={"routing": {"circuit": {"failures": 1000, "min_requests": 1000}}}), env={})
        async with serve_gateway(config) as url:
            yield url


FAULTS = [
    ("qa", "[500]", 502), ("qa", "[503]", 502), ("qa", "[429]", 429), ("qa", "[html-502]", 502),
    ("kb", "[500]", 502), ("kb", "[503]", 502), ("kb", "[529]", 502), ("kb", "[530]", 502),
    ("kb", "[429]", 429), ("kb", "[html-502]", 502),
]


async def ask(url: str, model: str, text: str, stream: bool) -> Any:
    messages: Any = [{"role": "user", "content": text}]
    async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0) as client:
        if not stream:
            return await client.chat.completions.create(model=model, messages=messages)
        chunks = await client.chat.completions.create(model=model, messages=messages,
                                                      stream=True)
        async for _ in chunks:
            pass
    return None


def assert_ours(error: openai.APIError, backend: str) -> None:
    message = error.message
    for leak in LEAKS:
        assert leak not in message, message
    assert f"'{backend}'" in message
    assert "Request id: req_" in message


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(("model", "marker", "status"), FAULTS)
async def test_failures_before_the_answer_are_told_in_our_words(
        gateway: str, model: str, marker: str, status: int, stream: bool) -> None:
    with capture_logs() as logs, pytest.raises(openai.APIStatusError) as info:
        await ask(gateway, model, f"question {marker}", stream)
    assert info.value.status_code == status
    assert_ours(info.value, "inkeep" if model == "qa" else "nuclia")
    code = marker.strip("[]").removeprefix("html-")
    assert f"HTTP {code}" in info.value.message
    logged = next(e for e in logs if e["event"] == "upstream_failed")
    assert logged["detail"]  # the upstream's own words went to the log
    assert len(logged["detail"]) <= 500


@pytest.mark.parametrize(("model", "marker"), [
    ("qa", "[midstream-error]"), ("kb", "[llm-error]"), ("kb", "[stream-error]")])
async def test_failures_mid_stream_are_told_in_our_words(
        gateway: str, model: str, marker: str) -> None:
    with capture_logs() as logs, pytest.raises(openai.APIError) as info:
        await ask(gateway, model, f"question {marker}", stream=True)
    assert_ours(info.value, "inkeep" if model == "qa" else "nuclia")
    logged = next(e for e in logs if e["event"] == "upstream_failed")
    assert any(word in logged["detail"] for word in ("crashed", "Sample"))


async def test_a_short_validation_message_is_passed_on(gateway: str) -> None:
    """An upstream's JSON 4xx that says what is wrong with the request still reaches the
    client: it is about the client's own request."""
    with pytest.raises(openai.BadRequestError) as info:
        await ask(gateway, "kb", "question [422]", stream=False)
    assert "rejected the request: Invalid query" in info.value.message
