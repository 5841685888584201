"""Teams and keys: the page that lists both, creating a key (its secret shown once, never
stored or logged), a key's own page (its usage, its limits), editing and revoking it."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from datetime import UTC, date, datetime, timedelta
from urllib.parse import quote

from pydantic import BaseModel, Field
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from gateway.admin import NewKey
from gateway.auth import create_key, parse_duration
from gateway.console.charts import line_chart, summed
from gateway.console.forms import parse
from gateway.console.guard import Console, Context, Form, action, page
from gateway.console.rendering import number
from gateway.console.teams import team_rows, today
from gateway.stores.keys import KeyRecord
from gateway.stores.series import DAY

KEY_USAGE_DAYS = 30


class KeyLimits(BaseModel):
    """What the console may change on a key (as the admin API's `NewKey` sets them)."""

    models: list[str] | None = None
    rpm: int | None = Field(default=None, ge=1)
    tpm: int | None = Field(default=None, ge=1)
    max_concurrent: int | None = Field(default=None, ge=1)


def day_start(day: date) -> int:
    return int(datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp())


def status(record: KeyRecord, now: float) -> str:
    if record.revoked:
        return "revoked"
    if record.expires is not None and record.expires <= now:
        return "expired"
    return "active"


async def keys_page(ctx: Context, error: str | None = None, status_code: int = 200
                    ) -> Response:
    state = ctx.state
    team = ctx.request.query_params.get("team") or None
    every = await state.components.key_store.list_keys()
    static = state.config.keys.static
    teams = await team_rows(state, ctx.now,
                            Counter([k.team for k in every] + [k.team for k in static]))
    shown = [k for k in every if team is None or k.team == team]
    return ctx.render("keys.html", status_code, teams=teams, team=team, keys=shown,
                      static=[k for k in static if team is None or k.team == team],
                      models=sorted(state.plans), error=error, key_status=status)


async def new_key(ctx: Context, form: Form) -> Response:
    body = parse(form, NewKey, lists=("models",))
    if isinstance(body, str):
        return await keys_page(ctx, f"The key was not created: {body}", 400)
    try:
        expires_in = parse_duration(body.expires) if body.expires else None
    except ValueError as exc:
        return await keys_page(ctx, f"The key was not created: expires: {exc}", 400)
    issued = await create_key(
        ctx.state.config, ctx.state.components.key_store, team=body.team, name=body.name,
        models=body.models, rpm=body.rpm, tpm=body.tpm, max_concurrent=body.max_concurrent,
        expires_in=expires_in)
    # The response to this POST is the only place the secret ever appears.
    return ctx.render("key_created.html", 201, key=issued.record, secret=issued.secret)


async def show_key(ctx: Context, error: str | None = None, status_code: int = 200
                   ) -> Response:
    key_id = ctx.request.path_params["key_id"]
    record = await ctx.state.components.key_store.get_key(key_id)
    if record is None:
        return ctx.refuse(404, f"There is no key {key_id!r}.")
    until = today(ctx.now)
    since = until - timedelta(days=KEY_USAGE_DAYS - 1)
    rows = [r for r in await ctx.state.analytics.usage_store.query(record.team, since, until)
            if r.key_id == key_id]
    tokens: dict[date, int] = {}
    for r in rows:
        tokens[r.day] = tokens.get(r.day, 0) + r.prompt_tokens + r.completion_tokens
    days = [since + timedelta(days=n) for n in range(KEY_USAGE_DAYS)]
    chart = line_chart(f"Tokens per day, last {KEY_USAGE_DAYS} days", [day_start(d) for d in days],
                       DAY, {"tokens": [tokens.get(d, 0) for d in days]}, number, summed)
    return ctx.render("key.html", status_code, key=record, state=status(record, ctx.now),
                      usage=rows[::-1], chart=chart, error=error,
                      models=", ".join(record.models or ()))


async def edit_key(ctx: Context, form: Form) -> Response:
    key_id = ctx.request.path_params["key_id"]
    store = ctx.state.components.key_store
    record = await store.get_key(key_id)
    if record is None:
        return ctx.refuse(404, f"There is no key {key_id!r}.")
    body = parse(form, KeyLimits, lists=("models",))
    if isinstance(body, str):
        return await show_key(ctx, f"The key was not changed: {body}", 400)
    models = tuple(body.models) if body.models else None
    await store.put_key(replace(record, models=models, rpm=body.rpm, tpm=body.tpm,
                                max_concurrent=body.max_concurrent))
    ctx.state.authority.invalidate(key_id)
    return ctx.redirect(f"/keys/{quote(key_id, safe='')}")


async def revoke_key(ctx: Context, form: Form) -> Response:
    key_id = ctx.request.path_params["key_id"]
    if not await ctx.state.components.key_store.revoke_key(key_id):
        return ctx.refuse(404, f"There is no key {key_id!r}.")
    ctx.state.authority.invalidate(key_id)  # other replicas hear it from the store
    return ctx.redirect(f"/keys/{quote(key_id, safe='')}")


def routes(console: Console) -> list[BaseRoute]:
    return [Route("/keys", page(console, keys_page), methods=["GET"]),
            Route("/keys", action(console, new_key), methods=["POST"]),
            Route("/keys/{key_id}", page(console, show_key), methods=["GET"]),
            Route("/keys/{key_id}", action(console, edit_key), methods=["POST"]),
            Route("/keys/{key_id}/revoke", action(console, revoke_key), methods=["POST"])]
