"""The Nuclia backend: OpenAI chat requests mapped onto ``POST {base_url}/kb/{kbid}/ask``.

Request mapping (OpenAI -> Nuclia ``AskRequest``): the last ``user`` message is ``query``;
earlier user/assistant turns are ``chat_history`` (authors ``USER`` / ``NUCLIA``, never the
deprecated ``context`` alongside it); non-empty ``system``/``developer`` messages are joined into
``prompt.system``; ``seed`` -> ``generative_model_seed``; ``max_completion_tokens`` /
``max_tokens`` -> ``max_tokens``; ``metadata`` and ``user`` -> ``audit_metadata`` (and ``user``
-> the ``X-NUCLIADB-USER`` header); ``response_format: json_schema`` -> ``answer_json_schema``,
and the answer's content is then Nuclia's ``answer_json`` (see `gateway.backends.nuclia_stream`);
``json_object`` is a 400 that says to give a schema (Nuclia has no schema-less JSON mode).
Content given as parts is flattened to its text parts. Defaults come from the model's
``nuclia:`` dict in the config and are overridden by the per-request extension field
``"nuclia": {...}`` (``extra_body={"nuclia": {...}}`` in the OpenAI SDK). What Nuclia cannot
honour is a 400 naming the parameter: ``n > 1``, ``logprobs``, ``tools``, ``tool_choice``,
``functions``, ``stop``, audio output, image/audio/file parts and ``tool`` messages. Sampling
hints Nuclia has no knob for (``temperature``, ``top_p``, penalties) are ignored.

Pre-stream HTTP errors: 401/403/404 -> 502 `UpstreamAuthError`; 412/422 -> 400 with Nuclia's
detail; 402 -> 429 `insufficient_quota`; 429 -> 429 with ``retry-after``; 529/530/5xx -> 502;
timeouts -> 504 (translated by `gateway.upstream`). Messages name the backend, never the key.

Non-streamed answers are built FROM THE STREAM by default (``synchronous: false``). The
``X-Synchronous: true`` JSON costs the gateway a little less CPU, but a synchronous Nuclia sends
nothing until the whole answer is generated, so ``timeouts.read`` (max silence) would have to
exceed the longest generation, whereas the stream keeps bytes flowing and keeps that timeout
meaningful. The stream is also the code path streamed requests already use (same items, same
tests). ``synchronous: true`` in the backend config switches over.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator
from typing import Any, NamedTuple

import orjson

from gateway.answer import Answer
from gateway.backends import failures
from gateway.backends.base import Batch, UpstreamCall
from gateway.backends.nuclia_stream import AskTranslator, completion_from_sync
from gateway.config import BackendConfig
from gateway.errors import (
    GatewayError,
    InvalidRequest,
    QuotaExceeded,
    UnsupportedParameter,
    UpstreamAuthError,
    UpstreamProtocolError,
)
from gateway.ndjson import NdjsonDecoder
from gateway.upstream import UpstreamClient, UpstreamResponse
from gateway.wire import ChatRequest, Message, completion_id

MAX_QUERY_CHARS = 20_000
_AUTHORS = {"user": "USER", "assistant": "NUCLIA"}
_SYSTEM_ROLES = ("system", "developer")


# -- request mapping -------------------------------------------------------------------------


def _flatten(content: Any, index: int) -> str:
    """Message content as text: a string, or the text parts of a list of parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts: list[str] = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        else:
            raise UnsupportedParameter(
                f"Nuclia models accept only text content; messages[{index}] has a "
                f"'{kind or 'unknown'}' part.",
                param=f"messages[{index}].content",
            )
    return "\n".join(texts)


def _reject_unsupported(body: dict[str, Any]) -> None:
    n = body.get("n")
    if n is not None and n != 1:
        raise UnsupportedParameter("Nuclia models return one answer: 'n' must be 1.", param="n")
    for param in ("logprobs", "top_logprobs", "tools", "functions", "function_call", "stop"):
        if body.get(param):
            raise UnsupportedParameter(
                f"Nuclia models do not support '{param}'.", param=param
            )
    if body.get("tool_choice") not in (None, "none"):
        raise UnsupportedParameter("Nuclia models do not support 'tool_choice'.",
                                   param="tool_choice")
    if body.get("audio") or "audio" in (body.get("modalities") or ()):
        raise UnsupportedParameter(
            "Nuclia models answer with text only: 'modalities' may not ask for audio.",
            param="modalities")


def _json_schema(body: dict[str, Any]) -> dict[str, Any] | None:
    fmt = body.get("response_format")
    if not isinstance(fmt, dict) or fmt.get("type") in (None, "text"):
        return None
    spec = fmt.get("json_schema")
    if fmt.get("type") == "json_schema" and isinstance(spec, dict) \
            and isinstance(spec.get("schema"), dict):
        return dict(spec["schema"])
    raise UnsupportedParameter(
        "Nuclia models need a JSON schema for structured answers: use response_format "
        "{'type': 'json_schema', 'json_schema': {'name': ..., 'schema': {...}}}.",
        param="response_format",
    )


def structured(call: UpstreamCall) -> bool:
    """Whether the answer's content must be Nuclia's JSON answer (``response_format`` asked
    for a schema), not its prose."""
    return _json_schema(call.body) is not None


class _Turn(NamedTuple):
    role: str  # "user" or "assistant"
    text: str
    position: int  # its index in ``messages``, to name it in a 400


class _Conversation(NamedTuple):
    query: str  # the last user message
    history: list[dict[str, str]]  # the earlier turns, as Nuclia's chat_history
    system: str  # the system/developer messages joined, "" when none


def _turn(message: Message, index: int) -> _Turn:
    """A user or assistant message; any other role, or a tool call, is a 400 naming it."""
    role = message.role
    if role not in _AUTHORS:
        raise UnsupportedParameter(
            f"Nuclia models do not support '{role}' messages (messages[{index}]).",
            param=f"messages[{index}].role",
        )
    if role == "assistant" and message.tool_calls:
        raise UnsupportedParameter(
            "Nuclia models do not support tool calls in the conversation.",
            param=f"messages[{index}].tool_calls",
        )
    return _Turn(role, _flatten(message.content, index), index)


def _query(turns: list[_Turn]) -> str:
    """The question Nuclia answers: the last message, from the user, within Nuclia's limit."""
    if not turns or turns[-1].role != "user":
        raise InvalidRequest(
            "Nuclia models answer a question: the last message must be from the user.",
            param="messages",
        )
    last = turns[-1]
    query = last.text.strip()
    if not query:
        raise InvalidRequest("The last user message is empty.",
                             param=f"messages[{last.position}].content")
    if len(query) > MAX_QUERY_CHARS:
        raise InvalidRequest(
            f"Nuclia accepts questions of at most {MAX_QUERY_CHARS} characters "
            f"(this one has {len(query)}).", param=f"messages[{last.position}].content")
    return query


def _conversation(messages: list[Message]) -> _Conversation:
    """The messages split into Nuclia's query, chat history and system prompt."""
    system: list[str] = []
    turns: list[_Turn] = []
    for index, message in enumerate(messages):
        if message.role in _SYSTEM_ROLES:
            text = _flatten(message.content, index).strip()
            if text:
                system.append(text)
        else:
            turns.append(_turn(message, index))
    query = _query(turns)
    history = [{"author": _AUTHORS[turn.role], "text": turn.text} for turn in turns[:-1]
               if turn.text.strip()]
    return _Conversation(query, history, "\n\n".join(system))


def _with_system(prompt: Any, system: str) -> dict[str, Any]:
    """The configured prompt (a bare string is the user prompt) with the request's system
    prompt."""
    merged = dict(prompt) if isinstance(prompt, dict) else (
        {"user": prompt} if isinstance(prompt, str) and prompt else {})
    merged["system"] = system
    return merged


def _add_generation_options(ask: dict[str, Any], body: dict[str, Any],
                            chat: ChatRequest) -> None:
    """The OpenAI options Nuclia has a field for: seed, the answer's token budget, and
    ``metadata``/``user`` as audit metadata (over the configured ones)."""
    seed = body.get("seed")
    if isinstance(seed, int):
        ask["generative_model_seed"] = seed
    budget = chat.answer_token_budget
    if budget is not None:
        current = ask.get("max_tokens")
        ask["max_tokens"] = {**current, "answer": budget} if isinstance(current, dict) else budget
    audit = _as_str_dict(body.get("metadata"))
    if chat.user:
        audit["user"] = chat.user
    if audit:
        ask["audit_metadata"] = {**_as_str_dict(ask.get("audit_metadata")), **audit}


def _extension(body: dict[str, Any]) -> dict[str, Any]:
    """The request's own ask options, the ``nuclia`` extension field ({} when absent)."""
    extension = body.get("nuclia")
    if extension is not None and not isinstance(extension, dict):
        raise InvalidRequest("The 'nuclia' extension field must be an object of ask options.",
                             param="nuclia")
    return extension or {}


def build_ask_request(call: UpstreamCall) -> dict[str, Any]:
    """The Nuclia ``AskRequest`` body for one OpenAI chat request (see the module docstring):
    the model's configured options, then what the messages and options say, then the
    request's ``nuclia`` extension."""
    body = call.body
    _reject_unsupported(body)
    extension = _extension(body)
    conversation = _conversation(call.chat.messages)
    ask: dict[str, Any] = dict(call.route.options)
    ask.pop("context", None)  # the gateway builds chat_history, and Nuclia refuses both
    ask["query"] = conversation.query
    if conversation.history:
        ask["chat_history"] = conversation.history
    if conversation.system:
        ask["prompt"] = _with_system(ask.get("prompt"), conversation.system)
    _add_generation_options(ask, body, call.chat)
    schema = _json_schema(body)
    if schema is not None:
        ask["answer_json_schema"] = schema
    if "context" in extension:
        raise InvalidRequest(
            "'nuclia.context' is Nuclia's deprecated alias of 'chat_history': the gateway "
            "builds chat_history from the messages.", param="nuclia.context")
    ask.update(extension)
    return ask


def _as_str_dict(value: Any) -> dict[str, str]:
    return {str(k): str(v) for k, v in value.items()} if isinstance(value, dict) else {}


# -- errors ----------------------------------------------------------------------------------


def nuclia_message(data: Any) -> Any:
    """The human message of a Nuclia error body (``{"detail": str | [validation errors]}``)."""
    detail = data.get("detail") if isinstance(data, dict) else None
    if not isinstance(detail, list):
        return detail
    parts = []
    for err in detail:
        if isinstance(err, dict):
            loc = ".".join(str(p) for p in err.get("loc") or ())
            parts.append(f"{loc}: {err.get('msg', '')}" if loc else str(err.get("msg", "")))
        else:
            parts.append(str(err))
    return "; ".join(parts)


# Nuclia's own statuses for a failure in one of its stages
_STAGES = {529: "rephrasing the question", 530: "retrieving context"}


def map_nuclia_status(backend: str, status: int, body: bytes, headers: Any) -> GatewayError:
    """A Nuclia HTTP error before the stream -> the gateway error the client should see."""
    if status in (401, 403):
        return failures.refused_credentials(backend, status, body)
    if status == 404:
        return UpstreamAuthError(
            f"The upstream '{backend}' does not know the configured Knowledge Box (HTTP 404). "
            "This is a gateway configuration problem: tell the gateway operator.",
            backend=backend, detail=failures.body_text(body))
    if status in (412, 422):
        return failures.rejected(backend, status, body,
                                 failures.json_message(body, nuclia_message))
    if status == 402:
        return QuotaExceeded(
            f"The upstream '{backend}' reports its usage limits are exceeded (HTTP 402).",
            detail=failures.body_text(body))
    if status == 429:
        return failures.rate_limited(backend, body, headers)
    return failures.failed(backend, status, body, _STAGES.get(status, ""))


# -- the backend -----------------------------------------------------------------------------


class NucliaChunkStream:
    """An opened Nuclia answer stream, translated chunk by chunk; closes its response."""

    def __init__(self, response: UpstreamResponse, backend: str, model: str,
                 learning_id: str | None, *, structured: bool) -> None:
        self._response = response
        self._translator = AskTranslator(backend=backend, cid=completion_id(), model=model,
                                         created=int(time.time()), learning_id=learning_id,
                                         structured=structured)

    async def batches(self) -> AsyncGenerator[Batch, None]:
        """One batch per upstream read; the finish chunk, sent when the body ends, is the
        last. The role chunk leaves with the first read's batch."""
        decoder = NdjsonDecoder()
        pending = [self._translator.start()]
        async for data in self._response.iter_bytes():
            batch, failure = self._translate(decoder.feed(data), pending)
            pending = []
            if batch:
                yield batch, False
            if failure is not None:
                raise failure
        batch, failure = self._translate(decoder.flush(), pending)
        if batch:
            yield batch, False
        if failure is not None:
            raise failure
        yield [self._translator.finish()], True

    def _translate(
        self, lines: list[bytes], batch: list[dict[str, Any]]
    ) -> tuple[list[dict[str, Any]], GatewayError | None]:
        for line in lines:
            try:
                translated = self._translator.line(line)
            except GatewayError as exc:
                return batch, exc
            if translated is not None:
                batch.append(translated)
        return batch, None

    async def aclose(self) -> None:
        await self._response.aclose()


class NucliaBackend:
    """``kind: nuclia`` — one Knowledge Box behind ``{base_url}/kb/{kbid}/ask``."""

    kind = "nuclia"

    def __init__(self, name: str, config: BackendConfig, client: UpstreamClient) -> None:
        self.name = name
        self._config = config
        self._client = client
        self._path = f"/kb/{config.kbid}/ask"
        headers = {"content-type": "application/json", **config.headers,
                   "x-ndb-client": "api"}
        credential = config.credential()
        if credential:
            headers["x-nuclia-serviceaccount"] = f"Bearer {credential}"
        self._headers = headers

    def credentials_missing(self) -> str | None:
        if not self._config.requires_key or self._config.credential():
            return None
        return self._config.api_key_env or f"the api_key of backend '{self.name}'"

    def _request(self, call: UpstreamCall, *, synchronous: bool) -> tuple[bytes, dict[str, str]]:
        payload = orjson.dumps(build_ask_request(call))
        headers = dict(self._headers)
        headers["accept"] = "application/json" if synchronous else "application/x-ndjson"
        if synchronous:
            headers["x-synchronous"] = "true"
        if call.chat.user:
            headers["x-nucliadb-user"] = call.chat.user
        forwarded = call.headers.get("x-forwarded-for")
        if forwarded:
            headers["x-forwarded-for"] = forwarded
        return payload, headers

    async def stream(self, call: UpstreamCall) -> NucliaChunkStream:
        payload, headers = self._request(call, synchronous=False)
        response = await self._client.post(self._path, payload, headers)
        if response.status >= 400:
            raw = await response.read()
            raise map_nuclia_status(self.name, response.status, raw, response.headers)
        learning_id = _learning_id(call, response)
        return NucliaChunkStream(response, self.name, call.route.model, learning_id,
                                 structured=structured(call))

    async def complete(self, call: UpstreamCall) -> dict[str, Any]:
        synchronous = self._config.synchronous
        payload, headers = self._request(call, synchronous=synchronous)
        response = await self._client.post(self._path, payload, headers,
                                           timeout=self._client.whole_timeout)
        raw = await response.read()
        if response.status >= 400:
            raise map_nuclia_status(self.name, response.status, raw, response.headers)
        learning_id = _learning_id(call, response)
        cid, created, model = completion_id(), int(time.time()), call.route.model
        if synchronous:
            try:
                data = orjson.loads(raw)
            except orjson.JSONDecodeError:
                raise UpstreamProtocolError(
                    f"The upstream '{self.name}' answered with a body that is not JSON.",
                    backend=self.name,
                ) from None
            return completion_from_sync(data, backend=self.name, cid=cid, model=model,
                                        created=created, learning_id=learning_id,
                                        structured=structured(call))
        translator = AskTranslator(backend=self.name, cid=cid, model=model, created=created,
                                   learning_id=learning_id, structured=structured(call))
        answer = Answer()
        answer.add_chunk(translator.start())
        decoder = NdjsonDecoder()
        for line in decoder.feed(raw) + decoder.flush():
            translated = translator.line(line)
            if translated is not None:
                answer.add_chunk(translated)
        answer.add_chunk(translator.finish())
        return answer.to_completion(cid, model, created)

    async def aclose(self) -> None:
        await self._client.aclose()


def _learning_id(call: UpstreamCall, response: UpstreamResponse) -> str | None:
    """Nuclia's id of this answer (for its feedback API), also told to the client in
    ``x-nuclia-learning-id``."""
    learning_id = response.headers.get("nuclia-learning-id")
    if learning_id:
        call.reply_headers["x-nuclia-learning-id"] = learning_id
    return learning_id

