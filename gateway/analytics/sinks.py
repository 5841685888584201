"""Analytics sinks: where finished exchanges are delivered from the outbox.

`InkeepAnalyticsSink` upserts the conversation (`POST {url}/conversations`, ``type:
"openai"``, the whole history plus the answer, tool messages folded into the assistant
message before them since the API has no ``tool`` role). `WebhookSink` POSTs the record as
JSON signed with HMAC-SHA256. Both raise from gateway/errors.py: `UpstreamRateLimited`,
`UpstreamTimeout` and `UpstreamUnavailable` (429, 5xx, timeouts, connection errors) are worth
retrying (`retryable`), any other `UpstreamError` (other 4xx) is permanent.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp
import orjson

from gateway.config import SinkConfig
from gateway.errors import (
    UpstreamError,
    UpstreamProtocolError,
    UpstreamRateLimited,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from gateway.exchange import ExchangeRecord

MAX_BODY = 2 * 1024 * 1024  # the Analytics API's body limit
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def idempotency_key(record: ExchangeRecord) -> str:
    """One key per record (the request id is unique per exchange)."""
    return f"gw-{record.request_id}"


@dataclass(frozen=True, slots=True)
class Delivery:
    """One record to deliver: its idempotency key, and its JSON as the outbox holds it."""

    record: ExchangeRecord
    key: str
    data: bytes

    @classmethod
    def of(cls, record: ExchangeRecord) -> Delivery:
        return cls(record, idempotency_key(record), orjson.dumps(record))


class Sink(Protocol):
    name: str

    @property
    def batch(self) -> int:
        """How many records one `deliver` call may take."""
        ...

    async def start(self) -> None: ...

    async def aclose(self) -> None: ...

    async def deliver(self, deliveries: list[Delivery]) -> None:
        """Deliver all (at most `batch`) or raise an `UpstreamError` for all (see
        `retryable`)."""
        ...


def retryable(exc: BaseException) -> bool:
    """Whether a failed delivery is worth another try (429, 5xx, timeouts, connections)."""
    return isinstance(exc, (UpstreamRateLimited, UpstreamTimeout, UpstreamUnavailable))


def message_ids(request_id: str) -> dict[str, str]:
    """The deterministic Analytics message ids of one exchange (the lead returns
    ``assistant`` to the client in ``x-gateway-message-id``; feedback refers to it)."""
    return {"user": f"{request_id}-user", "assistant": f"{request_id}-assistant"}


def conversation_id(record: ExchangeRecord) -> str:
    """The client's conversation id (threads its turns), else one per request."""
    return record.conversation_id or f"conv-{record.request_id}"


# -- payloads (pure) ---------------------------------------------------------------------------


def text_of(content: Any) -> str:
    """Flatten OpenAI content (a string or a list of parts) to text; non-text parts dropped."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, dict) and isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif isinstance(part, dict) and isinstance(part.get("refusal"), str):
                texts.append(part["refusal"])
        return "\n".join(texts)
    return str(content)


def _calls_text(calls: Any) -> str:
    lines = []
    for call in calls or ():
        fn = call.get("function") or {} if isinstance(call, dict) else {}
        lines.append(f"[tool call] {fn.get('name', '?')}({fn.get('arguments', '')})")
    return "\n".join(lines)


def _joined(*parts: str) -> str:
    return "\n".join(p for p in parts if p)


def fold_messages(messages: list[dict[str, Any]]) -> list[dict[str, str]]:
    """OpenAI messages as Analytics messages: roles system/user/assistant only, text content.

    An assistant's tool calls become text lines; each ``tool`` (or legacy ``function``)
    message is appended as ``[tool result]`` to the assistant message before it, or dropped
    when there is none."""
    out: list[dict[str, str]] = []
    for message in messages:
        role = message.get("role")
        if role in ("tool", "function"):
            if out and out[-1]["role"] == "assistant":
                result = text_of(message.get("content"))
                out[-1]["content"] = _joined(out[-1]["content"], f"[tool result] {result}")
            continue
        mapped = _ROLES.get(str(role))
        if mapped is None:
            continue
        content = text_of(message.get("content"))
        if mapped == "assistant":
            content = _joined(content, _calls_text(message.get("tool_calls")))
        out.append({"role": mapped, "content": content})
    return out


def _message_id(conv: str, index: int, message: dict[str, str]) -> str:
    digest = hashlib.sha256(
        orjson.dumps([conv, index, message["role"], message["content"]])).hexdigest()
    return f"msg-{digest[:24]}"


def inkeep_payload(record: ExchangeRecord) -> dict[str, Any]:
    """The `POST /conversations` body for one exchange (an upsert of the whole thread)."""
    conv = conversation_id(record)
    ids = message_ids(record.request_id)
    history = fold_messages(record.messages)
    messages: list[dict[str, str]] = []
    last_user = max((i for i, m in enumerate(history) if m["role"] == "user"), default=-1)
    for index, message in enumerate(history):
        mid = ids["user"] if index == last_user else _message_id(conv, index, message)
        messages.append({"id": mid, **message})
    answer = _joined(record.answer, _calls_text(record.tool_calls))
    if not answer and record.error:
        answer = f"[error] {(record.error.get('error') or {}).get('message', '')}".rstrip()
    messages.append({"id": ids["assistant"], "role": "assistant", "content": answer})
    properties: dict[str, Any] = {
        "model": record.model, "team": record.team, "backend": record.backend,
        "upstream_model": record.upstream_model, "served_model": record.served_model,
        "attempts": record.attempts, "latency_ms": record.latency_ms,
        "ttft_ms": record.ttft_ms, "cached": record.cached, "request_id": record.request_id,
        "finish_reason": record.finish_reason, "usage": record.usage,
        "outcome": record.outcome, "status": record.status, "stream": record.stream,
        "api": record.api,
    }
    if record.extensions.get("citations"):
        properties["citations"] = record.extensions["citations"]
    body: dict[str, Any] = {"id": conv, "type": "openai", "messages": messages,
                            "properties": properties}
    if record.user:
        body["userProperties"] = {"id": record.user}
    return body


def fit(body: dict[str, Any], limit: int = MAX_BODY) -> bytes:
    """Serialise, dropping the oldest non-system history messages until it fits the limit."""
    data = orjson.dumps(body)
    messages = body["messages"]
    while len(data) > limit and len(messages) > 1:
        drop = next((i for i, m in enumerate(messages[:-1]) if m["role"] != "system"), None)
        if drop is None:
            break
        messages = messages[:drop] + messages[drop + 1:]
        data = orjson.dumps({**body, "messages": messages})
    return data


def sign(secret: bytes, body: bytes) -> str:
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


# -- HTTP --------------------------------------------------------------------------------------


class _HTTPSink:
    """One pooled aiohttp session per sink, opened at `start`, closed at `aclose`."""

    def __init__(self, config: SinkConfig, *,
                 connector: aiohttp.BaseConnector | None = None) -> None:
        self.name = config.name
        self.config = config
        self.url = config.url
        self._connector = connector
        self._timeout = aiohttp.ClientTimeout(total=config.timeout)
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=self._connector or aiohttp.TCPConnector(limit=32),
                timeout=self._timeout, cookie_jar=aiohttp.DummyCookieJar())

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def post(self, path: str, body: bytes, headers: dict[str, str]) -> Any:
        """POST and return the decoded JSON reply (or None); errors translated here."""
        await self.start()
        assert self._session is not None
        sent = {**self.config.headers, "content-type": "application/json", **headers}
        try:
            async with self._session.post(self.url + path, data=body, headers=sent) as resp:
                raw = await resp.read()
                status = resp.status
                retry_after = resp.headers.get("retry-after")
        except TimeoutError as exc:
            raise UpstreamTimeout(f"The sink '{self.name}' did not answer in time.",
                                  backend=self.name) from exc
        except aiohttp.ClientConnectionError as exc:
            raise UpstreamUnavailable(f"The sink '{self.name}' could not be reached "
                                      f"({type(exc).__name__}).", backend=self.name) from exc
        except aiohttp.ClientError as exc:
            raise UpstreamProtocolError(f"The sink '{self.name}' answered with something "
                                        f"unreadable ({type(exc).__name__}).",
                                        backend=self.name) from exc
        if status == 429:
            headers_out = {"retry-after": retry_after} if retry_after else None
            raise UpstreamRateLimited(f"The sink '{self.name}' asked to slow down (429).",
                                      backend=self.name, headers=headers_out)
        if status >= 500 or status == 408:
            raise UpstreamUnavailable(f"The sink '{self.name}' failed with HTTP {status}.",
                                      backend=self.name)
        if status >= 400:
            raise UpstreamError(f"The sink '{self.name}' refused the record with HTTP {status}.",
                                backend=self.name, code="sink_rejected")
        if not raw:
            return None
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            return None


class InkeepAnalyticsSink(_HTTPSink):
    def _auth(self, idempotency_key: str | None = None) -> dict[str, str]:
        headers = {}
        if self.config.api_key is not None:
            headers["authorization"] = f"Bearer {self.config.api_key.get_secret_value()}"
        if idempotency_key:
            headers["idempotency-key"] = idempotency_key
        return headers

    @property
    def batch(self) -> int:
        return 1  # the Analytics API takes one conversation per call

    async def deliver(self, deliveries: list[Delivery]) -> None:
        (one,) = deliveries
        await self.post("/conversations", fit(inkeep_payload(one.record)), self._auth(one.key))

    def reply_headers(self, request_id: str) -> dict[str, str]:
        """The id this exchange's answer gets in Inkeep Analytics: feedback refers to it."""
        return {"x-gateway-message-id": message_ids(request_id)["assistant"]}

    async def feedback(self, body: dict[str, Any]) -> dict[str, Any]:
        reply = await self.post("/feedback", orjson.dumps(body), self._auth())
        return reply if isinstance(reply, dict) else {}


class WebhookSink(_HTTPSink):
    """POSTs the exchange record as JSON, signed; with ``batch`` > 1, every POST is a JSON
    array of up to ``batch`` records that were ready together (``x-gateway-batch: <n>``;
    deduplicate by each record's ``request_id``: its idempotency key is ``gw-<request_id>``)."""

    @property
    def batch(self) -> int:
        return self.config.batch

    async def deliver(self, deliveries: list[Delivery]) -> None:
        if self.batch == 1:
            (one,) = deliveries
            await self._send(one.data, {"idempotency-key": one.key})
            return
        # the records' JSON is already in the outbox: join it instead of encoding again
        body = b"[" + b",".join(d.data for d in deliveries) + b"]"
        await self._send(body, {"x-gateway-batch": str(len(deliveries))})

    async def _send(self, body: bytes, headers: dict[str, str]) -> None:
        headers["x-gateway-timestamp"] = str(int(time.time()))
        if self.config.secret is not None:
            headers["x-gateway-signature"] = sign(
                self.config.secret.get_secret_value().encode(), body)
        await self.post("", body, headers)


def make_sinks(configs: list[SinkConfig]) -> list[Sink]:
    sinks: list[Sink] = []
    for config in configs:
        if config.kind == "inkeep":
            sinks.append(InkeepAnalyticsSink(config))
        else:
            sinks.append(WebhookSink(config))
    return sinks
