"""The OpenAI-compatible backend: Inkeep, Inkeep's agents API, and any OpenAI-style upstream.

Bodies pass through untouched except ``model`` (the upstream's own name); the backend's own
credential replaces the client's. Streams are decoded incrementally, one batch of chunks per
upstream read. Upstreams that omit ``[DONE]`` (Inkeep's agents API ends on a
``finish_reason`` chunk) end cleanly; a stream that stops with neither is reported as broken
off, never as complete.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

import orjson
import structlog

from gateway.answer import Answer
from gateway.backends import failures
from gateway.backends.base import Batch, UpstreamCall
from gateway.config import BackendConfig
from gateway.errors import (
    GatewayError,
    UpstreamError,
    UpstreamProtocolError,
)
from gateway.sse import SSEDecoder, SSEEvent
from gateway.upstream import UpstreamClient, UpstreamResponse

log = structlog.get_logger("gateway.backends.openai")

def upstream_message(data: Any) -> Any:
    """The human message inside an upstream error body (OpenAI envelope or problem+json)."""
    if not isinstance(data, dict):
        return None
    error = data.get("error")
    if isinstance(error, dict):
        return error.get("message")
    for key in ("detail", "message", "title"):
        if isinstance(data.get(key), str) and data[key]:
            return data[key]
    return error


def map_status(backend: str, status: int, body: bytes, headers: Any) -> GatewayError:
    if status in (401, 403):
        return failures.refused_credentials(backend, status, body)
    if status == 429:
        return failures.rate_limited(backend, body, headers)
    if status in (400, 413, 422):
        return failures.rejected(backend, status, body,
                                 failures.json_message(body, upstream_message))
    return failures.failed(backend, status, body)


class OpenAIChunkStream:
    def __init__(self, response: UpstreamResponse, backend: str) -> None:
        self._response = response
        self._backend = backend

    async def batches(self) -> AsyncGenerator[Batch, None]:
        """One batch per upstream read; the read that carried ``[DONE]`` is the last."""
        decoder = SSEDecoder()
        finished = False
        async for data in self._response.iter_bytes():
            batch, done, error = self._decode_events(decoder.feed(data))
            finished = finished or _has_finish(batch)
            if batch:
                yield batch, done
            if error is not None:
                raise error
            if done:
                return
        batch, done, error = self._decode_events(decoder.flush())
        finished = finished or _has_finish(batch)
        if batch:
            yield batch, True
        if error is not None:
            raise error
        if not finished and not done:
            raise UpstreamProtocolError(
                f"The upstream '{self._backend}' closed the stream before the answer finished.",
                backend=self._backend,
            )

    def _decode_events(
        self, events: list[SSEEvent]
    ) -> tuple[list[dict[str, Any]], bool, UpstreamError | None]:
        """(chunks, saw [DONE], the error that ended the stream): the chunks before an error
        are still delivered."""
        batch: list[dict[str, Any]] = []
        for event in events:
            if event.data == "[DONE]":
                return batch, True, None
            try:
                chunk = self._decode(event.data)
            except UpstreamError as exc:
                return batch, False, exc
            if chunk is not None:
                batch.append(chunk)
        return batch, False, None

    def _decode(self, payload: str) -> dict[str, Any] | None:
        if not payload.strip():
            return None
        try:
            chunk = orjson.loads(payload)
        except orjson.JSONDecodeError:
            raise UpstreamProtocolError(
                f"The upstream '{self._backend}' sent an event that is not JSON.",
                backend=self._backend,
            ) from None
        if not isinstance(chunk, dict):
            raise UpstreamProtocolError(
                f"The upstream '{self._backend}' sent an event that is not a JSON object.",
                backend=self._backend,
            )
        if "error" in chunk and "choices" not in chunk:
            raise failures.failed_mid_answer(self._backend, payload)
        return chunk

    async def aclose(self) -> None:
        await self._response.aclose()


def _has_finish(batch: list[dict[str, Any]]) -> bool:
    for chunk in batch:
        for choice in chunk.get("choices") or ():
            if choice.get("finish_reason"):
                return True
    return False


class OpenAICompatBackend:
    """``kind: inkeep`` or ``kind: openai`` — POST ``{base_url}/chat/completions``."""

    def __init__(self, name: str, config: BackendConfig, client: UpstreamClient) -> None:
        self.name = name
        self.kind: str = config.kind
        self._config = config
        self._client = client
        headers = {"content-type": "application/json", **config.headers}
        credential = config.credential()
        if credential:
            headers["authorization"] = f"Bearer {credential}"
        self._headers = headers
        self._stream_headers = {**headers, "accept": "text/event-stream"}

    def credentials_missing(self) -> str | None:
        if not self._config.requires_key or self._config.credential():
            return None
        return self._config.api_key_env or f"the api_key of backend '{self.name}'"

    def _payload(self, call: UpstreamCall) -> bytes:
        body = call.body
        if body.get("model") != call.route.upstream_model:
            body = {**body, "model": call.route.upstream_model}
        return orjson.dumps(body)

    async def complete(self, call: UpstreamCall) -> dict[str, Any]:
        response = await self._client.post(
            "/chat/completions", self._payload(call), self._headers,
            timeout=self._client.whole_timeout,
        )
        raw = await response.read()
        if response.status >= 400:
            raise map_status(self.name, response.status, raw, response.headers)
        if response.content_type == "text/event-stream":
            return await self._assemble(raw)
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise UpstreamProtocolError(
                f"The upstream '{self.name}' answered with a body that is not JSON.",
                backend=self.name,
            ) from None
        if not isinstance(data, dict) or not isinstance(data.get("choices"), list):
            raise UpstreamProtocolError(
                f"The upstream '{self.name}' answered without 'choices'.", backend=self.name
            )
        return data

    async def _assemble(self, raw: bytes) -> dict[str, Any]:
        """Some OpenAI-like upstreams stream even when asked not to: assemble the answer."""
        answer = Answer()
        decoder = SSEDecoder()
        for event in decoder.feed(raw) + decoder.flush():
            if event.data == "[DONE]" or not event.data.strip():
                continue
            chunk = orjson.loads(event.data)
            if isinstance(chunk, dict):
                answer.add_chunk(chunk)
        return answer.to_completion("", "", 0)

    async def stream(self, call: UpstreamCall) -> OpenAIChunkStream:
        response = await self._client.post(
            "/chat/completions", self._payload(call), self._stream_headers
        )
        if response.status >= 400:
            raw = await response.read()
            raise map_status(self.name, response.status, raw, response.headers)
        return OpenAIChunkStream(response, self.name)

    async def aclose(self) -> None:
        await self._client.aclose()
