"""Token estimates for reservations and for usage an upstream did not report.

A deliberate approximation (about four characters per token, plus OpenAI's per-message
framing): estimates are always flagged ``estimated`` and settled to real usage when known.
"""

from __future__ import annotations

from typing import Any

_PER_MESSAGE = 4
_PER_REPLY = 3


def text_tokens(text: str) -> int:
    return (len(text) + 3) // 4 if text else 0


def content_text(content: Any) -> str:
    """The text of a message's content: a string, or the text parts of a list of parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            str(part.get("text") or "") for part in content
            if isinstance(part, dict) and part.get("type") in ("text", "input_text", None)
        )
    return ""


def prompt_tokens(messages: list[dict[str, Any]]) -> int:
    total = _PER_REPLY
    for message in messages:
        total += _PER_MESSAGE + text_tokens(content_text(message.get("content")))
        for call in message.get("tool_calls") or ():
            function = call.get("function") or {}
            total += text_tokens(str(function.get("name") or ""))
            total += text_tokens(str(function.get("arguments") or ""))
    return total
