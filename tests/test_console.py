"""The console over HTTP, in process: sign-in, the session cookie, CSRF, what each page shows
(escaped), the CSV, replay of dead letters, and the circuit state source."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from gateway.analytics.reports import default_range, usage_csv, usage_report
from gateway.components import make_usage_store
from gateway.config import GatewayConfig
from gateway.console.session import COOKIE
from gateway.health import DeploymentHealth
from gateway.testing.fake_analytics import AnalyticsState, create_fake_analytics_app
from gateway.testing.fake_inkeep import create_fake_inkeep_app
from gateway.testing.server import run_server
from tests.eventually import eventually
from tests.gateway_fixtures import async_client, gateway_config, serve_gateway

ADMIN_KEY = "console-admin-key-for-tests"
HELLO = [{"role": "user", "content": "hello"}]
CSRF = re.compile(r'name="csrf" value="([^"]+)"')


@dataclass
class Console:
    url: str  # the gateway
    http: httpx.AsyncClient  # signed in, on /console
    config: GatewayConfig
    sink: AnalyticsState

    async def csrf(self, path: str = "/keys") -> str:
        found = CSRF.search((await self.http.get(path)).text)
        assert found is not None
        return found.group(1)


def config_for(upstream: str, hook: str, tmp_path: Path, *, admin: bool = True
               ) -> GatewayConfig:
    """The test gateway's config, with a webhook sink at `hook` and an admin key (or none)."""
    extra: dict[str, Any] = {"analytics": {
        "sinks": [{"name": "hook", "kind": "webhook", "url": f"{hook}/hook"}],
        "outbox": {"spool_dir": str(tmp_path / "outbox")}}}
    if admin:
        extra["server"] = {"admin_key": ADMIN_KEY}
    return gateway_config(upstream, extra=yaml.safe_dump(extra), base_dir=tmp_path)


async def sign_in(http: httpx.AsyncClient) -> httpx.Response:
    return await http.post("/login", data={"admin_key": ADMIN_KEY, "next": "/console/usage"})


@pytest.fixture
async def console(tmp_path: Path) -> AsyncIterator[Console]:
    sink = create_fake_analytics_app()
    async with run_server(create_fake_inkeep_app()) as upstream, run_server(sink) as hook:
        config = config_for(upstream, hook, tmp_path)
        async with serve_gateway(config) as url, \
                httpx.AsyncClient(base_url=f"{url}/console") as http:
            assert (await sign_in(http)).status_code == 303
            yield Console(url, http, config, sink.state.analytics)


async def test_the_console_is_off_without_an_admin_key(tmp_path: Path) -> None:
    config = config_for("http://127.0.0.1:9", "http://127.0.0.1:9", tmp_path, admin=False)
    async with serve_gateway(config) as url, httpx.AsyncClient(base_url=url) as http:
        for path in ("/console", "/console/", "/console/login", "/console/static/console.css"):
            reply = await http.get(path)
            assert reply.status_code == 404, path
            assert reply.json()["error"]["code"] == "not_found"


@pytest.fixture
async def signed_out(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    config = config_for("http://127.0.0.1:9", "http://127.0.0.1:9", tmp_path)
    async with serve_gateway(config) as url, \
            httpx.AsyncClient(base_url=f"{url}/console") as http:
        yield http


async def test_pages_need_a_session(signed_out: httpx.AsyncClient) -> None:
    away = await signed_out.get("/keys?team=a")
    assert away.status_code == 303
    assert away.headers["location"] == "/console/login?next=%2Fconsole%2Fkeys%3Fteam%3Da"
    wrong = await signed_out.post("/login", data={"admin_key": "guess", "next": "/console/"})
    assert wrong.status_code == 401 and COOKIE not in wrong.cookies
    assert "guess" not in wrong.text
    assert (await signed_out.get("/")).status_code == 303


async def test_sign_in_sets_a_strict_expiring_cookie(signed_out: httpx.AsyncClient) -> None:
    right = await sign_in(signed_out)
    assert right.status_code == 303 and right.headers["location"] == "/console/usage"
    cookie = right.headers["set-cookie"]
    for attribute in ("HttpOnly", "SameSite=strict", "Path=/console", "Max-Age=28800"):
        assert attribute.lower() in cookie.lower(), attribute
    assert ADMIN_KEY not in cookie
    page = await signed_out.get("/")
    assert page.status_code == 200 and ADMIN_KEY not in page.text
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
    assert page.headers["cache-control"] == "no-store"
    # elsewhere after signing in: only a console page, never another site
    again = await signed_out.post("/login", data={"admin_key": ADMIN_KEY,
                                                  "next": "https://evil.example/"})
    assert again.headers["location"] == "/console/"
    token = CSRF.findall((await signed_out.get("/")).text)[0]  # of the new session
    assert (await signed_out.post("/logout", data={"csrf": token})).status_code == 303
    assert (await signed_out.get("/")).status_code == 303


async def test_a_forged_or_foreign_cookie_is_no_session(console: Console) -> None:
    value = console.http.cookies[COOKIE]
    async with httpx.AsyncClient(base_url=console.http.base_url) as other:
        for forged in (value[:-2] + "xx", value.replace(".", "0", 1), "abc.def", ""):
            other.cookies.set(COOKIE, forged)
            assert (await other.get("/")).status_code == 303, forged


async def test_changes_need_the_cookie_the_token_and_the_same_origin(console: Console) -> None:
    token = await console.csrf()
    form = {"team": "sneaky", "csrf": token}
    async with httpx.AsyncClient(base_url=console.http.base_url) as stranger:
        assert (await stranger.post("/keys", data=form)).status_code == 403
    no_token = await console.http.post("/keys", data={"team": "sneaky"})
    wrong_token = await console.http.post("/keys", data={**form, "csrf": "0" * 64})
    cross_site = await console.http.post("/keys", data=form,
                                         headers={"origin": "https://evil.example"})
    assert [r.status_code for r in (no_token, wrong_token, cross_site)] == [403, 403, 403]
    assert "sneaky" not in (await console.http.get("/keys")).text


async def test_a_key_is_created_shown_once_used_and_revoked(console: Console) -> None:
    created = await console.http.post("/keys", data={
        "csrf": await console.csrf(), "team": "web", "name": "widget", "models": "qa, rag",
        "rpm": "60", "expires": "30d"})
    assert created.status_code == 201 and created.headers["cache-control"] == "no-store"
    secret = re.search(r'id="new-secret">([^<]+)<', created.text)
    assert secret is not None
    key = secret.group(1)
    key_id = key.removeprefix("gw-").split("_")[0]
    async with async_client(console.url, key=key) as client:
        await client.chat.completions.create(model="qa", messages=HELLO)
    listing = (await console.http.get("/keys")).text
    assert key_id in listing and key not in listing
    page = await console.http.get(f"/keys/{key_id}")
    assert "widget" in page.text and key not in page.text and 'value="qa, rag"' in page.text

    edited = await console.http.post(f"/keys/{key_id}", data={
        "csrf": await console.csrf(), "models": "qa", "rpm": "", "tpm": "500"})
    assert edited.status_code == 303
    page = await console.http.get(f"/keys/{key_id}")
    assert 'value="qa"' in page.text and 'name="tpm" inputmode="numeric" value="500"' in page.text

    revoked = await console.http.post(f"/keys/{key_id}/revoke",
                                      data={"csrf": await console.csrf()})
    assert revoked.status_code == 303
    assert 'id="key-state">revoked' in (await console.http.get(f"/keys/{key_id}")).text
    async with async_client(console.url, key=key) as client:
        with pytest.raises(Exception) as refused:
            await client.chat.completions.create(model="qa", messages=HELLO)
    assert getattr(refused.value, "status_code", None) == 401


async def test_bad_input_is_a_400_naming_the_field(console: Console) -> None:
    reply = await console.http.post("/keys", data={"csrf": await console.csrf(),
                                                   "team": "web", "rpm": "lots"})
    assert reply.status_code == 400 and "rpm" in reply.text
    reply = await console.http.post("/keys", data={"csrf": await console.csrf(),
                                                   "team": "web", "expires": "soon"})
    assert reply.status_code == 400 and "expires" in reply.text
    team = await console.http.post("/teams", data={"csrf": await console.csrf(),
                                                   "name": "web", "daily_token_budget": "0"})
    assert team.status_code == 400 and "daily_token_budget" in team.text
    assert (await console.http.get("/usage?since=yesterday")).status_code == 400
    assert (await console.http.get("/keys/nope")).status_code == 404


async def test_team_limits_are_set_and_names_escaped(console: Console) -> None:
    name = '<script>alert("x")</script>'
    saved = await console.http.post("/teams", data={
        "csrf": await console.csrf(), "name": name, "rpm": "30", "monthly_token_budget": "9000"})
    assert saved.status_code == 303
    page = await console.http.get(saved.headers["location"].removeprefix("/console"))
    assert page.status_code == 200
    assert name not in page.text and "&lt;script&gt;" in page.text
    assert 'value="30"' in page.text and 'value="9000"' in page.text
    assert name not in (await console.http.get("/keys")).text


async def test_charts_usage_and_its_csv_come_from_real_requests(console: Console) -> None:
    async with async_client(console.url) as client:
        for _ in range(3):
            await client.chat.completions.create(model="qa", messages=HELLO)
        await client.chat.completions.create(model="rag", messages=HELLO, stream=True)

    async def charted() -> str | None:
        page = (await console.http.get("/?window=hour&by=model")).text
        return page if 'data-series="qa"' in page and 'data-series="rag"' in page else None

    page = await eventually(charted)
    assert 'id="total-requests">4<' in page
    since, until = default_range()
    usage = await console.http.get("/usage.csv", params={"team": "alpha"})
    rows = await usage_report(make_usage_store(console.config, None), "alpha", since, until)
    assert usage.text == usage_csv(rows) and "attachment" in usage.headers[
        "content-disposition"]
    only_rag = await console.http.get("/usage.csv", params={"model": "rag"})
    assert [line.split(",")[3] for line in only_rag.text.splitlines()[1:]] == ["rag"]
    assert "alpha" in (await console.http.get("/usage?team=alpha")).text


async def test_dead_letters_are_listed_with_their_error_and_replayed(console: Console) -> None:
    console.sink.faults.fail_next(2, status=400)  # refused outright: dead-lettered at once
    async with async_client(console.url) as client:
        for _ in range(2):
            await client.chat.completions.create(model="qa", messages=HELLO)

    async def dead() -> str | None:
        page = (await console.http.get("/delivery")).text
        return page if page.count("Replay</button>") == 2 else None

    page = await eventually(dead)
    assert "HTTP 400" in page or "400" in page
    replayed = await console.http.post("/delivery/replay", data={
        "csrf": await console.csrf("/delivery"), "all": "1"})
    assert replayed.status_code == 303 and replayed.headers["location"].endswith("replayed=2")
    await eventually(lambda: len(console.sink.on("/hook")) == 2)
    assert "No dead letters." in (await console.http.get("/delivery")).text


async def test_backends_show_the_circuits_routing_reports(
        tmp_path: Path, console: Console) -> None:
    page = (await console.http.get("/backends")).text
    assert 'data-backend="inkeep"' in page
    assert '<th scope="row">inkeep</th>' in page and ">closed</span>" in page  # the router's

    class Circuits:
        async def deployments(self) -> list[DeploymentHealth]:
            return [DeploymentHealth("qa-eu", "inkeep", "open", 5, "opened 3 s ago")]

    async with serve_gateway(console.config, health=Circuits()) as url, \
            httpx.AsyncClient(base_url=f"{url}/console") as http:
        await sign_in(http)
        page = (await http.get("/backends")).text
        assert "qa-eu" in page and "opened 3 s ago" in page
        assert "circuit open" in (await http.get("/")).text  # the overview's alerts


@pytest.mark.redis
async def test_every_replica_on_one_redis_draws_the_same_overview(
        tmp_path: Path, redis_url: str) -> None:
    async with run_server(create_fake_inkeep_app()) as upstream:
        config = gateway_config(upstream, store=redis_url, base_dir=tmp_path,
                                extra=f"server: {{admin_key: {ADMIN_KEY}}}")
        async with serve_gateway(config) as one, serve_gateway(config) as two, \
                httpx.AsyncClient(base_url=f"{two}/console") as http:
            async with async_client(one) as client:
                for _ in range(3):
                    await client.chat.completions.create(model="qa", messages=HELLO)
            await sign_in(http)  # on the other replica

            async def charted() -> str | None:
                page = (await http.get("/?window=hour")).text
                return page if 'id="total-requests">3<' in page else None

            page = await eventually(charted)
            assert 'data-series="alpha"' in page
