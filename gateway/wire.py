"""OpenAI wire models at the edge: the validated chat request and the chunk/completion shapes.

The request is validated with pydantic but unknown fields are kept (``extra="allow"``) so new
OpenAI parameters reach the upstream untouched. Responses are built as plain dicts and
serialised with orjson: they are on the hot path and need no validation.
"""

from __future__ import annotations

import time
from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gateway.errors import InvalidRequest


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str = Field(min_length=1)
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")

    include_usage: bool | None = None


class ChatRequest(BaseModel):
    """The fields the gateway itself reads; everything else rides along in ``model_extra``."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1)
    messages: list[Message] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    n: int | None = Field(default=None, ge=1)
    user: str | None = None
    # read by a backend or the cache: typed here, so a wrong type is a 400 naming it
    top_p: float | None = Field(default=None, ge=0, le=1)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    seed: int | None = None
    stop: str | list[str] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None
    modalities: list[str] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    logit_bias: dict[str, float] | None = None
    metadata: dict[str, str] | None = None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def answer_token_budget(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


def json_body(raw: bytes) -> dict[str, Any]:
    """A request body that must be one JSON object, else a 400 saying what is wrong."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"We could not parse the JSON body of your request: {exc}") from None
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    return body


def parse_chat_request(raw: bytes) -> tuple[dict[str, Any], ChatRequest]:
    """Decode the body once, validate it, and return (the raw dict to forward, the typed view)."""
    body = json_body(raw)
    try:
        chat = ChatRequest.model_validate(body)
    except ValidationError as exc:
        raise validation_error(exc) from None
    return body, chat


# the names pydantic puts in an error's location for the member of a union it tried
_UNION_MEMBERS = frozenset({"str", "int", "float", "bool", "dict", "list", "none"})


def validation_error(exc: ValidationError) -> InvalidRequest:
    """A request model's first validation error as the 400 that names its parameter."""
    first = exc.errors(include_url=False)[0]
    param = ".".join(str(p) for p in first["loc"] if p not in _UNION_MEMBERS
                     and "[" not in str(p)) or None
    missing = first["type"] == "missing"
    message = (
        f"Missing required parameter: '{param}'."
        if missing
        else f"Invalid value for '{param}': {first['msg']}."
    )
    return InvalidRequest(message, param=param, code="missing_required_parameter"
                          if missing else "invalid_value")


def completion_id() -> str:
    return f"chatcmpl-{time.time_ns():x}"


def chunk(
    cid: str,
    model: str,
    created: int,
    delta: dict[str, Any],
    finish_reason: str | None = None,
) -> dict[str, Any]:
    return {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
    }


def usage_chunk(cid: str, model: str, created: int, usage: dict[str, Any]) -> dict[str, Any]:
    """The final chunk OpenAI sends when ``stream_options.include_usage`` is set."""
    return {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [],
        "usage": usage,
    }


def usage_dict(prompt: int, completion: int, *, estimated: bool = False) -> dict[str, Any]:
    usage: dict[str, Any] = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }
    if estimated:
        usage["estimated"] = True
    return usage


def sse_event(payload: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"
