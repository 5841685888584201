"""The tracing seam: what the pipeline, the router and the mirror tell about each exchange.

`Tracing` is chosen once at assembly (`gateway.components.make_tracing`): `NoTracing`, whose
calls do nothing and allocate nothing, unless an OTLP endpoint is configured; then
`gateway.otel.OtelTracing` (imported only then), which turns them into OpenTelemetry spans.
The hot path never asks whether tracing is on: it calls the same methods either way.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from types import TracebackType
from typing import Any, Protocol

from gateway.errors import GatewayError
from gateway.exchange import ExchangeRecord

# where the standard variables point the exporter (the traces' own first)
OTLP_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")


class ExchangeTrace(Protocol):
    """The trace of one request: its span, the spans of its stages and upstream attempts."""

    trace_id: str | None  # hex, for the request log and the record; None when not traced
    span_id: str | None

    def stage(self, name: str) -> AbstractContextManager[object]:
        """A child span around one stage (``authenticate``, ``limits``, ``cache``); a
        `GatewayError` leaving it marks it failed."""
        ...

    def attempt(self, deployment: str, upstream_model: str, number: int
                ) -> AbstractContextManager[object]:
        """A client span around one upstream attempt, current while it runs (so that the
        upstream client injects its ``traceparent``); the answering one lasts as long as
        the exchange."""
        ...

    def request(self, team: str, key_id: str, model: str, body: Mapping[str, Any]) -> None:
        """Who asks for what (the request's model and generation options)."""
        ...

    def refused(self, error: GatewayError) -> None:
        """The request ended before it was admitted."""
        ...

    def finish(self, record: ExchangeRecord) -> None:
        """The exchange ended: its record says how."""
        ...


class Tracing(Protocol):
    def exchange(self, headers: Mapping[str, str], route: str) -> ExchangeTrace:
        """The trace of a new request to `route`, a child of the client's ``traceparent`` if any."""
        ...

    def delivery(self, sink: str, records: Sequence[ExchangeRecord]
                 ) -> AbstractContextManager[object]:
        """A span around one delivery of records to an analytics sink."""
        ...

    def inject(self, headers: dict[str, str]) -> None:
        """Add the current span's ``traceparent`` (and ``tracestate``) to upstream headers."""
        ...

    def shutdown(self) -> None:
        """Send what is buffered; called once, when the gateway stops."""
        ...


class NoTrace:
    """Tracing off: one shared instance, also its own do-nothing context manager."""

    trace_id: str | None = None
    span_id: str | None = None

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        return None

    def stage(self, name: str) -> NoTrace:
        return self

    def attempt(self, deployment: str, upstream_model: str, number: int) -> NoTrace:
        return self

    def request(self, team: str, key_id: str, model: str, body: Mapping[str, Any]) -> None:
        return None

    def refused(self, error: GatewayError) -> None:
        return None

    def finish(self, record: ExchangeRecord) -> None:
        return None


NO_TRACE = NoTrace()


class NoTracing:
    def exchange(self, headers: Mapping[str, str], route: str) -> NoTrace:
        return NO_TRACE

    def delivery(self, sink: str, records: Sequence[ExchangeRecord]) -> NoTrace:
        return NO_TRACE

    def inject(self, headers: dict[str, str]) -> None:
        return None

    def shutdown(self) -> None:
        return None


NO_TRACING = NoTracing()


def otlp_endpoint(configured: str | None, environ: Mapping[str, str]) -> str | None:
    """Where spans go, or None for tracing off: the config's endpoint, else the standard
    variables' (``OTEL_SDK_DISABLED=true`` turns both off)."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    if configured:
        return configured.rstrip("/") + "/v1/traces"
    traces = environ.get(OTLP_VARIABLES[0])
    if traces:
        return traces
    base = environ.get(OTLP_VARIABLES[1])
    return base.rstrip("/") + "/v1/traces" if base else None
