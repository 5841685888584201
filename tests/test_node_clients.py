"""Node clients against a real ``gateway serve --demo``: openai-node and the Vercel AI SDK, on
every demo model, unchanged. Each case runs ``node tests/node/<script>.mjs <case> <model>``,
which prints one JSON object of what the client saw; ``make test`` installs the packages
(``npm ci`` in tests/node)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.demo import DEMO_KEY
from gateway.testing import fake_inkeep, fake_nuclia
from gateway.testing.process import run_gateway

NODE_DIR = Path(__file__).resolve().parent / "node"
MODELS = ["demo-nuclia", "demo-inkeep-qa", "demo-inkeep-agents"]
ANSWERS: dict[str, Callable[[str], str]] = {
    "demo-nuclia": fake_nuclia.answer_text,
    "demo-inkeep-qa": fake_inkeep.answer_text,
    "demo-inkeep-agents": fake_inkeep.answer_text,
}
# the events of a streamed Responses API answer of one text output, in order
RESPONSE_EVENTS = ["response.created", "response.in_progress", "response.output_item.added",
                   "response.content_part.added", "response.output_text.delta",
                   "response.output_text.done", "response.content_part.done",
                   "response.output_item.done", "response.completed"]


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    assert shutil.which("node"), "Node.js is needed: `make test` runs these tests with it"
    assert (NODE_DIR / "node_modules").is_dir(), "run `make test` (npm ci in tests/node)"
    config = tmp_path_factory.mktemp("node") / "gateway.yaml"
    config.write_text("server: {log_level: error, drain_delay: 0}\n")
    with run_gateway(config, args=["--demo"]) as process:
        yield process.url


class Node:
    """Runs one case of a script against the gateway (each test asks a question of its own,
    so demo-nuclia's cache never answers for another test)."""

    def __init__(self, url: str, question: str) -> None:
        self.url = url
        self.question = question

    def __call__(self, script: str, case: str, model: str) -> dict[str, Any]:
        env = {**os.environ, "GATEWAY_BASE_URL": f"{self.url}/v1",
               "GATEWAY_API_KEY": DEMO_KEY, "QUESTION": self.question}
        done = subprocess.run(["node", f"{script}.mjs", case, model], cwd=NODE_DIR, env=env,
                              capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 0, done.stderr
        result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
        assert "thrown" not in result, result["thrown"]
        return result


@pytest.fixture
def node(gateway: str, request: pytest.FixtureRequest) -> Node:
    return Node(gateway, f"{request.node.name}: how often does the contract renew?")


def check_renewal(parsed: Any, expected_answer: str) -> None:
    """The demo upstreams answer with an instance of the schema; its first string is their
    answer (the schema is in openai_client.mjs and ai_sdk.mjs)."""
    assert parsed["answer"] == expected_answer
    assert parsed["period"] == "monthly" and isinstance(parsed["months"], int)
    assert parsed["sources"] and parsed["sources"][0]["title"]


# -- openai-node -----------------------------------------------------------------------------


@pytest.mark.parametrize("model", MODELS)
def test_openai_node_chat(node: Node, model: str) -> None:
    got = node("openai_client", "chat", model)
    assert got["content"] == ANSWERS[model](node.question)
    assert got["finish"] == "stop" and got["model"] == model
    assert got["usage"]["total_tokens"] > 0


@pytest.mark.parametrize("model", MODELS)
def test_openai_node_chat_streamed(node: Node, model: str) -> None:
    got = node("openai_client", "chat-stream", model)
    assert got["content"] == ANSWERS[model](node.question)
    assert got["chunks"] > 2 and got["finish"] == "stop"
    assert got["usage"]["completion_tokens"] > 0


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("case", ["chat-json-schema", "chat-json-schema-stream"])
def test_openai_node_chat_structured(node: Node, model: str, case: str) -> None:
    got = node("openai_client", case, model)
    check_renewal(got["parsed"], ANSWERS[model](node.question))


def test_openai_node_models_list_and_retrieve(node: Node) -> None:
    got = node("openai_client", "models", "demo-nuclia")
    assert set(MODELS) <= set(got["listed"])
    assert got["retrieved"] == {"id": "demo-nuclia", "object": "model"}
    missing = got["missing"]
    assert missing["notFound"] is True and missing["status"] == 404, missing


@pytest.mark.parametrize("model", MODELS)
def test_openai_node_responses(node: Node, model: str) -> None:
    got = node("openai_client", "responses", model)
    assert got["text"] == ANSWERS[model](node.question)
    assert got["object"] == "response" and got["status"] == "completed"
    assert got["usage"]["output_tokens"] > 0


@pytest.mark.parametrize("model", MODELS)
def test_openai_node_responses_streamed(node: Node, model: str) -> None:
    got = node("openai_client", "responses-stream", model)
    assert got["text"] == got["completedText"] == ANSWERS[model](node.question)
    seen = [kind for i, kind in enumerate(got["types"])
            if i == 0 or kind != got["types"][i - 1]]  # the deltas as one
    assert [k for k in seen if k in RESPONSE_EVENTS] == RESPONSE_EVENTS
    assert got["status"] == "completed" and got["usage"]["output_tokens"] > 0


# -- the Vercel AI SDK -----------------------------------------------------------------------


# the default provider `createOpenAI(...)(model)` posts to /v1/responses, `.chat(model)` to chat
API_PATHS = [pytest.param("", id="responses-api"), pytest.param("chat-", id="chat-api")]


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("path", API_PATHS)
def test_ai_sdk_generate_text(node: Node, model: str, path: str) -> None:
    got = node("ai_sdk", f"{path}generate", model)
    assert got["text"] == ANSWERS[model](node.question)
    assert got["finish"] == "stop" and got["usage"]["outputTokens"] > 0


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("path", API_PATHS)
def test_ai_sdk_stream_text(node: Node, model: str, path: str) -> None:
    got = node("ai_sdk", f"{path}stream", model)
    assert got["errors"] == []
    assert got["text"] == ANSWERS[model](node.question)
    assert got["parts"] > 1 and got["finish"] == "stop"


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("path", API_PATHS)
def test_ai_sdk_output_object(node: Node, model: str, path: str) -> None:
    got = node("ai_sdk", f"{path}object", model)
    check_renewal(got["output"], ANSWERS[model](node.question))
