"""The Responses API (``POST /v1/responses``) on the chat pipeline: `ResponsesApi` parses and
translates the request (`gateway.responses_request`), `ResponsesEncoder` writes the answer
as a ``response`` object or as its event stream.

Output items, in the order they came: a ``reasoning`` item (Nuclia's reasoning, as summary
text), a ``message`` with one ``output_text`` part (Nuclia citations as ``file_citation``
annotations), ``function_call`` items. A stream is ``response.created``,
``response.in_progress``, each item's added / delta / done events and ``response.completed``
(``response.incomplete`` when the token budget cut it); a failure mid-stream is an ``error``
event and ``response.failed``, never a completed response. With ``store`` (the default) the
response and its conversation are kept for ``previous_response_id`` and ``GET``.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from typing import Any, Literal

import orjson

from gateway.answer import Answer
from gateway.auth import Principal
from gateway.errors import GatewayError, NotFound
from gateway.exchange import Api as ApiName
from gateway.pipeline import Exchange, Parsed, estimated_usage
from gateway.responses_request import Translated, parse_responses_request, translate
from gateway.stores.responses import ResponseStore, StoredResponse

Kind = Literal["reasoning", "message", "function_call"]


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(16)}"


@dataclass(slots=True)
class Slot:
    """One output item: its kind, id, place in ``output`` and, for a call, the tool index."""

    kind: Kind
    id: str
    index: int
    tool: int = 0


class ResponsesApi:
    name: ApiName = "responses"
    path = "/v1/responses"

    def __init__(self, store: ResponseStore) -> None:
        self.store = store

    async def parse(self, raw: bytes, principal: Principal) -> Parsed:
        request = parse_responses_request(raw)
        history: list[dict[str, Any]] = []
        if request.previous_response_id is not None:
            previous = await self.store.get(principal.team, request.previous_response_id)
            if previous is None:
                raise NotFound(
                    f"Previous response with id '{request.previous_response_id}' not found.",
                    param="previous_response_id", code="previous_response_not_found")
            history = previous.conversation
        translated = translate(request, history)
        encoder = ResponsesEncoder(translated, self.store, principal.team)
        return Parsed(translated.body, translated.chat, encoder)


# -- output items ----------------------------------------------------------------------------


def citations(answer: Answer) -> list[dict[str, Any]]:
    """Nuclia's citations (paragraph -> ranges of the answer) as file citations."""
    nuclia = answer.extensions.get("nuclia")
    if not isinstance(nuclia, dict) or not isinstance(nuclia.get("citations"), dict):
        return []
    titles = {s.get("paragraph_id"): s.get("title") or s.get("resource_id")
              for s in nuclia.get("sources") or () if isinstance(s, dict)}
    return [{"type": "file_citation", "file_id": paragraph,
             "filename": str(titles.get(paragraph) or paragraph),
             "index": end, "start_index": start, "end_index": end}
            for paragraph, ranges in nuclia["citations"].items()
            for start, end in _spans(ranges)]


def _spans(ranges: Any) -> list[tuple[int, int]]:
    """Nuclia's ``[[start, end], ...]`` of one paragraph, what is well formed of it."""
    if not isinstance(ranges, list):
        return []
    return [(span[0], span[1]) for span in ranges
            if isinstance(span, list) and len(span) == 2
            and all(isinstance(i, int) for i in span)]


def output_text(answer: Answer) -> dict[str, Any]:
    return {"type": "output_text", "text": answer.text, "annotations": citations(answer),
            "logprobs": []}


def final_item(slot: Slot, answer: Answer) -> dict[str, Any]:
    """An output item as it ends, from the whole answer."""
    if slot.kind == "reasoning":
        return {"id": slot.id, "type": "reasoning", "status": "completed", "summary": [
            {"type": "summary_text", "text": "".join(answer.reasoning)}]}
    if slot.kind == "message":
        return {"id": slot.id, "type": "message", "role": "assistant", "status": "completed",
                "content": [output_text(answer)]}
    call = answer.tool_calls.get(slot.tool) or {}
    function = call.get("function") or {}
    return {"id": slot.id, "type": "function_call", "status": "completed",
            "call_id": call.get("id") or slot.id, "name": function.get("name") or "",
            "arguments": function.get("arguments") or ""}


def whole_slots(answer: Answer) -> list[Slot]:
    """The items of an answer given whole: reasoning, the message, the calls."""
    slots: list[Slot] = []
    if answer.reasoning:
        slots.append(Slot("reasoning", new_id("rs"), len(slots)))
    if answer.content or not answer.tool_calls:
        slots.append(Slot("message", new_id("msg"), len(slots)))
    for tool in sorted(answer.tool_calls):
        slots.append(Slot("function_call", new_id("fc"), len(slots), tool))
    return slots


def responses_usage(usage: dict[str, Any]) -> dict[str, Any]:
    prompt = int(usage.get("prompt_tokens") or 0)
    completion = int(usage.get("completion_tokens") or 0)
    return {"input_tokens": prompt,
            "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens": completion, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt + completion}


def assistant_message(answer: Answer) -> dict[str, Any]:
    """The answer as the chat message a continuation sends back upstream."""
    message: dict[str, Any] = {"role": "assistant", "content": answer.text or None}
    if answer.tool_calls:
        message["tool_calls"] = [answer.tool_calls[i] for i in sorted(answer.tool_calls)]
    return message


# -- the encoder -----------------------------------------------------------------------------


class ResponsesEncoder:
    def __init__(self, translated: Translated, store: ResponseStore, team: str) -> None:
        self.translated = translated
        self.store = store
        self.team = team
        self.id = new_id("resp")
        self.created = int(time.time())
        self.sequence = 0
        self.slots: list[Slot] = []
        self.open: Slot | None = None

    # the response object

    def response(self, ex: Exchange, status: str, output: list[dict[str, Any]],
                 usage: dict[str, Any] | None = None) -> dict[str, Any]:
        request = self.translated.request
        text = request.text.format if request.text is not None else None
        return {
            "id": self.id, "object": "response", "created_at": self.created, "status": status,
            "error": None, "incomplete_details": None, "instructions": request.instructions,
            "max_output_tokens": request.max_output_tokens, "model": ex.route.model,
            "output": output,
            "parallel_tool_calls": request.parallel_tool_calls is not False,
            "previous_response_id": request.previous_response_id,
            "reasoning": {"effort": None, "summary": None}, "store": request.store,
            "temperature": 1.0 if request.temperature is None else request.temperature,
            "text": {"format": text.model_dump(by_alias=True, exclude_none=True)
                     if text is not None else {"type": "text"}},
            "tool_choice": request.tool_choice or "auto", "tools": request.tools or [],
            "top_p": 1.0 if request.top_p is None else request.top_p,
            "truncation": "disabled", "usage": usage, "user": request.user,
            "metadata": request.metadata or {},
        }

    async def _finished(self, ex: Exchange, slots: list[Slot]) -> dict[str, Any]:
        """The final response object, stored when the request asked for it."""
        answer = ex.answer
        answer.usage = answer.usage or estimated_usage(ex)
        cut = answer.finish_reason == "length"
        response = self.response(ex, "incomplete" if cut else "completed",
                                 [final_item(slot, answer) for slot in slots],
                                 responses_usage(answer.usage))
        if cut:
            response["incomplete_details"] = {"reason": "max_output_tokens"}
        if self.translated.request.store:
            conversation = [*self.translated.conversation, assistant_message(answer)]
            await self.store.put(StoredResponse(self.id, self.team, response, conversation))
        return response

    async def whole(self, ex: Exchange, completion: dict[str, Any]) -> bytes:
        return orjson.dumps(await self._finished(ex, whole_slots(ex.answer)))

    # the stream

    def event(self, kind: str, **fields: Any) -> bytes:
        fields["type"] = kind
        fields["sequence_number"] = self.sequence
        self.sequence += 1
        return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(fields) + b"\n\n"

    def relay(self, ex: Exchange, batch: list[dict[str, Any]]) -> list[bytes]:
        out = self._start(ex) if self.sequence == 0 else []
        for data in batch:
            ex.answer.add_chunk(data)
            out += self._events(ex.answer, data)
        return out

    def _start(self, ex: Exchange) -> list[bytes]:
        begun = self.response(ex, "in_progress", [])
        return [self.event("response.created", response=begun),
                self.event("response.in_progress", response=begun)]

    def _events(self, answer: Answer, data: dict[str, Any]) -> list[bytes]:
        out: list[bytes] = []
        for choice in data.get("choices") or ():
            if choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") or {}
            if delta.get("reasoning_content"):
                out += self._reasoning(answer, delta["reasoning_content"])
            if delta.get("content"):
                out += self._text(answer, delta["content"])
            for call in delta.get("tool_calls") or ():
                out += self._call(answer, call)
        return out

    def _opening(self, answer: Answer, kind: Kind, prefix: str, tool: int = 0
                 ) -> tuple[list[bytes], Slot | None]:
        """Close the open item unless it is this one; (events, the new item or None)."""
        current = self.open
        if current is not None and current.kind == kind and current.tool == tool:
            return [], None
        out = self._close(answer)
        slot = self.open = Slot(kind, new_id(prefix), len(self.slots), tool)
        self.slots.append(slot)
        return out, slot

    def _reasoning(self, answer: Answer, text: str) -> list[bytes]:
        out, slot = self._opening(answer, "reasoning", "rs")
        if slot is not None:
            out += [self.event("response.output_item.added", output_index=slot.index, item={
                        "id": slot.id, "type": "reasoning", "summary": []}),
                    self.event("response.reasoning_summary_part.added", item_id=slot.id,
                               output_index=slot.index, summary_index=0,
                               part={"type": "summary_text", "text": ""})]
        current = self.open
        assert current is not None
        out.append(self.event("response.reasoning_summary_text.delta", item_id=current.id,
                              output_index=current.index, summary_index=0, delta=text))
        return out

    def _text(self, answer: Answer, text: str) -> list[bytes]:
        out, slot = self._opening(answer, "message", "msg")
        if slot is not None:
            out += [self.event("response.output_item.added", output_index=slot.index, item={
                        "id": slot.id, "type": "message", "role": "assistant",
                        "status": "in_progress", "content": []}),
                    self.event("response.content_part.added", item_id=slot.id,
                               output_index=slot.index, content_index=0, part={
                                   "type": "output_text", "text": "", "annotations": [],
                                   "logprobs": []})]
        current = self.open
        assert current is not None
        out.append(self.event("response.output_text.delta", item_id=current.id,
                              output_index=current.index, content_index=0, delta=text,
                              logprobs=[]))
        return out

    def _call(self, answer: Answer, call: dict[str, Any]) -> list[bytes]:
        tool = call.get("index", 0)
        out, slot = self._opening(answer, "function_call", "fc", tool)
        current = self.open
        assert current is not None
        if slot is not None:
            added = final_item(slot, answer)
            added.update(status="in_progress", arguments="")
            out.append(self.event("response.output_item.added", output_index=slot.index,
                                  item=added))
        fragment = (call.get("function") or {}).get("arguments")
        if fragment:
            out.append(self.event("response.function_call_arguments.delta",
                                  item_id=current.id, output_index=current.index,
                                  delta=fragment))
        return out

    def _close(self, answer: Answer) -> list[bytes]:
        """The events that end the open item (none when no item is open)."""
        slot, self.open = self.open, None
        if slot is None:
            return []
        item = final_item(slot, answer)
        where = {"item_id": slot.id, "output_index": slot.index}
        if slot.kind == "reasoning":
            part = item["summary"][0]
            out = [self.event("response.reasoning_summary_text.done", **where, summary_index=0,
                              text=part["text"]),
                   self.event("response.reasoning_summary_part.done", **where, summary_index=0,
                              part=part)]
        elif slot.kind == "message":
            part = item["content"][0]
            out = [self.event("response.output_text.annotation.added", **where,
                              content_index=0, annotation_index=i, annotation=annotation)
                   for i, annotation in enumerate(part["annotations"])]
            out += [self.event("response.output_text.done", **where, content_index=0,
                               text=part["text"], logprobs=[]),
                    self.event("response.content_part.done", **where, content_index=0,
                               part=part)]
        else:
            out = [self.event("response.function_call_arguments.done", **where,
                              arguments=item["arguments"])]
        out.append(self.event("response.output_item.done", output_index=slot.index, item=item))
        return out

    async def close(self, ex: Exchange) -> list[bytes]:
        out = self._start(ex) if self.sequence == 0 else []
        if not self.slots:  # an empty answer is still an (empty) message
            out += self._text(ex.answer, "")
        out += self._close(ex.answer)
        response = await self._finished(ex, self.slots)
        kind = "response.completed" if response["status"] == "completed" \
            else "response.incomplete"
        out.append(self.event(kind, response=response))
        return out

    async def replay(self, ex: Exchange) -> bytes:
        answer = ex.answer
        if not ex.chat.stream:
            return await self.whole(ex, {})
        out = self._start(ex)
        for data in answer.replay_chunks(self.id, ex.route.model, self.created,
                                         include_usage=False, pieces=None):
            out += self._events(answer, data)
        out += await self.close(ex)
        return b"".join(out)

    def failure(self, ex: Exchange, exc: GatewayError) -> bytes:
        """An ``error`` event, then the response as failed: the SDKs report the one or the
        other, and neither looks like a complete answer."""
        out = self._start(ex) if self.sequence == 0 else []
        code = "rate_limit_exceeded" if exc.status == 429 else "server_error"
        out.append(self.event("error", code=exc.code or code, message=exc.message,
                              param=exc.param))
        failed = self.response(ex, "failed", [final_item(slot, ex.answer)
                                              for slot in self.slots])
        failed["error"] = {"code": code, "message": exc.message}
        out.append(self.event("response.failed", response=failed))
        return b"".join(out)
