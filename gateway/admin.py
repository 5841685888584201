"""The admin API under ``/admin/`` (mounted only when ``server.admin_key`` is set): keys and
teams as JSON, the same operations as ``gateway keys`` / ``gateway teams``.

    GET    /admin/keys[?team=T]      list keys (never a hash or a secret)
    POST   /admin/keys               create; the response holds the key, shown this once
    GET    /admin/keys/{id}          one key
    DELETE /admin/keys/{id}          revoke
    GET    /admin/teams              list team limits set at run time
    GET    /admin/usage[?team=T&model=M&since=YYYY-MM-DD&until=YYYY-MM-DD]
                                     usage rows, as ``gateway usage --format json``
    PUT    /admin/teams[/{name}]     set a team's limits
    GET    /admin/deployments        each deployment's circuit and load, by model

Every call needs ``Authorization: Bearer <admin key>`` (constant-time comparison); errors use
the OpenAI error envelope.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from datetime import date
from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.analytics.reports import default_range, usage_report
from gateway.auth import KeyAuthority, create_key, parse_duration
from gateway.config import GatewayConfig, format_validation_error
from gateway.errors import AuthenticationFailed, GatewayError, InvalidRequest, NotFound
from gateway.routing.router import Router
from gateway.stores.keys import KeyStore, ModelLimit, TeamRecord
from gateway.stores.usage import UsageStore

Handler = Callable[[Request], Awaitable[Response]]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class NewKey(_Body):
    team: str = Field(min_length=1)
    name: str | None = None
    models: list[str] | None = None
    rpm: int | None = Field(default=None, ge=1)
    tpm: int | None = Field(default=None, ge=1)
    max_concurrent: int | None = Field(default=None, ge=1)
    expires: str | None = None  # a duration: "30d", "12h", seconds


class ModelLimits(_Body):
    rpm: int | None = Field(default=None, ge=1)
    tpm: int | None = Field(default=None, ge=1)


class TeamLimits(_Body):
    name: str | None = None
    rpm: int | None = Field(default=None, ge=1)
    tpm: int | None = Field(default=None, ge=1)
    daily_token_budget: int | None = Field(default=None, ge=1)
    monthly_token_budget: int | None = Field(default=None, ge=1)
    models: dict[str, ModelLimits] = Field(default_factory=dict)


def _json(data: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(data), status_code=status, media_type="application/json")


def _error(exc: GatewayError) -> Response:
    return Response(exc.json(), status_code=exc.status, headers=exc.headers,
                    media_type="application/json")


async def _parse(request: Request, model: type[_Body]) -> Any:
    try:
        return model.model_validate_json(await request.body())
    except ValidationError as exc:
        raise InvalidRequest(f"Invalid request body: {format_validation_error(exc)}") from None


def _date_param(request: Request, name: str, default: date) -> date:
    text = request.query_params.get(name)
    if text is None:
        return default
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise InvalidRequest(f"{name} must be a date, YYYY-MM-DD; got {text!r}.",
                             param=name) from None


def admin_routes(
    config: GatewayConfig, store: KeyStore, authority: KeyAuthority | None = None,
    usage: UsageStore | None = None, router: Router | None = None,
) -> list[Route]:
    """The admin routes, guarded by ``config.server.admin_key`` (none configured: every call
    is refused). `authority`, when given, drops its cached copy of a changed key at once."""
    admin_key = config.server.admin_key.get_secret_value() if config.server.admin_key else ""
    expected = f"Bearer {admin_key}".encode()

    def guarded(handler: Handler) -> Handler:
        async def endpoint(request: Request) -> Response:
            presented = (request.headers.get("authorization") or "").encode()
            try:
                if not admin_key or not hmac.compare_digest(presented, expected):
                    raise AuthenticationFailed(
                        "The admin API needs `Authorization: Bearer <admin key>` "
                        "(server.admin_key).")
                return await handler(request)
            except GatewayError as exc:
                return _error(exc)

        return endpoint

    def changed(key_id: str) -> None:
        if authority is not None:
            authority.invalidate(key_id)

    async def list_keys(request: Request) -> Response:
        records = await store.list_keys(request.query_params.get("team"))
        return _json({"object": "list", "data": [r.public() for r in records]})

    async def post_key(request: Request) -> Response:
        body: NewKey = await _parse(request, NewKey)
        try:
            expires_in = parse_duration(body.expires) if body.expires else None
        except ValueError as exc:
            raise InvalidRequest(str(exc), param="expires") from None
        issued = await create_key(
            config, store, team=body.team, name=body.name, models=body.models, rpm=body.rpm,
            tpm=body.tpm, max_concurrent=body.max_concurrent, expires_in=expires_in)
        return _json({**issued.record.public(), "key": issued.secret}, 201)

    async def get_key(request: Request) -> Response:
        key_id = request.path_params["key_id"]
        record = await store.get_key(key_id)
        if record is None:
            raise NotFound(f"There is no key '{key_id}'.")
        return _json(record.public())

    async def delete_key(request: Request) -> Response:
        key_id = request.path_params["key_id"]
        if not await store.revoke_key(key_id):
            raise NotFound(f"There is no key '{key_id}'.")
        changed(key_id)
        return _json({"id": key_id, "revoked": True})

    async def list_teams(request: Request) -> Response:
        teams = await store.list_teams()
        return _json({"object": "list", "data": [t.to_dict() for t in teams]})

    async def put_team(request: Request) -> Response:
        body: TeamLimits = await _parse(request, TeamLimits)
        name = request.path_params.get("team") or body.name
        if not name:
            raise InvalidRequest("Name the team: PUT /admin/teams/{name} or a 'name' field.",
                                 param="name")
        record = TeamRecord(
            name=name, rpm=body.rpm, tpm=body.tpm,
            daily_token_budget=body.daily_token_budget,
            monthly_token_budget=body.monthly_token_budget,
            models={m: ModelLimit(v.rpm, v.tpm) for m, v in body.models.items()},
        )
        await store.put_team(record)
        changed("*")
        return _json(record.to_dict())

    async def get_usage(request: Request) -> Response:
        if usage is None:
            raise NotFound("Usage metering is not enabled on this gateway.")
        since, until = default_range()
        since = _date_param(request, "since", since)
        until = _date_param(request, "until", until)
        if since > until:
            raise InvalidRequest("since is after until.", param="since")
        params = request.query_params
        rows = await usage_report(usage, params.get("team"), since, until, params.get("model"))
        return _json({"object": "list", "since": since.isoformat(),
                      "until": until.isoformat(), "data": rows})

    async def get_deployments(request: Request) -> Response:
        if router is None:
            raise NotFound("This gateway has no router.")
        return _json({"object": "list", "data": router.health()})

    return [
        Route("/admin/deployments", guarded(get_deployments), methods=["GET"]),
        Route("/admin/usage", guarded(get_usage), methods=["GET"]),
        Route("/admin/keys", guarded(list_keys), methods=["GET"]),
        Route("/admin/keys", guarded(post_key), methods=["POST"]),
        Route("/admin/keys/{key_id}", guarded(get_key), methods=["GET"]),
        Route("/admin/keys/{key_id}", guarded(delete_key), methods=["DELETE"]),
        Route("/admin/teams", guarded(list_teams), methods=["GET"]),
        Route("/admin/teams", guarded(put_team), methods=["PUT"]),
        Route("/admin/teams/{team}", guarded(put_team), methods=["PUT"]),
    ]
