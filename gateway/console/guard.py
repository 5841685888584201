"""What every console route goes through: a page needs a session (else: to the sign-in
page), an action (a POST) also needs a same-origin request and the session's CSRF token in
its form (else: 403, and nothing changes). Handlers get a `Context`: the gateway's state,
the session and the page renderer."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import parse_qsl, urlencode

from starlette.datastructures import ImmutableMultiDict
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from gateway.console.rendering import Templates, base_of
from gateway.console.session import COOKIE, Session, Sessions, csrf_ok, same_origin
from gateway.state import GatewayState

Form = ImmutableMultiDict[str, str]
MAX_FORM_BYTES = 64 * 1024


@dataclass(frozen=True)
class Console:
    """What the console's routes share, made once per app."""

    sessions: Sessions
    templates: Templates


@dataclass(frozen=True)
class Context:
    request: Request
    console: Console
    session: Session
    now: float

    @property
    def state(self) -> GatewayState:
        return cast(GatewayState, self.request.state.gateway)

    @property
    def base(self) -> str:
        return base_of(self.request)

    def render(self, template: str, status: int = 200, **values: Any) -> Response:
        return self.console.templates.page(self.request, template, status,
                                           csrf=self.session.csrf, now=self.now, **values)

    def redirect(self, path: str, **query: str) -> Response:
        """303 to a console page (after an action: a reload does not post again)."""
        url = self.base + path + (f"?{urlencode(query)}" if query else "")
        return RedirectResponse(url, status_code=303)

    def refuse(self, status: int, message: str) -> Response:
        return self.render("error.html", status, message=message)


Page = Callable[[Context], Awaitable[Response]]
Action = Callable[[Context, Form], Awaitable[Response]]
Endpoint = Callable[[Request], Awaitable[Response]]


def _session(console: Console, request: Request) -> Session | None:
    return console.sessions.read(request.cookies.get(COOKIE))


def page(console: Console, handler: Page) -> Endpoint:
    """A GET page: signed in, or off to the sign-in page (and back here after it)."""
    async def endpoint(request: Request) -> Response:
        session = _session(console, request)
        if session is None:
            back = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            return RedirectResponse(f"{base_of(request)}/login?{urlencode({'next': back})}",
                                    status_code=303)
        return await handler(Context(request, console, session, time.time()))

    return endpoint


async def read_form(request: Request) -> Form | None:
    """The url-encoded body, or None when it is too large to be one of our forms."""
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            return None
    return ImmutableMultiDict(parse_qsl(body.decode("utf-8", "replace"),
                                        keep_blank_values=True))


def action(console: Console, handler: Action) -> Endpoint:
    """A POST that changes something: same origin, signed in, with the session's token."""
    async def endpoint(request: Request) -> Response:
        session = _session(console, request)
        if session is None or not same_origin(request):
            return console.templates.page(request, "error.html", 403,
                                          message="Your session has ended: sign in again.")
        context = Context(request, console, session, time.time())
        form = await read_form(request)
        if form is None:
            return context.refuse(413, "That form is too large.")
        if not csrf_ok(session, form.get("csrf")):
            return context.refuse(403, "This form has expired: reload the page and retry.")
        return await handler(context, form)

    return endpoint
