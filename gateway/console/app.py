"""The console as one ASGI app, mounted at ``/console`` only when ``server.admin_key`` is set:
sign-in and sign-out, the pages of each module, its static files, and HTML error pages."""

from __future__ import annotations

import structlog
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from gateway.config import GatewayConfig
from gateway.console import backends, delivery, keys, overview, teams, usage
from gateway.console.guard import Console, Context, Form, action, read_form
from gateway.console.rendering import Templates, base_of
from gateway.console.session import COOKIE, Sessions, same_origin
from gateway.errors import GatewayError

log = structlog.get_logger("gateway.console")


def _next(request: Request, wanted: str | None) -> str:
    """Where to go after signing in: a console page, never another site."""
    base = base_of(request)
    if wanted and wanted.startswith(base + "/") and not wanted.startswith("//"):
        return wanted
    return base + "/"


class SignIn:
    def __init__(self, console: Console) -> None:
        self.console = console

    def _form(self, request: Request, wanted: str | None, status: int = 200,
              failed: bool = False) -> Response:
        return self.console.templates.page(request, "login.html", status, failed=failed,
                                           next=_next(request, wanted))

    async def show(self, request: Request) -> Response:
        if self.console.sessions.read(request.cookies.get(COOKIE)) is not None:
            return RedirectResponse(_next(request, request.query_params.get("next")), 303)
        return self._form(request, request.query_params.get("next"))

    async def submit(self, request: Request) -> Response:
        form = await read_form(request) if same_origin(request) else None
        client = request.client.host if request.client else None
        if form is None or not self.console.sessions.admits(form.get("admin_key", "")):
            log.warning("console_sign_in_failed", client=client)
            return self._form(request, form.get("next") if form else None, 401, failed=True)
        _, cookie = self.console.sessions.issue()
        response = RedirectResponse(_next(request, form.get("next")), status_code=303)
        self.console.sessions.set_cookie(response, cookie, secure=request.url.scheme == "https",
                                         path=base_of(request) or "/")
        log.info("console_signed_in", client=client)
        return response


async def sign_out(ctx: Context, form: Form) -> Response:
    response = ctx.redirect("/login")
    response.delete_cookie(COOKIE, path=ctx.base or "/", httponly=True, samesite="strict")
    return response


def console_app(config: GatewayConfig) -> Starlette:
    assert config.server.admin_key is not None  # the gateway mounts it only then
    console = Console(Sessions(config.server.admin_key.get_secret_value()), Templates())
    sign_in = SignIn(console)
    routes: list[BaseRoute] = [
        Route("/login", sign_in.show, methods=["GET"]),
        Route("/login", sign_in.submit, methods=["POST"]),
        Route("/logout", action(console, sign_out), methods=["POST"]),
        *overview.routes(console), *keys.routes(console), *teams.routes(console),
        *usage.routes(console),
        *delivery.routes(console), *backends.routes(console),
        Mount("/static", StaticFiles(packages=[("gateway.console", "static")])),
    ]

    def error_page(request: Request, status: int, message: str) -> Response:
        return console.templates.page(request, "error.html", status, message=message)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if exc.status_code == 404:
            return error_page(request, 404, "There is no such page in the console.")
        return error_page(request, exc.status_code, str(exc.detail))

    async def gateway_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, GatewayError)
        return error_page(request, exc.status, exc.message)  # e.g. the store is unreachable

    async def server_error(request: Request, exc: Exception) -> Response:
        log.error("console_failed", error_type=type(exc).__name__, path=request.url.path)
        return error_page(request, 500, "The console failed to show this page.")

    return Starlette(routes=routes, exception_handlers={
        HTTPException: http_error, GatewayError: gateway_error, Exception: server_error})
