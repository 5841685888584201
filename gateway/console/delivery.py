"""Analytics delivery: per sink, the records waiting (and since when), the dead letters with
the last error each got, and replay."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

import orjson
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from gateway.console.guard import Console, Context, Form, action, page
from gateway.state import GatewayState
from gateway.stores.outbox import DeadLetter

SHOWN_DEAD = 200  # dead letters listed on the page (replay all takes every one)


@dataclass(frozen=True, slots=True)
class SinkStatus:
    name: str
    kind: str
    host: str  # where it delivers (scheme and host: a URL's path or query may hold a token)
    depth: int
    oldest: float | None  # when the oldest waiting record was put
    dead: int


@dataclass(frozen=True, slots=True)
class Delivery:
    sinks: list[SinkStatus]
    dead: list[DeadLetter]


async def delivery_status(state: GatewayState) -> Delivery:
    """Every configured sink's status (none configured: no outbox, nothing to show)."""
    outbox = state.analytics.outbox
    if outbox is None:
        return Delivery([], [])
    depth, oldest = await outbox.depth(), await outbox.oldest_pending()
    dead = await outbox.list_dead()
    sinks = []
    for sink in state.config.analytics.sinks:
        url = urlsplit(sink.url)
        sinks.append(SinkStatus(sink.name, sink.kind, f"{url.scheme}://{url.netloc}",
                                depth.get(sink.name, 0), oldest.get(sink.name),
                                sum(d.sink == sink.name for d in dead)))
    return Delivery(sinks, dead)


def request_id(dead: DeadLetter) -> str:
    try:
        return str(orjson.loads(dead.data).get("request_id", "?"))
    except (orjson.JSONDecodeError, AttributeError):
        return "?"


async def delivery_page(ctx: Context) -> Response:
    status = await delivery_status(ctx.state)
    shown = [(d, request_id(d)) for d in status.dead[-SHOWN_DEAD:][::-1]]  # newest first
    return ctx.render("delivery.html", delivery=status, shown=shown,
                      configured=bool(ctx.state.config.analytics.sinks),
                      replayed=ctx.request.query_params.get("replayed"))


async def replay(ctx: Context, form: Form) -> Response:
    """Replay the dead letters named in the form (``id``), or all of them (``all``)."""
    outbox = ctx.state.analytics.outbox
    if outbox is None:
        return ctx.refuse(404, "No analytics sinks are configured: there is nothing to replay.")
    ids = None if form.get("all") else form.getlist("id")
    if ids == []:
        return ctx.redirect("/delivery", replayed="0")
    count = await outbox.replay_dead(ids)
    return ctx.redirect("/delivery", replayed=str(count))


def routes(console: Console) -> list[BaseRoute]:
    return [Route("/delivery", page(console, delivery_page), methods=["GET"]),
            Route("/delivery/replay", action(console, replay), methods=["POST"])]
