"""The backend seam: what the request pipeline asks of every upstream kind.

A backend turns one routed OpenAI request into either a finished `chat.completion` dict or a
`ChunkStream` of `chat.completion.chunk` dicts, grouped in `Batch`es by upstream read. Backends
raise only `UpstreamError`s (translated at their boundary) and never see the client's gateway
key.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from gateway.tracing import NO_TRACE, ExchangeTrace
from gateway.wire import ChatRequest


@dataclass(frozen=True, slots=True)
class Route:
    """A public model name resolved to a backend and the upstream's own model name."""

    model: str
    backend: str
    upstream_model: str
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class UpstreamCall:
    """One per request, read by the backend and never changed (not frozen only because it is
    built for every request, and a frozen dataclass's ``__init__`` is several times slower)."""

    request_id: str
    route: Route
    chat: ChatRequest
    body: dict[str, Any]  # the client's body as received (unknown fields included)
    headers: Mapping[str, str] = field(default_factory=dict)  # client headers worth passing on
    # headers the backend adds to the client's reply (e.g. Nuclia's learning id)
    reply_headers: dict[str, str] = field(default_factory=dict)
    trace: ExchangeTrace = NO_TRACE  # the request's: the router opens a span per attempt


# (chunks, last): the chunks translated from one upstream read, which the pipeline relays in
# one write, and whether the stream ends there (then sent with the pipeline's own ending).
# A plain tuple, not a NamedTuple: one is built per read, on the relay's hot path.
Batch = tuple[list[dict[str, Any]], bool]


class ChunkStream(Protocol):
    """An opened upstream stream: already past the HTTP status check. Whoever opened it
    closes it (`aclose`)."""

    def batches(self) -> AsyncGenerator[Batch, None]:
        """The chunks, one `Batch` per upstream read. A failure (`UpstreamError`) is raised
        after the chunks that came before it."""
        ...

    async def aclose(self) -> None: ...


class Backend(Protocol):
    name: str
    kind: str

    def credentials_missing(self) -> str | None:
        """The environment variable to set when the backend has no credentials, else None."""
        ...

    async def complete(self, call: UpstreamCall) -> dict[str, Any]:
        """A finished `chat.completion` (model/id normalised later by the pipeline)."""
        ...

    async def stream(self, call: UpstreamCall) -> ChunkStream:
        """Open the upstream stream; raises `UpstreamError` before any byte reaches the client."""
        ...

    async def aclose(self) -> None: ...
