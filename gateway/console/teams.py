"""Teams: their limits and budgets (the config's ``teams:`` overlaid with what was set at run
time), what each used today and this month, and setting limits from the console."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from datetime import UTC, date, datetime
from urllib.parse import quote

from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from gateway.admin import TeamLimits as TeamBody
from gateway.auth import TeamLimits, team_limits
from gateway.console.forms import parse
from gateway.console.guard import Console, Context, Form, action, page
from gateway.state import GatewayState
from gateway.stores.keys import TeamRecord
from gateway.stores.usage import UsageRow


@dataclass(frozen=True, slots=True)
class TeamRow:
    name: str
    limits: TeamLimits  # in force: the config's, overlaid with `stored`
    stored: TeamRecord | None  # set at run time (console, CLI, admin API)
    keys: int
    requests_today: int
    tokens_today: int
    tokens_month: int


def today(now: float) -> date:
    return datetime.fromtimestamp(now, UTC).date()


async def month_usage(state: GatewayState, now: float, team: str | None = None
                      ) -> list[UsageRow]:
    """Usage rows of the current (UTC) month."""
    day = today(now)
    return await state.analytics.usage_store.query(team, day.replace(day=1), day)


async def team_rows(state: GatewayState, now: float, keys: Counter[str],
                    only: str | None = None) -> list[TeamRow]:
    """Every team the gateway knows of (configured, set at run time, holding keys, having
    used it this month), or only the team `only`; `keys`: how many keys each team holds."""
    config = state.config
    stored = {t.name: t for t in await state.components.key_store.list_teams()}
    day = today(now)
    requests_today, tokens_today, tokens_month = Counter[str](), Counter[str](), Counter[str]()
    for row in await month_usage(state, now, only):
        tokens = row.prompt_tokens + row.completion_tokens
        tokens_month[row.team] += tokens
        if row.day == day:
            requests_today[row.team] += row.requests
            tokens_today[row.team] += tokens
    names = {only} if only else {*config.teams, *stored, *keys, *tokens_month}
    return [TeamRow(name, team_limits(config, name, stored.get(name)), stored.get(name),
                    keys[name], requests_today[name], tokens_today[name], tokens_month[name])
            for name in sorted(names)]


async def show_team(ctx: Context) -> Response:
    name = ctx.request.path_params["team"]
    state = ctx.state
    keys = [*await state.components.key_store.list_keys(name),
            *(k for k in state.config.keys.static if k.team == name)]
    [row] = await team_rows(state, ctx.now, Counter({name: len(keys)}), only=name)
    return ctx.render("team.html", team=row, config=state.config.teams.get(name),
                      usage=await month_usage(state, ctx.now, name),
                      saved=ctx.request.query_params.get("saved"))


async def set_limits(ctx: Context, form: Form) -> Response:
    """Set a team's limits and budgets (blank: the config's); its per-model limits stay."""
    body = parse(form, TeamBody)
    if isinstance(body, str) or not body.name:
        message = body if isinstance(body, str) else "name the team."
        return ctx.refuse(400, f"The team's limits were not changed: {message}")
    name = body.name
    store = ctx.state.components.key_store
    before = await store.get_team(name)
    await store.put_team(TeamRecord(
        name=name, rpm=body.rpm, tpm=body.tpm, daily_token_budget=body.daily_token_budget,
        monthly_token_budget=body.monthly_token_budget,
        models=before.models if before is not None else {}))
    ctx.state.authority.invalidate("*")
    return ctx.redirect(f"/teams/{quote(name, safe='')}", saved="1")


def routes(console: Console) -> list[BaseRoute]:
    return [Route("/teams/{team:path}", page(console, show_team), methods=["GET"]),
            Route("/teams", action(console, set_limits), methods=["POST"])]
