"""The alert rules and the Grafana dashboard, checked against the real thing: promtool checks
and unit-tests the rules; a real Prometheus scrapes a real ``gateway serve`` under a little
traffic, and every query of the dashboard and of the rules must return data. The same
gateway's `/metrics` must hold no label value that a client made up."""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import AbstractContextManager, asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import pytest_asyncio
import yaml
from prometheus_client.parser import text_string_to_metric_families

from gateway.testing.configs import config_yaml, static_key
from gateway.testing.fake_analytics import AnalyticsState, create_fake_analytics_app
from gateway.testing.fake_inkeep import create_fake_inkeep_app
from gateway.testing.process import free_port, run_gateway, spawn, stop, wait_until_answers
from gateway.testing.server import run_server
from tests.eventually import eventually

REPO = Path(__file__).resolve().parent.parent
RULE_FILES = sorted((REPO / "deploy/prometheus").glob("*.yml"))
RULE_TESTS = REPO / "deploy/prometheus/tests/alerts_test.yml"
DASHBOARD = REPO / "deploy/grafana/rag-gateway.json"

# Metrics a query may read before the gateway exports them (a new metric landing behind its
# panel): they must return nothing until then. Empty: every query must return data.
NOT_YET_EXPORTED: frozenset[str] = frozenset()

# What Grafana puts in place of its own interval variables; any other variable is one of the
# dashboard's multi-value variables with "All" selected (`.*`).
GRAFANA_INTERVALS = {"__rate_interval": "1m", "__interval": "1m", "__range": "1m"}

# an alert's expression is "<query> <comparison> <threshold>": its query must return data even
# when the alert does not fire, as on this quiet test gateway
ALERT_EXPR = re.compile(r"(?P<query>.+?)\s*(?:>|<|>=|<=|==|!=)\s*[0-9.e+-]+\s*", re.S)

DEADLINE = 30.0  # seconds for Prometheus to have scraped what the traffic left

T = TypeVar("T")


def tool(name: str) -> str:
    found = shutil.which(name)
    assert found, f"{name} is missing: `make test` installs Debian's prometheus package"
    return found


def run_tool(*argv: str | Path, stdin: str | None = None) -> str:
    done = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=60,
                          input=stdin)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


# -- the files themselves ----------------------------------------------------------------------


def rules() -> list[dict[str, Any]]:
    return [rule for path in RULE_FILES for group in yaml.safe_load(path.read_text())["groups"]
            for rule in group["rules"]]


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def panels(board: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, those inside collapsed rows included."""
    for panel in board["panels"]:
        yield panel
        yield from panel.get("panels", ())


def variables(board: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in board["templating"]["list"]}


def promql(expr: str, defined: set[str]) -> str:
    """A dashboard expression as Grafana sends it: its intervals at 1m, every variable at
    "All"."""
    def value(found: re.Match[str]) -> str:
        name = found.group(1) or found.group(2)
        if name in GRAFANA_INTERVALS:
            return GRAFANA_INTERVALS[name]
        assert name in defined, f"${name} is not a variable of the dashboard: {expr}"
        return ".*"
    return re.sub(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)", value, expr)


def dashboard_queries() -> dict[str, str]:
    """Every panel target's expression, by panel title and target."""
    board = dashboard()
    defined = set(variables(board))
    return {f"panel '{panel['title']}' {target['refId']}": promql(target["expr"], defined)
            for panel in panels(board) for target in panel.get("targets", ())}


def variable_queries() -> dict[str, tuple[str, str]]:
    """The dashboard's ``label_values(selector, label)`` variables: (selector, label)."""
    board = dashboard()
    defined = set(variables(board))
    found = {}
    for name, variable in variables(board).items():
        if variable["type"] == "query":
            call = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", variable["query"])
            assert call, f"variable {name}: {variable['query']}"
            found[f"variable {name}"] = (promql(call.group(1), defined), call.group(2))
    return found


def rule_queries() -> dict[str, str]:
    found = {}
    for rule in rules():
        form = ALERT_EXPR.fullmatch(rule["expr"])
        assert form, f"{rule['alert']}: write it as '<query> <comparison> <threshold>'"
        found[f"alert {rule['alert']}"] = form.group("query")
    return found


def not_yet_exported(expr: str) -> bool:
    return any(re.search(rf"\b{name}\b", expr) for name in NOT_YET_EXPORTED)


def test_promtool_checks_the_rules() -> None:
    out = run_tool(tool("promtool"), "check", "rules", *RULE_FILES)
    assert f"SUCCESS: {len(rules())} rules found" in out


def test_promtool_unit_tests_of_the_alerts() -> None:
    assert "SUCCESS" in run_tool(tool("promtool"), "test", "rules", RULE_TESTS)
    tested = set(re.findall(r"alertname: (\w+)", RULE_TESTS.read_text()))
    assert tested == {rule["alert"] for rule in rules()}


def test_every_alert_says_how_urgent_and_what_to_do() -> None:
    for rule in rules():
        assert rule["for"], rule["alert"]
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        assert len(rule["annotations"]["summary"]) < 100, rule["alert"]
        assert len(rule["annotations"]["description"]) > 100, rule["alert"]


def test_the_dashboard_imports_into_any_grafana() -> None:
    board = dashboard()
    source = variables(board)["datasource"]
    assert (source["type"], source["query"]) == ("datasource", "prometheus")
    # no data source uid of ours: the one chosen on import, through the variable
    uids = re.findall(r'"uid":\s*"([^"]*)"', DASHBOARD.read_text())
    assert set(uids) == {"${datasource}", board["uid"]}
    ids = [panel["id"] for panel in panels(board)]
    assert len(ids) == len(set(ids))
    for panel in panels(board):
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            assert panel["targets"] and panel["description"], panel["title"]


# -- a real Prometheus scraping a real gateway -------------------------------------------------

KEY = "sk-observed-client"
KEY_ID = "observed-key-id"
LIMITED_KEY = "sk-observed-limited"
LIMITED_KEY_ID = "observed-limited-id"
TEAMS = ("alpha", "beta")


@dataclass
class Observed:
    gateway: str  # base URLs
    prometheus: str
    free_input: list[str]  # what the client made up: none of it may become a label value


@asynccontextmanager
async def off_the_loop(manager: AbstractContextManager[T]) -> AsyncIterator[T]:
    """Enter and leave a blocking context (starting and stopping a process) in a thread, so
    that the fake upstreams in this event loop go on answering meanwhile."""
    value = await asyncio.to_thread(manager.__enter__)
    try:
        yield value
    finally:
        await asyncio.to_thread(manager.__exit__, None, None, None)


@contextmanager
def run_prometheus(workdir: Path, target: str) -> Iterator[str]:
    """Prometheus on a free port, scraping `target` (host:port) every second and evaluating
    the alert rules every second."""
    port = free_port()
    config = workdir / "prometheus.yml"
    config.write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(path) for path in RULE_FILES],
        "scrape_configs": [{"job_name": "rag-gateway",
                            "static_configs": [{"targets": [target]}]}],
    }))
    log = workdir / "prometheus.log"
    proc = spawn([tool("prometheus"), f"--config.file={config}",
                  f"--storage.tsdb.path={workdir / 'tsdb'}",
                  f"--web.listen-address=127.0.0.1:{port}"], log=log)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_answers(f"{url}/-/ready", proc, log)
        yield url
    finally:
        stop(proc)


def write_config(path: Path, upstream: str, sink: str) -> None:
    path.write_text(config_yaml(
        backends={"inkeep": {"kind": "inkeep", "base_url": f"{upstream}/v1",
                             "requires_key": False},
                  "dead": {"kind": "openai", "base_url": "http://127.0.0.1:9",
                           "requires_key": False}},
        models={"qa": {"backend": "inkeep", "upstream_model": "inkeep-qa"},
                "cached": {"backend": "inkeep", "cache": {"enabled": True, "ttl": 300}},
                "dead": {"backend": "dead"}},
        keys=[static_key(KEY, id=KEY_ID, team=TEAMS[0]),
              static_key(LIMITED_KEY, id=LIMITED_KEY_ID, team=TEAMS[1], rpm=1)],
        sinks=[{"name": "hook", "kind": "webhook", "url": f"{sink}/hook"}],
        extra={"server": {"log_level": "warning"},
               "analytics": {"outbox": {"spool_dir": str(path.parent / "outbox")}}}))


async def send_traffic(url: str, made_up: list[str], *, first: bool) -> int:
    """Successes (whole and streamed), cache hits, an upstream failure, refused requests, and
    the free input a client controls: unknown models, odd paths, request ids, end-user and
    conversation ids, keys, which is added to `made_up`. Returns how many requests were
    admitted (each one a record for the sink)."""
    words = [f"zq{secrets.token_hex(6)}" for _ in range(12)]
    made_up += words
    a, b, c, d, e, f, g, h, i, j, k, m = words
    auth = {"authorization": f"Bearer {KEY}"}
    admitted = 0

    def ask(model: str, **more: Any) -> dict[str, Any]:
        return {"model": model, "messages": [{"role": "user", "content": "hello"}], **more}

    async with httpx.AsyncClient(base_url=url, timeout=10) as http:
        async def chat(body: dict[str, Any], headers: dict[str, str], status: int,
                       path: str = "/v1/chat/completions") -> None:
            nonlocal admitted
            # every request carries the ids a client chooses
            headers = {"x-request-id": f"rid-{secrets.token_hex(4)}-{a}", "x-end-user-id": b,
                       "x-conversation-id": c, **headers}
            made_up.append(headers["x-request-id"])
            reply = await http.post(path, json=body, headers=headers)
            assert reply.status_code == status, reply.text
            admitted += status in (200, 502)

        await chat(ask("qa"), auth, 200)
        await chat(ask("qa", stream=True, user=d, metadata={"tag": e}), auth, 200)
        await chat(ask("cached"), auth, 200)  # a miss the first time, then hits
        await chat(ask("cached"), auth, 200)
        await chat(ask("dead"), auth, 502)
        await chat(ask(f"model-{f}"), auth, 404)
        await chat(ask("qa"), {"authorization": f"Bearer gw-{g}_{h}"}, 401)
        if first:  # its rpm of 1 admits one request in the test's minute
            await chat(ask("qa"), {"authorization": f"Bearer {LIMITED_KEY}"}, 200)
        await chat(ask("qa"), {"authorization": f"Bearer {LIMITED_KEY}"}, 429)
        await chat(ask("qa", **{i: j}), {**auth, "cache-control": f"no-store, {k}"}, 200)
        await chat(ask("qa"), auth, 404, path=f"/v1/{m}/chat/completions")
        for odd in (f"/{a}", f"/v1/models/{b}?{c}={d}", f"/metrics/{e}", f"/admin/{f}"):
            assert (await http.get(odd, headers=auth)).status_code == 404
    return admitted


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def observed(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Observed]:
    workdir = tmp_path_factory.mktemp("observed")
    analytics = AnalyticsState()
    async with run_server(create_fake_inkeep_app()) as upstream, \
            run_server(create_fake_analytics_app(state=analytics)) as sink:
        write_config(workdir / "gateway.yaml", upstream, sink)
        async with off_the_loop(run_gateway(workdir / "gateway.yaml")) as gateway, \
                off_the_loop(run_prometheus(workdir, gateway.url.removeprefix("http://"))
                             ) as prometheus, \
                httpx.AsyncClient(base_url=prometheus) as http:
            made_up: list[str] = []
            admitted = await send_traffic(gateway.url, made_up, first=True)
            # A rate needs two samples of a series, and most series appear with the first
            # request that counts in them: the same again once Prometheus has them.
            await eventually(lambda: _query(http, "gateway_requests_total"), DEADLINE)
            admitted += await send_traffic(gateway.url, made_up, first=False)
            await eventually(lambda: len(analytics.on("/hook")) == admitted, DEADLINE)
            yield Observed(gateway.url, prometheus, made_up)


async def _query(http: httpx.AsyncClient, expr: str) -> list[Any]:
    reply = (await http.get("/api/v1/query", params={"query": expr})).json()
    assert reply["status"] == "success", (expr, reply)
    result: list[Any] = reply["data"]["result"]
    return result


async def _label_values(http: httpx.AsyncClient, selector: str, label: str) -> list[Any]:
    reply = (await http.get(f"/api/v1/label/{label}/values",
                            params={"match[]": selector})).json()
    assert reply["status"] == "success", (selector, reply)
    values: list[Any] = reply["data"]
    return values


@pytest.mark.asyncio(loop_scope="module")
async def test_every_query_of_the_dashboard_and_the_rules_returns_data(
        observed: Observed) -> None:
    queries = {**dashboard_queries(), **rule_queries()}
    later = {where: expr for where, expr in queries.items() if not_yet_exported(expr)}
    waiting = {where: expr for where, expr in queries.items() if where not in later}
    labels = variable_queries()
    deadline = time.monotonic() + DEADLINE
    async with httpx.AsyncClient(base_url=observed.prometheus, timeout=10) as http:
        while True:
            for where, expr in list(waiting.items()):
                # a value, not NaN: a quantile or a ratio of rates over nothing is NaN
                if any(value != "NaN" for _, value in
                       (found["value"] for found in await _query(http, expr))):
                    del waiting[where]
            for where, (selector, label) in list(labels.items()):
                if await _label_values(http, selector, label):
                    del labels[where]
            if not waiting and not labels:
                break
            assert time.monotonic() < deadline, f"no data for {sorted({**waiting, **labels})}"
            await asyncio.sleep(0.25)
        for where, expr in later.items():  # valid PromQL, reading what is not exported yet
            assert await _query(http, expr) == [], f"{where} has data: update NOT_YET_EXPORTED"
    for name in NOT_YET_EXPORTED:  # no stale name
        assert any(re.search(rf"\b{name}\b", expr) for expr in later.values()), name


@pytest.mark.asyncio(loop_scope="module")
async def test_prometheus_loads_and_evaluates_every_rule(observed: Observed) -> None:
    async with httpx.AsyncClient(base_url=observed.prometheus, timeout=10) as http:
        async def evaluated() -> list[dict[str, Any]]:
            reply = (await http.get("/api/v1/rules")).json()
            found = [rule for group in reply["data"]["groups"] for rule in group["rules"]]
            never = "0001-01-01T00:00:00Z"
            return found if all(rule["lastEvaluation"] != never for rule in found) else []

        loaded = await eventually(evaluated, DEADLINE)
    assert {rule["name"] for rule in loaded} == {rule["alert"] for rule in rules()}
    for rule in loaded:
        assert rule["health"] == "ok", rule


# -- label values: bounded by the config, never the client's --------------------------------

NAMES = r"[a-z][a-z_]*"  # the gateway's own vocabulary (error codes)
BOUNDED: dict[str, frozenset[str] | str] = {
    "model": frozenset({"qa", "cached", "dead"}),  # the config's models
    "backend": frozenset({"inkeep", "dead"}),  # its backends
    "deployment": frozenset({"inkeep", "dead"}),  # a deployment is named by its backend
    "outcome": frozenset({"success", "retryable_error", "error", "budget_exhausted"}),
    "team": frozenset(TEAMS),  # teams of its keys
    "sink": frozenset({"hook"}),  # its sinks
    "status": r"[1-5][0-9][0-9]",
    "code": NAMES,
    "kind": frozenset({"prompt", "completion"}),
    "cached": frozenset({"true", "false"}),
    "result": frozenset({"hit", "miss", "bypass", "coalesced",
                         "delivered", "retried", "dead_lettered"}),
    "component": frozenset({"limits", "cache"}),
    "le": r"[0-9.e+-]+|\+Inf",
    # python_info: the interpreter's
    "implementation": NAMES.replace("a-z", "A-Za-z"), "version": r"[0-9.a-z+]+",
    "major": r"[0-9]+", "minor": r"[0-9]+", "patchlevel": r"[0-9a-z]+",
}


def bounded(label: str, value: str) -> bool:
    allowed = BOUNDED[label]
    if isinstance(allowed, str):
        return re.fullmatch(allowed, value) is not None
    return value in allowed


@pytest.mark.asyncio(loop_scope="module")
async def test_no_label_value_comes_from_the_client(observed: Observed) -> None:
    async with httpx.AsyncClient(base_url=observed.gateway) as http:
        exposed = (await http.get("/metrics")).text
    for made_up in [*observed.free_input, KEY, KEY_ID, LIMITED_KEY, LIMITED_KEY_ID]:
        assert made_up not in exposed
    seen: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(exposed):
        for sample in family.samples:
            for label, value in sample.labels.items():
                assert label in BOUNDED, f"{sample.name}: review label {label!r} and add it"
                assert bounded(label, value), f"{sample.name}{{{label}={value!r}}}"
                seen.setdefault(label, set()).add(value)
    # the traffic reached the labels it should have
    assert {"model", "backend", "team", "sink", "status", "code", "result"} <= set(seen)


@pytest.mark.asyncio(loop_scope="module")
async def test_the_exposition_passes_promtool_lint(observed: Observed) -> None:
    """Names, units, help texts and types as Prometheus's conventions want them."""
    async with httpx.AsyncClient(base_url=observed.gateway) as http:
        exposed = (await http.get("/metrics")).text
    assert run_tool(tool("promtool"), "check", "metrics", stdin=exposed) == ""
