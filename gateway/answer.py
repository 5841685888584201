"""The assembled assistant answer of one exchange, built from chunks or from a completion.

Streams are re-emitted chunk by chunk; this accumulator keeps what metering, the cache and
analytics need (text, reasoning, tool calls, finish reason, usage, extension fields, an
upstream completion's own fields) and can turn an answer back into a `chat.completion` or
into a replayable list of chunk deltas.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gateway.wire import chunk, usage_chunk

# Extension fields a backend may put on the final chunk and on the completion's message
# (e.g. Nuclia citations). They are never mixed into the answer text.
EXTENSION_KEYS = ("citations", "nuclia")
# A completion's fields the gateway sets itself; an upstream's other top-level fields
# (``system_fingerprint``, ``service_tier``) are kept as its `completion_fields`.
COMPLETION_KEYS = frozenset({"id", "object", "created", "model", "choices", "usage"})
REPLAY_PIECE = 48  # characters per replayed chunk when the answer came in one piece


def split_text(text: str, size: int = REPLAY_PIECE) -> list[str]:
    """Pieces of about `size` characters, cut after a space where one is near."""
    pieces: list[str] = []
    start = 0
    while start < len(text):
        end = min(start + size, len(text))
        if end < len(text):
            space = text.rfind(" ", start + size // 2, end)
            if space != -1:
                end = space + 1
        pieces.append(text[start:end])
        start = end
    return pieces


@dataclass
class Answer:
    content: list[str] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)
    tool_calls: dict[int, dict[str, Any]] = field(default_factory=dict)
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    extensions: dict[str, Any] = field(default_factory=dict)
    completion_fields: dict[str, Any] = field(default_factory=dict)
    chunks: int = 0

    @property
    def text(self) -> str:
        return "".join(self.content)

    @property
    def has_output(self) -> bool:
        return bool(self.content or self.tool_calls or self.reasoning)

    def add_chunk(self, data: dict[str, Any]) -> None:
        usage = data.get("usage")
        if usage:
            self.usage = usage
        for key in EXTENSION_KEYS:
            if key in data:
                self.extensions[key] = data[key]
        for choice in data.get("choices") or ():
            if choice.get("index", 0) != 0:
                continue
            self.chunks += 1
            delta = choice.get("delta") or {}
            text = delta.get("content")
            if text:
                self.content.append(text)
            reasoning = delta.get("reasoning_content")
            if reasoning:
                self.reasoning.append(reasoning)
            for call in delta.get("tool_calls") or ():
                self._merge_tool_call(call)
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]

    def _merge_tool_call(self, call: dict[str, Any]) -> None:
        index = call.get("index", len(self.tool_calls))
        current = self.tool_calls.get(index)
        if current is None:
            current = {"id": call.get("id"), "type": call.get("type", "function"),
                       "function": {"name": "", "arguments": ""}}
            self.tool_calls[index] = current
        if call.get("id"):
            current["id"] = call["id"]
        function = call.get("function") or {}
        if function.get("name"):
            current["function"]["name"] += function["name"]
        if function.get("arguments"):
            current["function"]["arguments"] += function["arguments"]

    def add_completion(self, data: dict[str, Any]) -> None:
        if data.get("usage"):
            self.usage = data["usage"]
        choices = data.get("choices") or [{}]
        choice = choices[0]
        message = choice.get("message") or {}
        if message.get("content"):
            self.content.append(message["content"])
        if message.get("reasoning_content"):
            self.reasoning.append(message["reasoning_content"])
        for i, call in enumerate(message.get("tool_calls") or ()):
            self.tool_calls[i] = call
        for key in EXTENSION_KEYS:
            if key in message:
                self.extensions[key] = message[key]
        self.finish_reason = choice.get("finish_reason") or self.finish_reason
        self.completion_fields = {k: v for k, v in data.items() if k not in COMPLETION_KEYS}

    def message(self) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": self.text if
                                   (self.content or not self.tool_calls) else None}
        if self.reasoning:
            message["reasoning_content"] = "".join(self.reasoning)
        if self.tool_calls:
            message["tool_calls"] = [self.tool_calls[i] for i in sorted(self.tool_calls)]
        message.update(self.extensions)
        return message

    def to_completion(self, cid: str, model: str, created: int) -> dict[str, Any]:
        completion: dict[str, Any] = {
            "id": cid,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "message": self.message(),
                         "finish_reason": self.finish_reason or "stop"}],
            **self.completion_fields,
        }
        if self.usage is not None:
            completion["usage"] = self.usage
        return completion

    def replay_chunks(
        self, cid: str, model: str, created: int, *, include_usage: bool, pieces: list[str] | None
    ) -> list[dict[str, Any]]:
        """Chunks that replay this answer as a stream: role, content pieces, finish, usage.
        An answer that came in one long piece (a whole completion) replays in several."""
        if pieces is None and len(self.content) == 1 and len(self.content[0]) > REPLAY_PIECE:
            pieces = split_text(self.content[0])
        out = [chunk(cid, model, created, {"role": "assistant", "content": ""})]
        if self.reasoning:
            out.append(chunk(cid, model, created, {"reasoning_content": "".join(self.reasoning)}))
        for piece in pieces if pieces is not None else self.content:
            if piece:
                out.append(chunk(cid, model, created, {"content": piece}))
        if self.tool_calls:
            calls = [{"index": i, **self.tool_calls[i]} for i in sorted(self.tool_calls)]
            out.append(chunk(cid, model, created, {"tool_calls": calls}))
        final = chunk(cid, model, created, {}, self.finish_reason or "stop")
        final.update(self.extensions)
        out.append(final)
        if include_usage and self.usage is not None:
            out.append(usage_chunk(cid, model, created, self.usage))
        return out
