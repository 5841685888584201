"""A local fake of Inkeep's chat completions (and of its agents API), speaking the real SSE format.

Two dialects, as in ``shared/specs/UPSTREAMS.md``:

- ``POST /v1/chat/completions`` — Inkeep's OpenAI-compatible API: chunks carry ``model``, the
  stream ends in ``data: [DONE]``, usage on a final chunk when ``stream_options.include_usage``.
- ``POST /run/v1/chat/completions`` — the agents API: no ``model``, no ``usage``, no ``[DONE]``
  (the stream ends on the ``finish_reason: "stop"`` chunk); errors are problem+json.

The answer is derived from the last user message, so tests can predict it. Markers in that
message select a scenario:

    [401] [403] [404] [429] [500] [503]  that HTTP error before the stream (the 429 and
                the 5xx bodies name internal hosts and paths, as real ones can)
    [html-502]  a proxy's HTML error page
    [problem]   a 400 application/problem+json body
    [slow]      0.2 s between chunks, or before a whole answer    [hang]  no answer at all
    [cut]       the stream stops mid-answer, no finish_reason, no [DONE]
    [midstream-error]  an error event after two chunks
    [tools]     a provideLinks tool call (only if the request declared tools)
    [chunks=N]  N content chunks (default 10)

``response_format`` is honoured: a ``json_schema`` request is answered with an instance of the
schema (`gateway.testing.schema_answer`), ``json_object`` with ``{"answer": ...}``.

Every request is counted on ``app.state.calls``; the last body and headers are kept.
``app.state.faults`` (`gateway.testing.faults.Faults`) injects failures whatever the question.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from gateway.testing.faults import Faults
from gateway.testing.schema_answer import SchemaError, schema_instance

SAMPLE_NOTE = "(sample answer from the gateway's local fake Inkeep upstream)"
_CHUNKS = re.compile(r"\[chunks=(\d+)\]")
_STATUS = re.compile(r"\[(401|403|404|429|500|503)\]")


def _last_user_text(body: dict[str, Any]) -> str:
    for message in reversed(body.get("messages") or []):
        if message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, list):
                return " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
            return str(content or "")
    return ""


def answer_text(question: str) -> str:
    """The fake's deterministic answer for a question."""
    return f"{SAMPLE_NOTE} You asked: {question.strip()}"


def split_answer(text: str, pieces: int) -> list[str]:
    pieces = max(1, pieces)
    size = max(1, -(-len(text) // pieces))
    return [text[i:i + size] for i in range(0, len(text), size)]


def formatted(response_format: Any, text: str) -> str:
    """The answer in the format asked for: an instance of a ``json_schema`` (its first
    free-form string is the answer), ``{"answer": ...}`` for ``json_object``, else the text."""
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind == "json_schema":
        schema = (response_format.get("json_schema") or {}).get("schema")
        if not isinstance(schema, dict):
            raise SchemaError("json_schema.schema must be an object")
        return orjson.dumps(schema_instance(schema, text=text)).decode()
    if kind == "json_object":
        return orjson.dumps({"answer": text}).decode()
    return text


def _tokens(text: str) -> int:
    return max(1, len(text) // 4)


# What real upstream errors carry and a client must never see.
INTERNAL_DETAIL = "at worker-7.svc.cluster.local:8443 (/srv/app/handlers.py:512)"
HTML_502 = (b"<html><head><title>502 Bad Gateway</title></head><body><center><h1>502 Bad "
            b"Gateway</h1></center><hr><center>nginx/1.25.3 (internal-lb-3.prod.local)"
            b"</center></body></html>")


def _error_body(status: int, agents: bool) -> tuple[bytes, str]:
    messages = {401: "Invalid API key", 403: "Forbidden", 404: "Not found",
                429: f"Too many requests {INTERNAL_DETAIL}",
                500: f"Internal server error {INTERNAL_DETAIL}",
                503: f"Service unavailable {INTERNAL_DETAIL}",
                400: "Bad request: messages are malformed"}
    message = messages.get(status, "error")
    if agents or status == 400:
        problem = {"title": message, "status": status, "detail": message,
                   "code": "bad_request" if status == 400 else "error",
                   "error": {"code": "error", "message": message}}
        return orjson.dumps(problem), "application/problem+json"
    return orjson.dumps({"error": {"message": message, "type": "api_error"}}), "application/json"


async def _injected(faults: Faults, agents: bool) -> Response:
    if faults.hang:
        await asyncio.sleep(faults.hang)
    data, media = _error_body(faults.status, agents)
    headers = {"retry-after": faults.retry_after} if faults.retry_after else {}
    return Response(data, status_code=faults.status, media_type=media, headers=headers)


def create_fake_inkeep_app(*, api_key: str | None = None, delay: float = 0.0) -> Starlette:
    """`api_key`: when set, requests without ``Authorization: Bearer <api_key>`` get a 401."""

    async def completions(request: Request) -> Response:
        agents = request.url.path.startswith("/run/")
        raw = await request.body()
        body = orjson.loads(raw)
        state = request.app.state
        state.calls += 1
        state.last_body = body
        state.last_headers = dict(request.headers)
        if state.faults.take(request.url.path):
            return await _injected(state.faults, agents)
        if api_key is not None and request.headers.get("authorization") != f"Bearer {api_key}":
            data, media = _error_body(401, agents)
            return Response(data, status_code=401, media_type=media)
        question = _last_user_text(body)
        forced = _STATUS.search(question)
        if forced:
            status = int(forced.group(1))
            data, media = _error_body(status, agents)
            headers = {"retry-after": "7"} if status == 429 else {}
            return Response(data, status_code=status, media_type=media, headers=headers)
        if "[html-502]" in question:
            return Response(HTML_502, status_code=502, media_type="text/html")
        if "[problem]" in question:
            data, media = _error_body(400, True)
            return Response(data, status_code=400, media_type=media)
        if "[hang]" in question:
            await asyncio.sleep(3600)
        count = int(m.group(1)) if (m := _CHUNKS.search(question)) else 10
        model = str(body.get("model") or "inkeep-qa")
        text = answer_text(question)
        if model == "inkeep-rag":
            text = orjson.dumps({"content": [{
                "type": "document", "record_type": "documentation",
                "url": "https://example.invalid/docs", "title": "Sample document",
                "source": {"type": "content", "content": [{"type": "text", "text": text}]},
            }]}).decode()
        try:
            text = formatted(body.get("response_format"), text)
        except SchemaError as exc:
            error = {"error": {"message": f"Invalid schema for response_format: {exc}",
                               "type": "invalid_request_error", "param": "response_format"}}
            return Response(orjson.dumps(error), status_code=400, media_type="application/json")
        tools = body.get("tools") if "[tools]" in question else None
        completion_id = f"chatcmpl-fake{state.calls}"
        created = int(time.time())
        usage = {"prompt_tokens": _tokens(raw.decode("utf-8", "replace")),
                 "completion_tokens": _tokens(text)}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        if not body.get("stream"):
            if "[slow]" in question:
                await asyncio.sleep(0.2)
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if tools:
                message["tool_calls"] = [_tool_call()]
            whole = {"id": completion_id, "object": "chat.completion", "created": created,
                    "model": model, "choices": [{"index": 0, "message": message,
                                                 "finish_reason": "stop"}]}
            if not agents:
                whole["usage"] = usage
            return Response(orjson.dumps(whole), media_type="application/json")
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        pause = 0.2 if "[slow]" in question else delay
        events = _events(completion_id, created, None if agents else model,
                         split_answer(text, count), tools, question, pause,
                         usage if include_usage and not agents else None, done=not agents)
        return StreamingResponse(_tracked(events, state), media_type="text/event-stream")

    app = Starlette(routes=[
        Route("/v1/chat/completions", completions, methods=["POST"]),
        Route("/chat/completions", completions, methods=["POST"]),
        Route("/run/v1/chat/completions", completions, methods=["POST"]),
    ])
    app.state.calls = 0
    app.state.faults = Faults()
    app.state.streams_finished = 0
    app.state.streams_cancelled = 0
    app.state.last_body = None
    app.state.last_headers = None
    return app


async def _tracked(events: AsyncIterator[bytes], state: Any) -> AsyncIterator[bytes]:
    """Count streams sent to their end and streams the gateway cancelled (client went away)."""
    finished = False
    try:
        async for data in events:
            yield data
        finished = True
    finally:
        if finished:
            state.streams_finished += 1
        else:
            state.streams_cancelled += 1


def _tool_call() -> dict[str, Any]:
    return {"id": "call_links", "type": "function", "function": {
        "name": "provideLinks",
        "arguments": '{"links":[{"url":"https://example.invalid/docs","title":"Docs"}]}'}}


async def _events(
    cid: str, created: int, model: str | None, pieces: list[str], tools: Any, question: str,
    pause: float, usage: dict[str, Any] | None, *, done: bool,
) -> AsyncIterator[bytes]:
    def event(delta: dict[str, Any], finish: str | None = None) -> bytes:
        data: dict[str, Any] = {"id": cid, "object": "chat.completion.chunk", "created": created,
                                "choices": [{"index": 0, "delta": delta,
                                             "finish_reason": finish}]}
        if model is not None:
            data["model"] = model
        return b"data: " + orjson.dumps(data) + b"\n\n"

    yield event({"role": "assistant", "content": ""})
    for i, piece in enumerate(pieces):
        if pause:
            await asyncio.sleep(pause)
        if "[midstream-error]" in question and i == 2:
            error = {"error": {"message": f"upstream model crashed {INTERNAL_DETAIL}",
                               "type": "server_error"}}
            yield b"data: " + orjson.dumps(error) + b"\n\n"
            return
        if "[cut]" in question and i == len(pieces) // 2:
            return
        yield event({"content": piece})
    if tools:
        yield event({"tool_calls": [{"index": 0, **_tool_call()}]})
    yield event({}, "tool_calls" if tools else "stop")
    if usage is not None:
        data = {"id": cid, "object": "chat.completion.chunk", "created": created,
                "model": model, "choices": [], "usage": usage}
        yield b"data: " + orjson.dumps(data) + b"\n\n"
    if done:
        yield b"data: [DONE]\n\n"
