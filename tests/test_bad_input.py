"""Whatever a client sends to /v1/chat/completions or /v1/responses, the gateway answers 2xx
or a 4xx OpenAI envelope, never a 5xx:
property-based, over request bodies built from valid ones with any field given any JSON
value, against the demo's sample upstreams of every backend kind (Inkeep, the agents API
through the OpenAI-compatible path, Nuclia) in a real `gateway serve --demo`."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.demo import DEMO_KEY
from gateway.testing.process import run_gateway

pytestmark = pytest.mark.slow

MODELS = ["demo-inkeep-qa", "demo-inkeep-agents", "demo-nuclia"]
FIELDS = [
    "messages", "stream", "stream_options", "max_tokens", "max_completion_tokens",
    "temperature", "top_p", "n", "stop", "tools", "tool_choice", "parallel_tool_calls",
    "response_format", "modalities", "audio", "user", "metadata", "seed", "logprobs",
    "top_logprobs", "logit_bias", "presence_penalty", "frequency_penalty", "nuclia",
    "reasoning", "reasoning_effort", "store", "service_tier", "prediction", "functions",
    "function_call", "model",
]
ROLES = ["system", "developer", "user", "assistant", "tool", "function", "", "robot"]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**40, 2**40)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner,
                                                                max_size=4),
    max_leaves=12,
)
parts = st.one_of(
    st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url", "input_audio", "x"]),
                           "text": json_values}),
    json_values,
)
messages = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(ROLES) | json_values},
        optional={"content": st.text(max_size=30) | st.lists(parts, max_size=3) | json_values,
                  "tool_calls": json_values, "tool_call_id": json_values, "name": json_values},
    ),
    max_size=4,
)
overrides = st.dictionaries(
    st.sampled_from(FIELDS),
    st.one_of(json_values, messages),
    max_size=4,
)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    config: Path = tmp_path_factory.mktemp("demo") / "gateway.yaml"
    config.write_text("server: {log_level: error, drain_delay: 0}\n")
    with run_gateway(config, args=["--demo"]) as gateway:
        yield gateway.url


def check(reply: httpx.Response) -> None:
    assert reply.status_code < 500, (reply.status_code, reply.text)
    if reply.status_code >= 400:
        error = reply.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert isinstance(error["message"], str) and error["message"]


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(model=st.sampled_from(MODELS), changes=overrides)
def test_any_body_gets_a_2xx_or_a_4xx_envelope(demo: str, model: str,
                                               changes: dict[str, Any]) -> None:
    body: dict[str, Any] = {"model": model,
                            "messages": [{"role": "user", "content": "hello"}], **changes}
    check(posted(demo, "/v1/chat/completions", body))


def posted(demo: str, path: str, body: dict[str, Any]) -> httpx.Response:
    """`body` posted to `path` as the demo key, its reply read whole (streamed or not)."""
    with httpx.Client(base_url=demo, timeout=30,
                      headers={"authorization": f"Bearer {DEMO_KEY}"}) as client:
        with client.stream("POST", path, content=orjson.dumps(body),
                           headers={"content-type": "application/json"}) as reply:
            reply.read()
    return reply


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=200) | json_values.map(orjson.dumps))
def test_bodies_that_are_not_chat_requests_get_a_400(demo: str, raw: bytes) -> None:
    reply = httpx.post(f"{demo}/v1/chat/completions", content=raw, timeout=30,
                       headers={"authorization": f"Bearer {DEMO_KEY}",
                                "content-type": "application/json"})
    check(reply)
    assert reply.status_code == 400


RESPONSES_FIELDS = [
    "input", "instructions", "stream", "store", "previous_response_id", "max_output_tokens",
    "temperature", "top_p", "metadata", "user", "tools", "tool_choice",
    "parallel_tool_calls", "text", "reasoning", "include", "truncation", "nuclia", "model",
]
ITEM_TYPES = ["message", "function_call", "function_call_output", "reasoning",
              "item_reference", "computer_call", ""]
PART_TYPES = ["input_text", "output_text", "input_image", "input_file", "refusal", "x"]
items = st.lists(
    st.fixed_dictionaries(
        {},
        optional={"type": st.sampled_from(ITEM_TYPES) | json_values,
                  "role": st.sampled_from(ROLES) | json_values,
                  "content": st.text(max_size=20) | st.lists(
                      st.fixed_dictionaries({"type": st.sampled_from(PART_TYPES)},
                                            optional={"text": json_values,
                                                      "image_url": json_values}),
                      max_size=3) | json_values,
                  "call_id": json_values, "name": json_values, "arguments": json_values,
                  "output": json_values},
    ),
    max_size=4,
)
response_overrides = st.dictionaries(
    st.sampled_from(RESPONSES_FIELDS),
    st.one_of(json_values, items,
              st.fixed_dictionaries({"format": st.fixed_dictionaries(
                  {"type": st.sampled_from(["text", "json_schema", "json_object", "x"])},
                  optional={"schema": json_values, "name": json_values})}),
              st.lists(st.fixed_dictionaries({"type": st.sampled_from(["function", "x"])},
                                             optional={"name": json_values,
                                                       "parameters": json_values}),
                       max_size=2)),
    max_size=4,
)


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(model=st.sampled_from(MODELS), changes=response_overrides)
def test_any_responses_body_gets_a_2xx_or_a_4xx_envelope(demo: str, model: str,
                                                         changes: dict[str, Any]) -> None:
    body: dict[str, Any] = {"model": model, "input": "hello", **changes}
    check(posted(demo, "/v1/responses", body))


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=200) | json_values.map(orjson.dumps))
def test_bodies_that_are_not_responses_requests_get_a_400(demo: str, raw: bytes) -> None:
    reply = httpx.post(f"{demo}/v1/responses", content=raw, timeout=30,
                       headers={"authorization": f"Bearer {DEMO_KEY}",
                                "content-type": "application/json"})
    check(reply)
    assert reply.status_code == 400
