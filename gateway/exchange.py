"""The record of one finished exchange, and the observer seam that receives it.

The pipeline builds exactly one `ExchangeRecord` per request in the stream's ``finally`` and
hands it to every `ExchangeObserver` (metering, analytics mirroring, metrics). Observers must
not block: they queue their work and return.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

Outcome = Literal["completed", "error", "client_disconnected"]
Api = Literal["chat.completions", "responses"]  # the OpenAI API the client called


@dataclass
class ExchangeRecord:
    """Observers read it and never change it. Not frozen, and without slots: one is built
    per request, and both would make building and serialising it cost several times more."""

    request_id: str
    time: float  # unix seconds when the request was accepted
    team: str
    key_id: str
    model: str
    backend: str
    upstream_model: str  # these two: the deployment that answered
    stream: bool
    messages: list[dict[str, Any]]
    answer: str
    finish_reason: str | None
    usage: dict[str, Any]  # prompt_tokens, completion_tokens, total_tokens[, estimated]
    latency_ms: float
    ttft_ms: float | None
    status: int
    cached: bool
    outcome: Outcome
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    reasoning: str | None = None
    extensions: dict[str, Any] = field(default_factory=dict)  # e.g. citations
    error: dict[str, Any] | None = None  # the OpenAI error body when outcome is "error"
    user: str | None = None  # the request's `user` or the end-user header
    conversation_id: str | None = None  # from the conversation header, for threading
    metadata: dict[str, Any] = field(default_factory=dict)
    served_model: str = ""  # the model that answered: `model`, or one of its fallbacks
    attempts: int = 0  # upstream calls made for this exchange
    api: Api = "chat.completions"
    # the request's span (hex), when traced: the request log's trace id, the delivery's link
    trace_id: str | None = None
    span_id: str | None = None

    @property
    def prompt_tokens(self) -> int:
        return int(self.usage.get("prompt_tokens") or 0)

    @property
    def completion_tokens(self) -> int:
        return int(self.usage.get("completion_tokens") or 0)

    @property
    def estimated(self) -> bool:
        return bool(self.usage.get("estimated"))

    def to_dict(self) -> dict[str, Any]:
        """A shallow dict of the fields (``orjson.dumps(record)`` serialises it directly)."""
        return {name: getattr(self, name) for name in self.__dataclass_fields__}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExchangeRecord:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


class ExchangeObserver(Protocol):
    def exchange_finished(self, record: ExchangeRecord) -> None:
        """Called once per exchange, on the event loop; must not block or raise."""
        ...
