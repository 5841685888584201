"""Rendering console pages: the Jinja2 environment (autoescaped: every value is escaped
unless it is `Markup`, like the server-drawn charts), the filters that format figures, and
the headers every page is sent with."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from jinja2 import Environment, PackageLoader, StrictUndefined
from starlette.requests import Request
from starlette.responses import HTMLResponse

# Nothing but this origin's own files: no inline script, no framing, forms post back here.
SECURITY_HEADERS = {
    "content-security-policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"),
    "x-frame-options": "DENY",
    "x-content-type-options": "nosniff",
    "referrer-policy": "same-origin",
    "cache-control": "no-store",  # pages show keys and usage: never kept by a cache
}


def number(value: float | None) -> str:
    if value is None:
        return "–"
    if isinstance(value, float) and not value.is_integer():
        return f"{value:,.1f}"
    return f"{int(value):,}"


def ms(value: float | None) -> str:
    """A duration in ms, as people read it: 7 ms, 240 ms, 1.3 s."""
    if value is None:
        return "–"
    if value == 0:
        return "0 ms"
    if value >= 1000:
        return f"{value / 1000:.1f} s"
    return f"{value:.0f} ms" if value >= 10 else f"{value:.1f} ms"


def percent(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value * 100:.1f} %"


def when(ts: float | None) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M UTC") if ts else "–"


def age(ts: float | None, now: float) -> str:
    """How long before `now`: 40 s, 12 min, 3 h, 2 d."""
    if ts is None:
        return "–"
    seconds = max(0.0, now - ts)
    for unit, size in (("d", 86_400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit}"
    return f"{seconds:.0f} s"


def base_of(request: Request) -> str:
    """The console's own path ("/console", or below a proxy's prefix)."""
    return str(request.scope.get("root_path", "")).rstrip("/")


class Templates:
    def __init__(self) -> None:
        self.env = Environment(loader=PackageLoader("gateway.console", "templates"),
                               autoescape=True, undefined=StrictUndefined,
                               trim_blocks=True, lstrip_blocks=True)
        self.env.filters.update(number=number, ms=ms, percent=percent, when=when, age=age)

    def page(self, request: Request, name: str, status: int = 200, *, csrf: str = "",
             now: float | None = None, **values: Any) -> HTMLResponse:
        """Render a console page; `csrf`: the session's token (none: signed out, no menu)."""
        html = self.env.get_template(name).render(
            base=base_of(request), csrf=csrf, now=time.time() if now is None else now,
            **values)
        return HTMLResponse(html, status_code=status, headers=SECURITY_HEADERS)
