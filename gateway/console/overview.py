"""The overview: requests, errors, latency and time to first token, and tokens over the last
hour, day or 30 days, by team or by model, from the shared time series (every replica draws
the same charts); and, first, what is failing now."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from markupsafe import Markup
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from gateway.analytics.timeseries import WINDOWS, GroupBy, Totals, Trend, read_trend
from gateway.console.charts import line_chart, summed
from gateway.console.delivery import delivery_status
from gateway.console.guard import Console, Context, page
from gateway.console.rendering import ms, number
from gateway.state import GatewayState


def percentiles(trend: Trend, pick: Callable[[Totals, float], float | None]
                ) -> dict[str, list[float | None]]:
    """p50 and p95 per bucket, of every request in it (`pick`: `Totals.latency` or
    `Totals.ttft`)."""
    return {"p50": trend.lines(lambda t: pick(t, 0.5))["all"],
            "p95": trend.lines(lambda t: pick(t, 0.95))["all"]}


def charts(trend: Trend, group: GroupBy) -> list[Markup]:
    starts, step, by = trend.starts, trend.window.step, f"by {group}"
    return [
        line_chart(f"Requests {by}", starts, step, trend.lines(lambda t: t.requests, group),
                   number, summed),
        line_chart(f"Errors {by}", starts, step, trend.lines(lambda t: t.errors, group),
                   number, summed),
        line_chart(f"Tokens {by}", starts, step, trend.lines(lambda t: t.tokens, group),
                   number, summed),
        line_chart("Latency (request to last byte)", starts, step,
                   percentiles(trend, Totals.latency), ms),
        line_chart("Time to first token", starts, step, percentiles(trend, Totals.ttft), ms),
    ]


@dataclass(frozen=True, slots=True)
class Alert:
    what: str
    detail: str
    href: str


async def alerts(state: GatewayState, last_hour: Trend, now: float) -> list[Alert]:
    """What is failing: backends with errors in the last hour, open circuits, dead letters
    and deliveries that lag."""
    found = []
    for backend, totals in last_hour.by("backend").items():
        if totals.errors:
            found.append(Alert(f"Backend {backend}", f"{totals.errors} of {totals.requests} "
                               "requests failed in the last hour", "/backends"))
    for deployment in await state.health.deployments():
        if deployment.state != "closed":
            found.append(Alert(f"Deployment {deployment.deployment}",
                               f"circuit {deployment.state}", "/backends"))
    for sink in (await delivery_status(state)).sinks:
        if sink.dead:
            found.append(Alert(f"Analytics sink {sink.name}",
                               f"{sink.dead} dead letter(s) to replay", "/delivery"))
        if sink.oldest is not None and now - sink.oldest > 300:
            found.append(Alert(f"Analytics sink {sink.name}",
                               f"{sink.depth} record(s) waiting, the oldest for "
                               f"{(now - sink.oldest) / 60:.0f} min", "/delivery"))
    return found


async def overview(ctx: Context) -> Response:
    params = ctx.request.query_params
    window = WINDOWS.get(params.get("window", ""), WINDOWS["day"])
    group: GroupBy = "model" if params.get("by") == "model" else "team"
    store = ctx.state.analytics.series_store
    trend = await read_trend(store, window, ctx.now)
    last_hour = trend if window.name == "hour" else await read_trend(store, WINDOWS["hour"],
                                                                     ctx.now)
    return ctx.render("overview.html", window=window, windows=WINDOWS.values(), group=group,
                      total=trend.total(), charts=charts(trend, group),
                      teams=trend.by("team"), models=trend.by("model"),
                      alerts=await alerts(ctx.state, last_hour, ctx.now))


def routes(console: Console) -> list[BaseRoute]:
    return [Route("/", page(console, overview), methods=["GET"])]
