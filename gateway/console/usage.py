"""Usage: the table of ``gateway usage`` filtered by team, model and day range, and its CSV,
made by the same code as ``gateway usage --format csv`` (`gateway.analytics.reports`), so the
two files are the same bytes."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from typing import Any

from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from gateway.analytics.reports import COLUMNS, default_range, usage_csv, usage_report
from gateway.console.guard import Console, Context, page
from gateway.console.teams import today
from gateway.stores.usage import COUNTERS

SUMMED = (*COUNTERS, "total_tokens")


@dataclass(frozen=True, slots=True)
class Filter:
    team: str | None
    model: str | None
    since: date
    until: date

    def query(self) -> dict[str, str]:
        found = {"team": self.team, "model": self.model, "since": self.since.isoformat(),
                 "until": self.until.isoformat()}
        return {k: v for k, v in found.items() if v}


def read_filter(ctx: Context) -> Filter | str:
    """The filter of the query string (default: this month, as ``gateway usage``), or what
    is wrong with it."""
    params = ctx.request.query_params
    since, until = default_range(today(ctx.now))
    try:
        since = date.fromisoformat(params.get("since") or since.isoformat())
        until = date.fromisoformat(params.get("until") or until.isoformat())
    except ValueError:
        return "Dates are YYYY-MM-DD."
    if since > until:
        return "The first day is after the last."
    return Filter(params.get("team") or None, params.get("model") or None, since, until)


async def rows_of(ctx: Context, chosen: Filter) -> list[dict[str, Any]]:
    return await usage_report(ctx.state.analytics.usage_store, chosen.team, chosen.since,
                              chosen.until, chosen.model)


async def usage_page(ctx: Context) -> Response:
    chosen = read_filter(ctx)
    error = chosen if isinstance(chosen, str) else None
    if isinstance(chosen, str):
        since, until = default_range(today(ctx.now))
        chosen = Filter(None, None, since, until)
    rows = await rows_of(ctx, chosen)
    totals = {c: sum(int(r[c]) for r in rows) for c in SUMMED}
    every = await usage_report(ctx.state.analytics.usage_store, None, chosen.since,
                               chosen.until)
    return ctx.render("usage.html", 400 if error else 200, error=error, chosen=chosen,
                      rows=rows, totals=totals, columns=COLUMNS,
                      teams=sorted({r["team"] for r in every} | set(ctx.state.config.teams)),
                      models=sorted({r["model"] for r in every} | set(ctx.state.plans)))


async def usage_file(ctx: Context) -> Response:
    chosen = read_filter(ctx)
    if isinstance(chosen, str):
        return ctx.refuse(400, chosen)
    name = f"usage-{chosen.since.isoformat()}-{chosen.until.isoformat()}.csv"
    return Response(usage_csv(await rows_of(ctx, chosen)), media_type="text/csv",
                    headers={"content-disposition": f'attachment; filename="{name}"',
                             "cache-control": "no-store"})


def routes(console: Console) -> list[BaseRoute]:
    return [Route("/usage", page(console, usage_page), methods=["GET"]),
            Route("/usage.csv", page(console, usage_file), methods=["GET"])]
