"""A gateway process SIGKILLed between accepting exchanges and delivering them to analytics:
on Redis, another replica claims the records the dead one left pending and delivers each
exactly once (by idempotency key), in order per conversation."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest

from gateway.stores.redis_base import connect
from gateway.testing.configs import config_yaml, static_key
from gateway.testing.fake_analytics import AnalyticsState, create_fake_analytics_app
from gateway.testing.fake_inkeep import create_fake_inkeep_app
from gateway.testing.process import GatewayProcess, run_gateway
from gateway.testing.server import run_server
from tests.eventually import eventually

pytestmark = [pytest.mark.slow, pytest.mark.redis]

UPSTREAM_KEY = "upstream-secret-crash"
CLIENT_KEY = "sk-crash-test-client"
ANALYTICS_KEY = "analytics-secret-crash"
PREFIX = "crash"


@pytest.fixture
async def upstream() -> AsyncIterator[str]:
    async with run_server(create_fake_inkeep_app(api_key=UPSTREAM_KEY)) as url:
        yield url


@pytest.fixture
async def analytics() -> AsyncIterator[tuple[str, AnalyticsState]]:
    app = create_fake_analytics_app(ANALYTICS_KEY)
    async with run_server(app) as url:
        yield url, app.state.analytics


@pytest.fixture
def config_file(tmp_path: Path, redis_url: str, upstream: str,
                analytics: tuple[str, AnalyticsState]) -> Path:
    path = tmp_path / "gateway.yaml"
    path.write_text(config_yaml(
        store=redis_url,
        backends={"inkeep": {"kind": "inkeep", "base_url": f"{upstream}/v1",
                             "api_key": UPSTREAM_KEY}},
        models={"qa": {"backend": "inkeep", "upstream_model": "inkeep-qa"}},
        keys=[static_key(CLIENT_KEY, id="crash", team="alpha")],
        sinks=[{"name": "ink", "kind": "inkeep", "url": analytics[0],
                "api_key": ANALYTICS_KEY, "timeout": 1}],
        extra={"store_prefix": PREFIX, "server": {"log_level": "info"},
               "analytics": {"outbox": {"claim_idle_seconds": 1, "shutdown_grace": 1}}},
    ))
    return path


def sink_events(tmp_path: Path) -> list[str]:
    """The replicas' log lines about deliveries and the outbox (retries, failures)."""
    return [line for log in sorted(tmp_path.glob("gateway-*.log"))
            for line in log.read_text(errors="replace").splitlines()
            if "sink" in line or "outbox" in line]


@pytest.fixture
def start(config_file: Path) -> Iterator[Callable[[], GatewayProcess]]:
    """Starts one more replica on the config each time it is called."""
    with ExitStack() as stack:
        yield lambda: stack.enter_context(run_gateway(config_file))


async def test_records_of_a_killed_replica_are_delivered_by_the_next(
    start: Callable[[], GatewayProcess], redis_url: str,
    analytics: tuple[str, AnalyticsState], tmp_path: Path,
) -> None:
    _, state = analytics
    state.faults.fail_for(3600, 503)  # analytics is down while replica A takes traffic
    replica_a = start()
    turns, convs = 4, 3
    async with httpx.AsyncClient(timeout=10) as client:
        for turn in range(turns):
            for conv in range(convs):
                reply = await client.post(
                    f"{replica_a.url}/v1/chat/completions",
                    headers={"authorization": f"Bearer {CLIENT_KEY}",
                             "x-conversation-id": f"conv-{conv}"},
                    json={"model": "qa", "messages": [
                        {"role": "user", "content": f"conv {conv} turn {turn}"}]})
                assert reply.status_code == 200
    n = turns * convs
    ns = connect(redis_url, PREFIX)
    stream = ns.key("outbox:ink", "stream")
    try:
        async def claimed_by_a() -> bool:  # every record is in the outbox, claimed by A
            pending = await ns.client.xpending(stream, "delivery")
            return bool(pending["pending"] == n and state.refused > 0)

        await eventually(claimed_by_a, within=10)
        replica_a.kill()
        state.faults.clear()
        start()  # replica B
        # until B has delivered and acknowledged every record: once the outbox is empty,
        # nothing is left that could arrive a second time
        async def delivered_by_b() -> bool:
            return len(state.by_key("/conversations")) >= n and not await ns.client.xlen(stream)

        await eventually(delivered_by_b, within=15)
    finally:
        await ns.client.aclose()
    by_key = state.by_key("/conversations")
    twice = [key for key, got in by_key.items() if len(got) > 1]
    # a record delivered twice: say which, with what the replicas logged about their sinks
    assert len(by_key) == n and not twice, (twice, sink_events(tmp_path))
    order: dict[str, list[str]] = {}
    for got in state.on("/conversations"):
        order.setdefault(got.body["id"], []).append(got.body["messages"][-2]["content"])
    assert order == {f"conv-{c}": [f"conv {c} turn {t}" for t in range(turns)]
                     for c in range(convs)}
