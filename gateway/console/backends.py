"""Backends: each one's error rate and latency over the last hour (from the shared time
series, by backend), whether it has its credentials, and, when routing reports it (a
`HealthSource` on the state), the circuit state of each deployment."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from gateway.analytics.timeseries import WINDOWS, Totals, read_trend
from gateway.console.charts import line_chart, summed
from gateway.console.guard import Console, Context, page
from gateway.console.rendering import ms, number, percent


@dataclass(frozen=True, slots=True)
class BackendRow:
    name: str
    kind: str
    host: str
    missing: str | None  # the variable to set when it has no credentials
    models: list[str]
    recent: Totals  # the last hour


async def backends_page(ctx: Context) -> Response:
    state = ctx.state
    trend = await read_trend(state.analytics.series_store, WINDOWS["hour"], ctx.now)
    recent = trend.by("backend")
    rows = []
    for name, backend in sorted(state.backends.items()):
        spec = state.config.backends[name]
        url = urlsplit(spec.base_url)
        rows.append(BackendRow(
            name, spec.kind, f"{url.scheme}://{url.netloc}", backend.credentials_missing(),
            sorted(m for m, plan in state.plans.items()
                   if any(d.name == name for d in plan.deployments)),
            recent.get(name, Totals())))
    starts, step = trend.starts, trend.window.step
    charts = [
        line_chart("Errors by backend, last hour", starts, step,
                   trend.lines(lambda t: t.errors, "backend"), number, summed),
        line_chart("Error rate by backend", starts, step,
                   trend.lines(lambda t: t.error_rate, "backend"), percent),
        line_chart("Latency p95 by backend", starts, step,
                   trend.lines(lambda t: t.latency(0.95), "backend"), ms),
    ]
    health = await state.health.deployments()
    return ctx.render("backends.html", backends=rows, charts=charts, health=health)


def routes(console: Console) -> list[BaseRoute]:
    return [Route("/backends", page(console, backends_page), methods=["GET"])]
