"""Exchange records for the metering, sink and mirror tests."""

from __future__ import annotations

import itertools
from typing import Any

from gateway.exchange import ExchangeRecord, Outcome

_ids = itertools.count(1)


def record(
    *,
    request_id: str | None = None,
    team: str = "alpha",
    key_id: str = "key_1",
    model: str = "qa",
    messages: list[dict[str, Any]] | None = None,
    answer: str = "Hello there.",
    prompt: int = 10,
    completion: int = 5,
    estimated: bool = False,
    cached: bool = False,
    outcome: Outcome = "completed",
    status: int = 200,
    conversation_id: str | None = None,
    user: str | None = None,
    time: float = 1_763_856_000.0,  # 2025-11-23 00:00 UTC
    latency_ms: float = 12.5,
    ttft_ms: float | None = 3.0,
    **extra: Any,
) -> ExchangeRecord:
    usage: dict[str, Any] = {"prompt_tokens": prompt, "completion_tokens": completion,
                             "total_tokens": prompt + completion}
    if estimated:
        usage["estimated"] = True
    return ExchangeRecord(
        request_id=request_id or f"chatcmpl-{next(_ids)}",
        time=time,
        team=team,
        key_id=key_id,
        model=model,
        backend="inkeep",
        upstream_model="inkeep-qa",
        stream=True,
        messages=messages if messages is not None else [{"role": "user", "content": "Hi"}],
        answer=answer,
        finish_reason="stop",
        usage=usage,
        latency_ms=latency_ms,
        ttft_ms=ttft_ms,
        status=status,
        cached=cached,
        outcome=outcome,
        conversation_id=conversation_id,
        user=user,
        **extra,
    )
