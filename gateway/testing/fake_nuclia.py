"""A local fake of a Nuclia Knowledge Box's ``POST /api/v1/kb/{kbid}/ask``, in the REAL format.

Streamed answers are ndjson lines wrapped as ``{"item": {"type": ...}}`` in Nuclia's real
order: ``reasoning``*, ``answer``*, ``answer_json``, ``retrieval``, ``prequeries``, ``status``,
``augmented_context``, ``citations``, ``footnote_citations``, ``metadata``, ``consumption``,
``relations``, ``debug`` (the optional ones only when asked for). ``X-Synchronous: true``
returns one ``SyncAskResponse`` JSON object instead. Every response carries a
``NUCLIA-LEARNING-ID`` header. Lines are built by hand with orjson (``nucliadb_models`` is a
test-only dependency); the tests check that every line validates with ``AskResponseItem``.

Like Nuclia, it answers 404 for an unknown Knowledge Box, 401 ``{"detail": ...}`` without the
right ``X-NUCLIA-SERVICEACCOUNT: Bearer <token>`` (when `token` is set), and 422 (FastAPI style
``{"detail": [{"loc", "msg", "type"}]}``) for a missing query, ``chat_history`` together with
``context``, an author other than ``USER``/``NUCLIA``, or an unknown ``X-NDB-Client``.

The answer is derived from the query (`answer_text`), split into ~10 ``answer`` items, and says
clearly that it is a SAMPLE. Markers in the query select a scenario:

    [401] [402] [403] [404] [412] [422] [429] [500] [503] [529] [530]
                     that HTTP error before the stream ({"detail": ...}; 429 has retry-after: 7;
                     the 429 and 5xx details name internal hosts and paths, as real ones can)
    [html-502]       a proxy's HTML error page
    [no-retrieval]   status -3 first, "Not enough data to answer this.", empty retrieval,
                     no metadata (as Nuclia does when nothing is found)
    [no-context]     the answer, status -2 (no_context), metadata
    [llm-error]      three answer items, retrieval, status -1 "error", end (no metadata)
    [stream-error]   two answer items, then an ``error`` item, end
    [cut]            the body stops after half the answer items (no status)
    [malformed]      a line that is not JSON after two answer items
    [slow]           `slow_delay` seconds (default 0.15) before every item
    [hang]           never answers (for timeouts)
    [reasoning]      two ``reasoning`` items first (also when the request sets ``reasoning``)
    [flat]           the seed spec's flat ``{"item_type": ...}`` lines instead of wrapped ones
    [big-retrieval]  a retrieval line of more than 1 MiB
    [all-items]      every item type of the real models, including the rare ones
    [chunks=N]       N answer items (default 10)

``citations`` (``true``/``"default"``) adds a ``citations`` item, ``"llm_footnotes"`` also a
``footnote_citations`` item; ``X-Show-Consumption: true`` adds ``consumption``;
``answer_json_schema`` adds an ``answer_json`` item holding an instance of that schema (a schema
the fake cannot follow is a 422, as Nuclia validates it). Counters on ``app.state``: ``calls``,
``streams_finished``, ``streams_cancelled``, ``last_body``, ``last_headers``.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from gateway.testing.fake_inkeep import HTML_502, INTERNAL_DETAIL
from gateway.testing.schema_answer import SchemaError, schema_instance

SAMPLE_NOTE = "(sample answer from the gateway's local fake Nuclia Knowledge Box)"
NOT_ENOUGH_DATA = "Not enough data to answer this."
NDB_CLIENTS = frozenset({"api", "widget", "web", "dashboard", "desktop", "chrome_extension",
                         "mcp"})
_CHUNKS = re.compile(r"\[chunks=(\d+)\]")
_STATUS = re.compile(r"\[(401|402|403|404|412|422|429|500|503|529|530)\]")
_DETAILS = {401: "Invalid service account token", 402: "Usage limits exceeded",
            403: "Forbidden", 404: "Knowledge Box not found",
            412: "Invalid query: rephrase impossible", 422: "Invalid query",
            429: f"Too many requests {INTERNAL_DETAIL}",
            500: f"Internal server error {INTERNAL_DETAIL}",
            503: f"Service unavailable {INTERNAL_DETAIL}",
            529: f"Rephrase error {INTERNAL_DETAIL}", 530: f"Retrieval error {INTERNAL_DETAIL}"}


def answer_text(query: str) -> str:
    """The fake's deterministic answer for a query."""
    return f"{SAMPLE_NOTE} You asked: {query.strip()}"


def split_answer(text: str, pieces: int) -> list[str]:
    size = max(1, -(-len(text) // max(1, pieces)))
    return [text[i:i + size] for i in range(0, len(text), size)]


def fake_tokens(query: str, answer: str) -> tuple[int, int]:
    """The (input, output) tokens the fake reports in its ``metadata`` item."""
    return 200 + len(query) // 4, max(1, len(answer) // 4)


def learning_id(call: int) -> str:
    return f"{call:032x}"


# -- items -----------------------------------------------------------------------------------


def _paragraph(rid: str, order: int, text: str, score: float) -> dict[str, Any]:
    pid = f"{rid}/t/text/{order * 100}-{order * 100 + len(text)}"
    return {"score": score, "score_type": "BOTH", "order": order, "text": text, "id": pid,
            "labels": [], "position": None, "fuzzy_result": False, "page_with_visual": False,
            "reference": None, "is_a_table": False, "relevant_relations": None}


def find_results(query: str, *, empty: bool = False, big: bool = False) -> dict[str, Any]:
    """``KnowledgeboxFindResults``: two sample resources with three paragraphs each."""
    resources: dict[str, Any] = {}
    matches: list[str] = []
    if not empty:
        filler = "x" * (1 << 20) if big else ""
        for r in range(2):
            rid = f"{r + 1:032x}"
            paragraphs = {}
            for p in range(3):
                text = f"Sample paragraph {p} of sample resource {r + 1}. {filler}"
                para = _paragraph(rid, p, text, round(0.9 - 0.1 * (r + 3 * p) / 2, 3))
                paragraphs[para["id"]] = para
                matches.append(para["id"])
            resources[rid] = {"id": rid, "slug": f"sample-{r + 1}",
                              "title": f"Sample resource {r + 1}", "summary": None,
                              "fields": {"/t/text": {"paragraphs": paragraphs}}}
    return {"resources": resources, "relations": None, "query": query,
            "rephrased_query": None, "total": len(matches), "page_number": 0,
            "page_size": 20, "next_page": False, "nodes": None, "shards": None,
            "autofilters": [], "min_score": {"semantic": 0.7, "bm25": 0.0},
            "best_matches": matches, "metrics": None, "search_after": None}


def _status(code: str, status: str, details: str | None = None) -> dict[str, Any]:
    return {"type": "status", "code": code, "status": status, "details": details}


def _tokens(query: str, answer: str) -> dict[str, Any]:
    prompt, completion = fake_tokens(query, answer)
    return {"input": prompt, "output": completion, "input_nuclia": prompt / 1000,
            "output_nuclia": completion / 1000}


def _citations(results: dict[str, Any], answer: str) -> dict[str, Any]:
    return {pid: [[0, min(20, len(answer))]] for pid in results["best_matches"][:2]}


def _generated(query: str, body: dict[str, Any], text: str, everything: bool
               ) -> list[dict[str, Any]]:
    """What the LLM sends: reasoning*, answer*, answer_json."""
    items: list[dict[str, Any]] = []
    if body.get("reasoning") or "[reasoning]" in query or everything:
        items += [{"type": "reasoning", "text": "Sample reasoning: read the question. "},
                  {"type": "reasoning", "text": "Then answer it from the sample resources."}]
    count = int(m.group(1)) if (m := _CHUNKS.search(query)) else 10
    items += [{"type": "answer", "text": piece} for piece in split_answer(text, count)]
    schema = body.get("answer_json_schema")
    if schema:
        items.append({"type": "answer_json", "object": schema_instance(schema, text=text)})
    elif everything:
        items.append({"type": "answer_json", "object": {"answer": text, "sample": True}})
    return items


def _found(query: str, results: dict[str, Any], everything: bool) -> list[dict[str, Any]]:
    """What retrieval found, and the outcome: retrieval, prequeries, status,
    augmented_context."""
    items: list[dict[str, Any]] = [
        {"type": "retrieval", "results": results,
         "best_matches": [{"id": pid} for pid in results["best_matches"]]}]
    if everything:
        items.append({"type": "prequeries", "results": {"sample": find_results(query)}})
    if "[no-context]" in query:
        items.append(_status("-2", "no_context"))
    else:
        items.append(_status("0", "success"))
    if everything:
        items.append({"type": "augmented_context", "augmented": {"paragraphs": {},
                                                                 "fields": {}}})
    return items


def _cited(citations: Any, results: dict[str, Any], text: str, everything: bool
           ) -> list[dict[str, Any]]:
    """The citations asked for: citations, footnote_citations."""
    items: list[dict[str, Any]] = []
    if (citations not in (None, False, "none")) or everything:
        items.append({"type": "citations", "citations": _citations(results, text)})
    if citations == "llm_footnotes" or everything:
        items.append({"type": "footnote_citations",
                      "footnote_to_context": {"block-AA": results["best_matches"][0]}})
    return items


def _accounted(query: str, text: str, headers: Any, everything: bool
               ) -> list[dict[str, Any]]:
    """Token usage and billing: metadata, consumption."""
    items: list[dict[str, Any]] = [
        {"type": "metadata", "tokens": _tokens(query, text),
         "timings": {"generative_first_chunk": 0.05, "generative_total": 0.2}}]
    if headers.get("x-show-consumption") == "true" or everything:
        prompt, completion = fake_tokens(query, text)
        items.append({"type": "consumption",
                      "normalized_tokens": {"input": prompt / 1000, "output": completion / 1000,
                                            "image": 0.0},
                      "customer_key_tokens": {"input": 0.0, "output": 0.0, "image": 0.0}})
    return items


def _items(query: str, body: dict[str, Any], headers: Any) -> list[dict[str, Any]]:
    """The items of one answer, in Nuclia's order, before any scenario cuts them short."""
    text = answer_text(query)
    everything = "[all-items]" in query
    results = find_results(query, big="[big-retrieval]" in query)
    items = [*_generated(query, body, text, everything),
             *_found(query, results, everything),
             *_cited(body.get("citations"), results, text, everything),
             *_accounted(query, text, headers, everything)]
    if everything:
        items.append({"type": "relations", "relations": {"entities": {}}})
        items.append({"type": "debug", "metadata": {"sample": True}, "metrics": {}})
    return items


def scenario_items(query: str, body: dict[str, Any], headers: Any) -> list[dict[str, Any]]:
    """The items actually sent for this query, scenario markers applied."""
    if "[no-retrieval]" in query:
        return [_status("-3", "no_retrieval_data"), {"type": "answer", "text": NOT_ENOUGH_DATA},
                {"type": "retrieval", "results": find_results(query, empty=True),
                 "best_matches": []}]
    items = _items(query, body, headers)
    answers = [i for i, item in enumerate(items) if item["type"] == "answer"]
    if "[llm-error]" in query:
        kept = items[:answers[min(2, len(answers) - 1)] + 1]
        retrieval = next(item for item in items if item["type"] == "retrieval")
        return [*kept, retrieval, _status("-1", "error", f"Sample LLM failure {INTERNAL_DETAIL}")]
    if "[stream-error]" in query:
        return [*items[:answers[min(1, len(answers) - 1)] + 1],
                {"type": "error", "error": f"Sample unexpected failure {INTERNAL_DETAIL}"}]
    if "[cut]" in query:
        return items[:answers[len(answers) // 2]]
    return items


def encode(item: dict[str, Any], *, flat: bool = False) -> bytes:
    """One ndjson line: ``{"item": {...}}`` (real) or ``{"item_type": ...}`` (seed spec)."""
    if flat:
        rest = {k: v for k, v in item.items() if k != "type"}
        return orjson.dumps({"item_type": item["type"], **rest}) + b"\n"
    return orjson.dumps({"item": item}) + b"\n"


def sync_response(query: str, body: dict[str, Any], headers: Any, lid: str) -> dict[str, Any]:
    """The ``SyncAskResponse`` equivalent of the streamed items."""
    items = scenario_items(query, body, headers)
    by_type: dict[str, dict[str, Any]] = {}
    for item in items:
        by_type.setdefault(item["type"], item)
    status = by_type.get("status", {})
    retrieval = by_type.get("retrieval", {})
    results = retrieval.get("results") or find_results(query, empty=True)
    metadata = by_type.get("metadata")
    return {
        "answer": "".join(i["text"] for i in items if i["type"] == "answer"),
        "reasoning": "".join(i["text"] for i in items if i["type"] == "reasoning") or None,
        "answer_json": by_type.get("answer_json", {}).get("object"),
        "status": status.get("status", "success"),
        "retrieval_results": results,
        "retrieval_best_matches": retrieval.get("best_matches", []),
        "prequeries": None, "learning_id": lid, "relations": None,
        "citations": by_type.get("citations", {}).get("citations", {}),
        "citation_footnote_to_context": by_type.get("footnote_citations", {}).get(
            "footnote_to_context", {}),
        "augmented_context": None,
        "prompt_context": [p["text"] for r in results["resources"].values()
                           for f in r["fields"].values() for p in f["paragraphs"].values()],
        "predict_request": None,
        "metadata": {"tokens": metadata["tokens"], "timings": metadata["timings"]}
        if metadata else None,
        "consumption": None, "error_details": status.get("details"), "debug": None,
    }


# -- validation ------------------------------------------------------------------------------


def _invalid(loc: list[str | int], msg: str, kind: str = "value_error") -> Response:
    return JSONResponse({"detail": [{"type": kind, "loc": loc, "msg": msg}]}, status_code=422)


def _invalid_schema(schema: Any) -> Response | None:
    if schema is None:
        return None
    try:
        if not isinstance(schema, dict):
            raise SchemaError("not an object")
        schema_instance(schema)
    except SchemaError as exc:
        return _invalid(["body", "answer_json_schema"], f"Invalid JSON schema: {exc}")
    return None


def _validate(body: Any, headers: Any) -> Response | None:
    client = headers.get("x-ndb-client")
    if client is not None and client not in NDB_CLIENTS:
        return _invalid(["header", "x-ndb-client"], "Input should be one of: "
                        + ", ".join(sorted(NDB_CLIENTS)), "enum")
    if not isinstance(body, dict):
        return _invalid(["body"], "Input should be a valid dictionary", "dict_type")
    if not isinstance(body.get("query"), str):
        return _invalid(["body", "query"], "Field required", "missing")
    if len(body["query"]) > 20_000:
        return _invalid(["body", "query"], "String should have at most 20000 characters",
                        "string_too_long")
    if body.get("chat_history") is not None and body.get("context") is not None:
        return _invalid(["body"], "Value error, `context` is a deprecated alias of "
                        "`chat_history`: use only `chat_history`")
    for field in ("chat_history", "context"):
        for i, turn in enumerate(body.get(field) or ()):
            if not isinstance(turn, dict) or turn.get("author") not in ("USER", "NUCLIA"):
                return _invalid(["body", field, i, "author"],
                                "Input should be 'NUCLIA' or 'USER'", "enum")
    return _invalid_schema(body.get("answer_json_schema"))


# -- the app ---------------------------------------------------------------------------------


def create_fake_nuclia_app(
    *, kbid: str | None = None, token: str | None = None, slow_delay: float = 0.15,
    delay: float = 0.0,
) -> Starlette:
    """`kbid`: other Knowledge Boxes are 404 (any when None); `token`: the service-account
    token required (none when None); `delay`: seconds before every item in all answers."""

    async def ask(request: Request) -> Response:
        state = request.app.state
        state.calls += 1
        lid = learning_id(state.calls)
        raw = await request.body()
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            body = None
        state.last_body = body
        state.last_headers = dict(request.headers)
        if kbid is not None and request.path_params["kbid"] != kbid:
            return JSONResponse({"detail": "Knowledge Box not found"}, status_code=404)
        if token is not None and \
                request.headers.get("x-nuclia-serviceaccount") != f"Bearer {token}":
            return JSONResponse({"detail": _DETAILS[401]}, status_code=401)
        invalid = _validate(body, request.headers)
        if invalid is not None:
            return invalid
        query: str = body["query"]
        forced = _STATUS.search(query)
        if forced:
            status = int(forced.group(1))
            retry = {"retry-after": "7"} if status == 429 else {}
            return JSONResponse({"detail": _DETAILS[status]}, status_code=status, headers=retry)
        if "[html-502]" in query:
            return Response(HTML_502, status_code=502, media_type="text/html")
        if "[hang]" in query:
            await asyncio.sleep(3600)
        headers = {"nuclia-learning-id": lid}
        if request.headers.get("x-synchronous") == "true":
            if "[stream-error]" in query:
                return JSONResponse({"detail": f"Sample unexpected failure {INTERNAL_DETAIL}"},
                                    status_code=500)
            return Response(orjson.dumps(sync_response(query, body, request.headers, lid)),
                            media_type="application/json", headers=headers)
        items = scenario_items(query, body, request.headers)
        pause = slow_delay if "[slow]" in query else delay
        lines = _lines(items, pause, flat="[flat]" in query,
                       malformed="[malformed]" in query)
        return StreamingResponse(_tracked(lines, state), media_type="application/x-ndjson",
                                 headers=headers)

    app = Starlette(routes=[Route("/api/v1/kb/{kbid}/ask", ask, methods=["POST"])])
    app.state.calls = 0
    app.state.streams_finished = 0
    app.state.streams_cancelled = 0
    app.state.last_body = None
    app.state.last_headers = None
    return app


async def _lines(items: list[dict[str, Any]], pause: float, *, flat: bool,
                 malformed: bool) -> AsyncIterator[bytes]:
    answers = 0
    for item in items:
        if pause:
            await asyncio.sleep(pause)
        if malformed and item["type"] == "answer" and answers == 2:
            yield b'{"item": {"type": "answer", "text": \n'
            return
        answers += item["type"] == "answer"
        yield encode(item, flat=flat)


async def _tracked(lines: AsyncIterator[bytes], state: Any) -> AsyncIterator[bytes]:
    """Count streams sent to their end and streams the gateway cancelled."""
    finished = False
    try:
        async for line in lines:
            yield line
        finished = True
    finally:
        if finished:
            state.streams_finished += 1
        else:
            state.streams_cancelled += 1
