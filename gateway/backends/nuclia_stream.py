"""Nuclia ``/ask`` answers translated into OpenAI chat completion chunks, as a pure async generator.

`translate_ask_stream` reads raw ndjson lines (``bytes``, see `gateway.ndjson`) and yields
``chat.completion.chunk`` dicts on the fly:

- first a ``{"role": "assistant", "content": ""}`` delta, before any line is read;
- each ``answer`` item becomes one ``delta.content`` chunk the moment it is read;
- each ``reasoning`` item becomes one ``delta.reasoning_content`` chunk (never content);
- an ``answer_json`` item is kept for the extension and sent as the content (the JSON text) when
  no answer text came; when the request asked for a JSON schema (``structured``), the JSON IS
  the content: ``answer`` items are prose beside it and are not sent, and an answer without
  ``answer_json`` is an `UpstreamError` (the client asked for JSON, prose would not parse);
- ``retrieval`` / ``status`` / ``citations`` / ``footnote_citations`` / ``metadata`` are
  remembered; ``prequeries``, ``relations``, ``augmented_context``, ``debug`` and
  ``consumption`` are ignored; unknown types are skipped with a ``nuclia_item_skipped`` debug
  event, so new Nuclia item types do not break clients.

``status`` is not the last line (citations and token usage follow it), so the finish chunk is
sent when the body ends: ``finish_reason: "stop"`` plus the extension field ``"nuclia"``::

    {"status": "success"|"no_context"|"no_retrieval_data", "status_code": "0",
     "learning_id": str | None, "citations": {...}, "footnote_citations": {...},
     "sources": [{"resource_id", "title", "field", "paragraph_id", "score", "score_type"}],
     "no_context": bool, "no_retrieval_data": bool, "answer_json"?: {...}, "details"?: str}

and ``"usage": usage_dict(input, output)`` when a ``metadata`` item carried ``tokens`` (never
estimated here). Both the real wrapped line shape ``{"item": {"type": ...}}`` and the flat
``{"item_type": ...}`` of the seed spec are read. Failures are raised AFTER what was already
translated has been yielded: an ``error`` item or an error ``status`` -> `UpstreamError`, a line
that is not a JSON object with an item type, or a body ending without a ``status`` ->
`UpstreamProtocolError`; every message names the backend.

`completion_from_sync` turns an ``X-Synchronous: true`` answer (``SyncAskResponse``) into the
same ``chat.completion`` shape with the same extension.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterable
from typing import Any

import orjson
import structlog

from gateway.backends.failures import MAX_DETAIL, failed_mid_answer
from gateway.errors import UpstreamError, UpstreamProtocolError
from gateway.wire import chunk, usage_dict

log = structlog.get_logger("gateway.backends.nuclia")

STATUS_BY_CODE = {"0": "success", "-1": "error", "-2": "no_context", "-3": "no_retrieval_data"}
IGNORED_ITEMS = frozenset({"prequeries", "relations", "augmented_context", "debug",
                           "consumption"})
MAX_SOURCES = 100


class AskState:
    """What the translation remembers of the non-text items until the body ends."""

    __slots__ = ("status", "status_code", "details", "learning_id", "citations", "footnotes",
                 "sources", "answer_json", "tokens", "text_seen")

    def __init__(self, learning_id: str | None = None) -> None:
        self.status: str | None = None
        self.status_code: str | None = None
        self.details: str | None = None
        self.learning_id = learning_id
        self.citations: dict[str, Any] = {}
        self.footnotes: dict[str, Any] = {}
        self.sources: list[dict[str, Any]] = []
        self.answer_json: Any = None
        self.tokens: tuple[int, int] | None = None
        self.text_seen = False

    def set_status(self, code: Any, status: Any, details: Any) -> None:
        code = str(code) if code is not None else None
        if not isinstance(status, str) or not status:
            status = STATUS_BY_CODE.get(code or "", "success" if code is None else "error")
        self.status, self.status_code = status, code
        if isinstance(details, str) and details:
            self.details = details[:MAX_DETAIL]

    @property
    def failed(self) -> bool:
        return self.status == "error" or self.status_code == "-1"

    def set_tokens(self, tokens: Any) -> None:
        if isinstance(tokens, dict):
            prompt, completion = tokens.get("input"), tokens.get("output")
            if isinstance(prompt, int | float) and isinstance(completion, int | float):
                self.tokens = (int(prompt), int(completion))

    def remember(self, kind: str, item: dict[str, Any]) -> bool:
        """Keep what an item of this kind says for the final chunk; False if none is kept."""
        if kind == "status":
            self.set_status(item.get("code"), item.get("status"), item.get("details"))
            if self.learning_id is None and isinstance(item.get("learning_id"), str):
                self.learning_id = item["learning_id"]  # the seed spec's flat status
        elif kind == "metadata":
            self.set_tokens(item.get("tokens"))
        elif kind == "retrieval":
            self.sources = summarise_retrieval(item.get("results"), item.get("best_matches"))
        elif kind == "citations":
            self.citations = _as_dict(item.get("citations"))
        elif kind == "footnote_citations":
            self.footnotes = _as_dict(item.get("footnote_to_context"))
        else:
            return False
        return True

    def usage(self) -> dict[str, Any] | None:
        return usage_dict(*self.tokens) if self.tokens is not None else None

    def extension(self) -> dict[str, Any]:
        ext: dict[str, Any] = {
            "status": self.status,
            "status_code": self.status_code,
            "learning_id": self.learning_id,
            "citations": self.citations,
            "footnote_citations": self.footnotes,
            "sources": self.sources,
            "no_context": self.status == "no_context",
            "no_retrieval_data": self.status == "no_retrieval_data",
        }
        if self.answer_json is not None:
            ext["answer_json"] = self.answer_json
        if self.details:
            ext["details"] = self.details
        return ext


def _as_dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def summarise_retrieval(results: Any, best_matches: Any = None) -> list[dict[str, Any]]:
    """Find results reduced to what a client can cite: ids, titles and scores (no text).

    Ordered as Nuclia's ``best_matches`` when given, else by score; at most `MAX_SOURCES`.
    """
    results = _as_dict(results)
    sources: list[dict[str, Any]] = []
    for rid, resource in _as_dict(results.get("resources")).items():
        resource = _as_dict(resource)
        title = resource.get("title")
        for field_id, field in _as_dict(resource.get("fields")).items():
            for pid, paragraph in _as_dict(_as_dict(field).get("paragraphs")).items():
                paragraph = _as_dict(paragraph)
                sources.append({
                    "resource_id": rid, "title": title, "field": field_id,
                    "paragraph_id": paragraph.get("id") or pid,
                    "score": paragraph.get("score"), "score_type": paragraph.get("score_type"),
                })
    ranks: dict[str, int] = {}
    for match in best_matches or results.get("best_matches") or ():
        key = match.get("id") if isinstance(match, dict) else match
        if isinstance(key, str):
            ranks.setdefault(key, len(ranks))
    last = len(ranks)

    def order(source: dict[str, Any]) -> tuple[int, float]:
        score = source["score"]
        return ranks.get(source["paragraph_id"], last), -(score if isinstance(
            score, int | float) else 0.0)

    sources.sort(key=order)
    return sources[:MAX_SOURCES]


def _decode(line: bytes, backend: str) -> tuple[str, dict[str, Any]]:
    """One line -> (item type, item fields). Real lines are wrapped, seed-spec lines are flat."""
    try:
        data = orjson.loads(line)
    except orjson.JSONDecodeError:
        raise UpstreamProtocolError(
            f"The upstream '{backend}' sent a line of its answer stream that is not JSON.",
            backend=backend,
        ) from None
    if type(data) is dict:
        item = data.get("item")
        if type(item) is dict:
            kind = item.get("type")
            if type(kind) is str:
                return kind, item
        elif type(data.get("item_type")) is str:
            return data["item_type"], data
    raise UpstreamProtocolError(
        f"The upstream '{backend}' sent a line of its answer stream without an item type.",
        backend=backend,
    )


def _text(item: dict[str, Any], field: str, backend: str) -> str:
    text = item.get(field)
    if type(text) is not str:
        raise UpstreamProtocolError(
            f"The upstream '{backend}' sent an '{item.get('type', item.get('item_type'))}' "
            f"item without its '{field}' text.",
            backend=backend,
        )
    return text


class AskTranslator:
    """The translation as a small state machine: `start`, then `line` per ndjson line, then
    `finish` at the end of the body. `translate_ask_stream` drives it over an async iterator;
    the backend drives it per upstream read, so chunks of one read leave in one write."""

    def __init__(self, *, backend: str, cid: str, model: str, created: int,
                 learning_id: str | None = None, structured: bool = False) -> None:
        self.backend = backend
        self.cid = cid
        self.model = model
        self.created = created
        self.state = AskState(learning_id)
        self.structured = structured
        self.prose = ""  # structured: the answer text Nuclia sent beside its JSON (for the log)

    def start(self) -> dict[str, Any]:
        return chunk(self.cid, self.model, self.created, {"role": "assistant", "content": ""})

    def line(self, line: bytes) -> dict[str, Any] | None:
        """One line -> the chunk to send at once, if any; raises on a failure item."""
        kind, item = _decode(line, self.backend)
        if kind == "answer":
            return self._answer(_text(item, "text", self.backend))
        if kind == "reasoning":
            text = _text(item, "text", self.backend)
            if not text:
                return None
            return chunk(self.cid, self.model, self.created, {"reasoning_content": text})
        if kind == "answer_json":
            return self._answer_json(item.get("object"))
        if kind == "error":
            raise failed_mid_answer(self.backend, str(item.get("error") or "no detail given"))
        if not self.state.remember(kind, item) and kind not in IGNORED_ITEMS:
            log.debug("nuclia_item_skipped", backend=self.backend, item_type=kind[:64])
        return None

    def _answer(self, text: str) -> dict[str, Any] | None:
        """Answer text is the content, unless the request asked for JSON: then it is prose
        beside the JSON, kept for the log only."""
        if not text:
            return None
        if self.structured:
            self.prose = (self.prose + text)[:MAX_DETAIL]
            return None
        self.state.text_seen = True
        return chunk(self.cid, self.model, self.created, {"content": text})

    def _answer_json(self, answer_json: Any) -> dict[str, Any] | None:
        """Kept for the extension, and sent as the content when the request asked for it or
        no answer text came."""
        state = self.state
        state.answer_json = answer_json
        if (state.text_seen and not self.structured) or answer_json is None:
            return None
        state.text_seen = True
        return chunk(self.cid, self.model, self.created,
                     {"content": orjson.dumps(answer_json).decode()})

    def finish(self) -> dict[str, Any]:
        """The end of the body: the finish chunk, or the failure it ended on."""
        backend, state = self.backend, self.state
        if state.status is None:
            raise UpstreamProtocolError(
                f"The upstream '{backend}' closed its answer stream before the answer "
                "finished.",
                backend=backend,
            )
        if state.failed:
            raise _generation_failed(backend, state)
        if self.structured and state.answer_json is None:
            raise without_json(backend, state, self.prose)
        final = chunk(self.cid, self.model, self.created, {}, "stop")
        final["nuclia"] = state.extension()
        usage = state.usage()
        if usage is not None:
            final["usage"] = usage
        return final


async def translate_ask_stream(
    lines: AsyncIterable[bytes],
    *,
    backend: str,
    cid: str,
    model: str,
    created: int,
    learning_id: str | None = None,
    structured: bool = False,
) -> AsyncGenerator[dict[str, Any], None]:
    """Nuclia ndjson lines -> OpenAI chunks (see the module docstring for the mapping)."""
    translator = AskTranslator(backend=backend, cid=cid, model=model, created=created,
                               learning_id=learning_id, structured=structured)
    yield translator.start()
    async for line in lines:
        translated = translator.line(line)
        if translated is not None:
            yield translated
    yield translator.finish()


def _generation_failed(backend: str, state: AskState) -> UpstreamError:
    return UpstreamError(f"The upstream '{backend}' could not generate the answer.",
                         backend=backend, detail=state.details or "no detail given")


def without_json(backend: str, state: AskState, prose: str) -> UpstreamError:
    """A structured request answered with prose only (e.g. nothing found to answer from)."""
    return UpstreamError(
        f"The upstream '{backend}' answered without the JSON that response_format asked for "
        f"(answer status: {state.status}).", backend=backend, detail=prose or "no answer text")


def _sync_state(data: dict[str, Any], backend: str, learning_id: str | None) -> AskState:
    """What a ``SyncAskResponse`` says beside its text; raises if the answer failed."""
    state = AskState(data.get("learning_id") or learning_id)
    status = data.get("status")
    state.set_status(None, status if isinstance(status, str) else "success",
                     data.get("error_details"))
    state.status_code = next((c for c, s in STATUS_BY_CODE.items() if s == state.status), None)
    if state.failed:
        raise _generation_failed(backend, state)
    state.citations = _as_dict(data.get("citations"))
    state.footnotes = _as_dict(data.get("citation_footnote_to_context"))
    state.sources = summarise_retrieval(data.get("retrieval_results"),
                                        data.get("retrieval_best_matches"))
    state.answer_json = data.get("answer_json")
    state.set_tokens(_as_dict(data.get("metadata")).get("tokens"))
    return state


def _sync_message(data: dict[str, Any], state: AskState, structured: bool) -> dict[str, Any]:
    """The assistant message of a ``SyncAskResponse``, as the stream would have built it."""
    content: str = data["answer"]
    if (structured or not content) and state.answer_json is not None:
        content = orjson.dumps(state.answer_json).decode()
    message: dict[str, Any] = {"role": "assistant", "content": content}
    reasoning = data.get("reasoning")
    if isinstance(reasoning, str) and reasoning:
        message["reasoning_content"] = reasoning
    message["nuclia"] = state.extension()
    return message


def completion_from_sync(
    data: Any, *, backend: str, cid: str, model: str, created: int,
    learning_id: str | None = None, structured: bool = False,
) -> dict[str, Any]:
    """An ``X-Synchronous: true`` answer (``SyncAskResponse``) -> a ``chat.completion`` dict;
    `structured` as in `AskTranslator`."""
    if not isinstance(data, dict) or not isinstance(data.get("answer"), str):
        raise UpstreamProtocolError(
            f"The upstream '{backend}' answered without an 'answer' field.", backend=backend
        )
    state = _sync_state(data, backend, learning_id)
    if structured and state.answer_json is None:
        raise without_json(backend, state, data["answer"][:MAX_DETAIL])
    completion: dict[str, Any] = {
        "id": cid, "object": "chat.completion", "created": created, "model": model,
        "choices": [{"index": 0, "message": _sync_message(data, state, structured),
                     "finish_reason": "stop"}],
    }
    usage = state.usage()
    if usage is not None:
        completion["usage"] = usage
    return completion
