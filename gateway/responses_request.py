"""A Responses API request (``POST /v1/responses``) translated into the chat request the
pipeline serves.

``input`` (a string, or items: messages with ``input_text``/``output_text``/``input_image``
parts, earlier ``function_call`` and ``function_call_output`` items) becomes ``messages``,
after the stored conversation of ``previous_response_id`` and behind ``instructions`` as the
system message; ``max_output_tokens`` -> ``max_tokens``; function tools (the flat Responses
shape) and ``tool_choice`` -> their chat shapes; ``text.format`` -> ``response_format``;
``temperature``, ``top_p``, ``metadata``, ``user``, ``parallel_tool_calls`` and the
``nuclia`` extension pass on. What cannot be translated is a 400 naming the parameter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gateway.errors import InvalidRequest, UnsupportedParameter
from gateway.wire import ChatRequest, json_body, validation_error

_ROLES = frozenset({"user", "assistant", "system", "developer"})
_TEXT_PARTS = frozenset({"input_text", "output_text", "text"})
# Items a client passes back from an earlier output that carry nothing to send upstream
_SKIPPED_ITEMS = frozenset({"reasoning"})


class TextFormat(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: Literal["text", "json_schema", "json_object"]
    name: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None
    description: str | None = None


class TextOptions(BaseModel):
    model_config = ConfigDict(extra="allow")

    format: TextFormat | None = None


class ResponsesRequest(BaseModel):
    """The fields the gateway reads; the rest (``include``, ``truncation``, ...) is accepted
    and has no effect."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1)
    input: str | list[dict[str, Any]] | None = None
    instructions: str | None = None
    previous_response_id: str | None = Field(default=None, min_length=1)
    stream: bool = False
    store: bool = True
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    metadata: dict[str, str] | None = None
    user: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    text: TextOptions | None = None
    nuclia: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class Translated:
    """A Responses request and the chat request it became."""

    request: ResponsesRequest
    body: dict[str, Any]  # the chat body the pipeline forwards
    chat: ChatRequest
    conversation: list[dict[str, Any]]  # `messages` without the instructions: what is stored


def parse_responses_request(raw: bytes) -> ResponsesRequest:
    body = json_body(raw)
    try:
        return ResponsesRequest.model_validate(body)
    except ValidationError as exc:
        raise validation_error(exc) from None


def translate(request: ResponsesRequest, history: list[dict[str, Any]]) -> Translated:
    """The chat request of `request`, continuing the conversation `history` (the stored one
    of ``previous_response_id``, else [])."""
    if request.input is None and not history:
        raise InvalidRequest("Missing required parameter: 'input'.", param="input",
                             code="missing_required_parameter")
    conversation = [*history, *input_messages(request.input)]
    if not conversation:
        raise InvalidRequest("'input' has no message to answer.", param="input")
    messages = conversation
    if request.instructions:
        messages = [{"role": "system", "content": request.instructions}, *conversation]
    body = _chat_body(request, messages)
    try:
        chat = ChatRequest.model_validate(body)
    except ValidationError as exc:
        raise validation_error(exc) from None
    return Translated(request, body, chat, conversation)


def _chat_body(request: ResponsesRequest, messages: list[dict[str, Any]]) -> dict[str, Any]:
    body: dict[str, Any] = {"model": request.model, "messages": messages,
                            "stream": request.stream}
    if request.stream:
        body["stream_options"] = {"include_usage": True}
    optional = {
        "max_tokens": request.max_output_tokens, "temperature": request.temperature,
        "top_p": request.top_p, "metadata": request.metadata, "user": request.user,
        "parallel_tool_calls": request.parallel_tool_calls, "nuclia": request.nuclia,
        "tools": chat_tools(request.tools), "tool_choice": chat_tool_choice(request.tool_choice),
        "response_format": response_format(request.text),
    }
    body.update((key, value) for key, value in optional.items() if value is not None)
    return body


# -- input -----------------------------------------------------------------------------------


def input_messages(value: str | list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """The input as chat messages: a string is one user message; function calls join the
    assistant message before them."""
    if value is None:
        return []
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    messages: list[dict[str, Any]] = []
    for index, item in enumerate(value):
        kind = item.get("type", "message")
        if kind == "message":
            messages.append(_message(item, index))
        elif kind == "function_call":
            _add_call(messages, _function_call(item, index))
        elif kind == "function_call_output":
            messages.append(_call_output(item, index))
        elif kind not in _SKIPPED_ITEMS:
            raise UnsupportedParameter(
                f"Input items of type '{kind}' are not supported by this gateway: use "
                "messages, function_call and function_call_output items.",
                param=f"input[{index}].type")
    return messages


def _field(item: dict[str, Any], name: str, index: int) -> str:
    value = item.get(name)
    if not isinstance(value, str):
        raise InvalidRequest(f"Invalid value for 'input[{index}].{name}': expected a string.",
                             param=f"input[{index}].{name}", code="invalid_value")
    return value


def _message(item: dict[str, Any], index: int) -> dict[str, Any]:
    role = item.get("role")
    if role not in _ROLES:
        raise InvalidRequest(
            f"Invalid value for 'input[{index}].role': one of {', '.join(sorted(_ROLES))}.",
            param=f"input[{index}].role", code="invalid_value")
    content = item.get("content")
    if isinstance(content, str):
        return {"role": role, "content": content}
    if not isinstance(content, list):
        raise InvalidRequest(f"Invalid value for 'input[{index}].content': a string or a list "
                             "of content parts.", param=f"input[{index}].content",
                             code="invalid_value")
    parts = [_part(part, index, i) for i, part in enumerate(content)]
    if len(parts) == 1 and parts[0]["type"] == "text":
        return {"role": role, "content": parts[0]["text"]}
    return {"role": role, "content": parts}


def _part(part: Any, index: int, position: int) -> dict[str, Any]:
    where = f"input[{index}].content[{position}]"
    kind = part.get("type") if isinstance(part, dict) else None
    if kind in _TEXT_PARTS and isinstance(part.get("text"), str):
        return {"type": "text", "text": part["text"]}
    if kind == "input_image" and isinstance(part.get("image_url"), str):
        image: dict[str, Any] = {"url": part["image_url"]}
        if isinstance(part.get("detail"), str):
            image["detail"] = part["detail"]
        return {"type": "image_url", "image_url": image}
    if kind in (*_TEXT_PARTS, "input_image"):
        raise InvalidRequest(f"Invalid content part '{where}': it lacks its text or image_url.",
                             param=where, code="invalid_value")
    raise UnsupportedParameter(
        f"Content parts of type '{kind or 'unknown'}' are not supported by this gateway: "
        "use input_text, output_text or input_image (by URL).", param=f"{where}.type")


def _function_call(item: dict[str, Any], index: int) -> dict[str, Any]:
    return {"id": _field(item, "call_id", index), "type": "function",
            "function": {"name": _field(item, "name", index),
                         "arguments": _field(item, "arguments", index)}}


def _add_call(messages: list[dict[str, Any]], call: dict[str, Any]) -> None:
    """Calls made together are one assistant message (with its text, when it had some)."""
    last = messages[-1] if messages else None
    if last is not None and last["role"] == "assistant" and \
            (last.get("tool_calls") or isinstance(last.get("content"), str)):
        last.setdefault("tool_calls", []).append(call)
        return
    messages.append({"role": "assistant", "content": None, "tool_calls": [call]})


def _call_output(item: dict[str, Any], index: int) -> dict[str, Any]:
    output = item.get("output")
    if isinstance(output, list):
        output = "".join(_part(part, index, i).get("text", "") for i, part in enumerate(output))
    if not isinstance(output, str):
        raise InvalidRequest(f"Invalid value for 'input[{index}].output': expected a string.",
                             param=f"input[{index}].output", code="invalid_value")
    return {"role": "tool", "tool_call_id": _field(item, "call_id", index), "content": output}


# -- tools and formats -----------------------------------------------------------------------


def chat_tools(tools: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    """Function tools in the chat shape; any other tool type is a 400 naming it."""
    if tools is None:
        return None
    out: list[dict[str, Any]] = []
    for i, tool in enumerate(tools):
        if tool.get("type") != "function":
            raise UnsupportedParameter(
                f"Tools of type '{tool.get('type')}' are not supported by this gateway: only "
                "function tools.", param=f"tools[{i}].type")
        name = tool.get("name")
        if not isinstance(name, str) or not name:
            raise InvalidRequest(f"Missing required parameter: 'tools[{i}].name'.",
                                 param=f"tools[{i}].name", code="missing_required_parameter")
        function = {key: tool[key] for key in ("name", "description", "parameters", "strict")
                    if tool.get(key) is not None}
        out.append({"type": "function", "function": function})
    return out or None


def chat_tool_choice(choice: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
    if choice is None or isinstance(choice, str):
        return choice
    if choice.get("type") == "function" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    if choice.get("type") in ("auto", "none", "required"):
        return str(choice["type"])
    raise UnsupportedParameter("Only 'auto', 'none', 'required' and function tool choices are "
                               "supported.", param="tool_choice")


def response_format(text: TextOptions | None) -> dict[str, Any] | None:
    """``text.format`` as the chat request's ``response_format``."""
    fmt = text.format if text is not None else None
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return {"type": "json_object"}
    if fmt.schema_ is None:
        raise InvalidRequest("Missing required parameter: 'text.format.schema'.",
                             param="text.format.schema", code="missing_required_parameter")
    spec: dict[str, Any] = {"name": fmt.name or "response", "schema": fmt.schema_}
    if fmt.strict is not None:
        spec["strict"] = fmt.strict
    if fmt.description:
        spec["description"] = fmt.description
    return {"type": "json_schema", "json_schema": spec}
