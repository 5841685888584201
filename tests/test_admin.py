"""The admin API: admin-key guard, key create (secret once) / list / revoke, team limits."""

from __future__ import annotations

import textwrap
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette

from gateway.admin import admin_routes
from gateway.auth import KeyAuthority
from gateway.config import GatewayConfig, parse_config
from gateway.errors import AuthenticationFailed
from gateway.stores.keys import MemoryKeyStore

ADMIN = {"authorization": "Bearer admin-secret"}


def config(tmp_path: Path) -> GatewayConfig:
    return parse_config(textwrap.dedent("""
        server: {admin_key: admin-secret}
    """), base_dir=tmp_path, env={})


@pytest.fixture
async def setup(tmp_path: Path) -> AsyncIterator[tuple[httpx.AsyncClient, KeyAuthority]]:
    cfg = config(tmp_path)
    store = MemoryKeyStore(cfg.resolve(cfg.keys.file))
    authority = KeyAuthority(cfg, store)
    app = Starlette(routes=admin_routes(cfg, store, authority))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
        yield client, authority


async def test_needs_the_admin_key(setup: tuple[httpx.AsyncClient, KeyAuthority]) -> None:
    client, _ = setup
    for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "admin-secret"}):
        reply = await client.get("/admin/keys", headers=headers)
        assert reply.status_code == 401
        assert reply.json()["error"]["code"] == "invalid_api_key"


async def test_refused_when_no_admin_key_is_configured(tmp_path: Path) -> None:
    cfg = parse_config("{}", base_dir=tmp_path, env={})
    app = Starlette(routes=admin_routes(cfg, MemoryKeyStore(None)))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
        reply = await client.get("/admin/keys", headers={"authorization": "Bearer "})
        assert reply.status_code == 401


async def test_create_list_revoke(setup: tuple[httpx.AsyncClient, KeyAuthority]) -> None:
    client, authority = setup
    reply = await client.post("/admin/keys", headers=ADMIN, json={
        "team": "alpha", "name": "ci", "models": ["qa"], "rpm": 5, "expires": "30d"})
    assert reply.status_code == 201
    created = reply.json()
    secret = created["key"]
    assert secret.startswith(f"gw-{created['id']}_") and "hash" not in created
    assert created["expires"] - created["created"] == pytest.approx(30 * 86400)
    principal = await authority.authenticate(f"Bearer {secret}")
    assert principal.team == "alpha" and principal.rpm == 5

    listed = (await client.get("/admin/keys?team=alpha", headers=ADMIN)).json()["data"]
    assert [k["id"] for k in listed] == [created["id"]]
    assert secret not in str(listed) and "hash" not in listed[0]
    assert (await client.get("/admin/keys?team=beta", headers=ADMIN)).json()["data"] == []
    one = await client.get(f"/admin/keys/{created['id']}", headers=ADMIN)
    assert one.json()["name"] == "ci"

    gone = await client.delete(f"/admin/keys/{created['id']}", headers=ADMIN)
    assert gone.json() == {"id": created["id"], "revoked": True}
    with pytest.raises(AuthenticationFailed):  # the authority's cache was dropped at once
        await authority.authenticate(f"Bearer {secret}")
    missing = await client.delete("/admin/keys/nope", headers=ADMIN)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"


async def test_bad_bodies_are_400(setup: tuple[httpx.AsyncClient, KeyAuthority]) -> None:
    client, _ = setup
    for body in ({"name": "no team"}, {"team": "a", "rpm": 0}, {"team": "a", "bogus": 1},
                 {"team": "a", "expires": "soon"}):
        reply = await client.post("/admin/keys", headers=ADMIN, json=body)
        assert reply.status_code == 400, body
        assert reply.json()["error"]["type"] == "invalid_request_error"


async def test_teams(setup: tuple[httpx.AsyncClient, KeyAuthority]) -> None:
    client, _ = setup
    reply = await client.put("/admin/teams/alpha", headers=ADMIN, json={
        "rpm": 10, "daily_token_budget": 1000, "models": {"qa": {"tpm": 50}}})
    assert reply.status_code == 200
    await client.put("/admin/teams", headers=ADMIN, json={"name": "beta", "tpm": 7})
    teams = (await client.get("/admin/teams", headers=ADMIN)).json()["data"]
    assert [(t["name"], t["rpm"], t["tpm"]) for t in teams] == [("alpha", 10, None),
                                                                 ("beta", None, 7)]
    assert teams[0]["models"] == {"qa": {"rpm": None, "tpm": 50}}
    nameless = await client.put("/admin/teams", headers=ADMIN, json={"rpm": 1})
    assert nameless.status_code == 400
