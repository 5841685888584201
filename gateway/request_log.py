"""The request log: one JSON line per finished exchange, beside the other logs on stdout.

An `ExchangeObserver`: it formats the line itself (the fields any access log needs, never a
secret nor message content) and writes the lines of one moment together, `FLUSH_SECONDS` after
the first of them, so that a loaded gateway makes one write for many requests. ``server.
request_log: false`` turns it off.
"""

from __future__ import annotations

import asyncio
import sys
from datetime import UTC, datetime
from typing import BinaryIO

import orjson

from gateway.exchange import ExchangeRecord

FLUSH_SECONDS = 0.05


class RequestLog:
    def __init__(self, stream: BinaryIO | None = None) -> None:
        self.stream = stream or sys.stdout.buffer
        self._lines: list[bytes] = []

    def exchange_finished(self, record: ExchangeRecord) -> None:
        usage = record.usage
        self._lines.append(orjson.dumps({
            "event": "request", "level": "info",
            "timestamp": datetime.fromtimestamp(record.time, UTC).isoformat(),
            "request_id": record.request_id, "trace_id": record.trace_id,
            "team": record.team, "key_id": record.key_id,
            "model": record.model, "backend": record.backend, "api": record.api,
            "stream": record.stream,
            "status": record.status, "outcome": record.outcome,
            "latency_ms": record.latency_ms, "ttft_ms": record.ttft_ms,
            "prompt_tokens": usage.get("prompt_tokens"),
            "completion_tokens": usage.get("completion_tokens"),
            "tokens_estimated": bool(usage.get("estimated")), "cached": record.cached,
            "error_code": (record.error or {}).get("error", {}).get("code"),
        }, option=orjson.OPT_APPEND_NEWLINE))
        if len(self._lines) == 1:
            asyncio.get_running_loop().call_later(FLUSH_SECONDS, self.flush)

    def flush(self) -> None:
        lines, self._lines = self._lines, []
        if lines:
            self.stream.write(b"".join(lines))
            self.stream.flush()
