"""A real HTTP fake of the Inkeep Analytics API (and a webhook receiver) for tests and demos.

``POST /conversations`` upserts (same ``id`` -> the stored conversation is replaced by the
full history sent), ``POST /feedback`` and ``POST /events`` record and answer, ``POST /hook``
is a webhook receiver. Everything accepted is recorded on ``app.state.analytics``
(`AnalyticsState`), keyed by the ``idempotency-key`` header. Failure modes on
``app.state.analytics.faults``: answer 500/429 (or hang past the client's timeout) for the
next N requests or for a time window.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.testing.faults import Faults


@dataclass
class Received:
    path: str
    key: str | None
    body: dict[str, Any]
    headers: dict[str, str]
    raw: bytes


@dataclass
class AnalyticsState:
    api_key: str | None = None
    faults: Faults = field(default_factory=Faults)
    accepted: list[Received] = field(default_factory=list)  # answered 2xx, in order
    refused: int = 0  # answered with a fault
    hung: int = 0  # requests held for `faults.hang` seconds
    abandoned: int = 0  # of those, the ones whose client had gone away by then
    conversations: dict[str, dict[str, Any]] = field(default_factory=dict)
    batches: list[int] = field(default_factory=list)  # sizes of the webhook batches received
    delay: float = 0.0  # seconds every answer takes (a slow sink that still succeeds)
    ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def by_key(self, path: str | None = None) -> dict[str, list[Received]]:
        found: dict[str, list[Received]] = {}
        for r in self.accepted:
            if r.key is not None and (path is None or r.path == path):
                found.setdefault(r.key, []).append(r)
        return found

    def on(self, path: str) -> list[Received]:
        return [r for r in self.accepted if r.path == path]


def _problem(status: int, title: str) -> Response:
    body = {"title": title, "status": status, "detail": title,
            "error": {"code": str(status), "message": title}}
    return Response(orjson.dumps(body), status, media_type="application/problem+json")


def create_fake_analytics_app(api_key: str | None = None, *,
                              state: AnalyticsState | None = None) -> Starlette:
    st = state or AnalyticsState(api_key=api_key)

    async def gate(request: Request, *, auth: bool) -> Response | None:
        if st.delay:
            await asyncio.sleep(st.delay)
        if st.faults.take(request.url.path):
            if st.faults.hang:
                st.hung += 1
                await asyncio.sleep(st.faults.hang)
                if await request.is_disconnected():
                    st.abandoned += 1
                    return Response(status_code=499)
            st.refused += 1
            headers = {"retry-after": "0"} if st.faults.status == 429 else None
            resp = _problem(st.faults.status, "injected failure")
            if headers:
                resp.headers.update(headers)
            return resp
        if auth and st.api_key is not None:
            if request.headers.get("authorization") != f"Bearer {st.api_key}":
                return _problem(401, "Missing or invalid API key.")
        return None

    async def receive(request: Request, *, auth: bool = True) -> Received | Response:
        got = await receive_any(request, auth=auth)
        if isinstance(got, list):
            return _problem(400, "Body must be an object.")
        return got

    async def receive_any(request: Request, *,
                          auth: bool = True) -> Received | list[Received] | Response:
        """One record, or a webhook batch: a JSON array of records, each recorded on its own
        with the key the gateway documents for it (``gw-<request_id>``)."""
        refused = await gate(request, auth=auth)
        if refused is not None:
            return refused
        raw = await request.body()
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return _problem(400, "Body is not JSON.")
        headers = dict(request.headers)
        if isinstance(body, list) and all(isinstance(r, dict) for r in body):
            return [Received(request.url.path, f"gw-{r.get('request_id')}", r, headers, raw)
                    for r in body]
        if not isinstance(body, dict):
            return _problem(400, "Body must be an object.")
        return Received(request.url.path, request.headers.get("idempotency-key"), body,
                        headers, raw)

    async def conversations(request: Request) -> Response:
        got = await receive(request)
        if isinstance(got, Response):
            return got
        body = got.body
        if body.get("type") != "openai" or not isinstance(body.get("messages"), list):
            return _problem(422, "type must be 'openai' and messages a list")
        if any(m.get("role") not in ("system", "user", "assistant") for m in body["messages"]):
            return _problem(422, "role must be system, user or assistant")
        conv_id = body.get("id") or f"conv_{next(st.ids)}"
        messages = [{"id": m.get("id") or f"msg_{next(st.ids)}", **m} for m in body["messages"]]
        stored = {"id": conv_id, "type": "openai", "messages": messages,
                  "properties": body.get("properties"),
                  "userProperties": body.get("userProperties"),
                  "createdAt": st.conversations.get(conv_id, {}).get("createdAt")
                  or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        st.conversations[conv_id] = stored
        st.accepted.append(got)
        return Response(orjson.dumps(stored), 200, media_type="application/json")

    async def feedback(request: Request) -> Response:
        got = await receive(request)
        if isinstance(got, Response):
            return got
        if got.body.get("type") not in ("positive", "negative") or not got.body.get("messageId"):
            return _problem(422, "type and messageId are required")
        st.accepted.append(got)
        reply = {"id": f"fb_{next(st.ids)}", "type": got.body["type"],
                 "messageId": got.body["messageId"]}
        return Response(orjson.dumps(reply), 200, media_type="application/json")

    async def events(request: Request) -> Response:
        got = await receive(request)
        if isinstance(got, Response):
            return got
        if not got.body.get("type"):
            return _problem(422, "type is required")
        st.accepted.append(got)
        reply = {"id": f"ev_{next(st.ids)}", "type": got.body["type"]}
        return Response(orjson.dumps(reply), 200, media_type="application/json")

    async def hook(request: Request) -> Response:
        got = await receive_any(request, auth=False)
        if isinstance(got, Response):
            return got
        if isinstance(got, list):
            st.accepted.extend(got)
            st.batches.append(len(got))
        else:
            st.accepted.append(got)
        return Response(b"", 204)

    app = Starlette(routes=[
        Route("/conversations", conversations, methods=["POST"]),
        Route("/feedback", feedback, methods=["POST"]),
        Route("/events", events, methods=["POST"]),
        Route("/hook", hook, methods=["POST"]),
    ])
    app.state.analytics = st
    return app
