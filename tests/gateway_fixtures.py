"""Building blocks for end-to-end tests: a gateway served by real uvicorn in front of fakes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import openai

from gateway.app import create_app
from gateway.config import GatewayConfig, parse_config
from gateway.testing.configs import config_yaml, static_key
from gateway.testing.server import run_server
from tests.eventually import eventually

CLIENT_KEY = "sk-test-client-key"
OTHER_KEY = "sk-test-other-team"
LIMITED_KEY = "sk-test-limited"
UPSTREAM_KEY = "upstream-secret-do-not-leak"


def gateway_config(
    inkeep_url: str, *, extra: str = "", base_dir: Path = Path("."), store: str = "memory",
    env: dict[str, str] | None = None,
) -> GatewayConfig:
    """Fake Inkeep (`inkeep_url`) behind four backends, three teams' static keys; `extra` YAML
    is merged in."""
    text = config_yaml(
        store=store,
        backends={
            "inkeep": {"kind": "inkeep", "base_url": f"{inkeep_url}/v1",
                       "api_key": f"${{TEST_INKEEP_KEY:-{UPSTREAM_KEY}}}",
                       "headers": {"x-extra-upstream": "configured"},
                       "timeouts": {"connect": 1, "read": 1.5, "total": 10}},
            "agents": {"kind": "openai", "base_url": f"{inkeep_url}/run/v1",
                       "api_key": UPSTREAM_KEY},
            "nokey": {"kind": "inkeep", "base_url": f"{inkeep_url}/v1",
                      "api_key": "${MISSING_TEST_VAR:-}"},
            "dead": {"kind": "openai", "base_url": "http://127.0.0.1:9", "requires_key": False},
        },
        # one upstream call per request: these tests count them and map each failure
        # (retries, fallbacks and circuits have tests of their own, test_routing*.py)
        models={
            "qa": {"backend": "inkeep", "upstream_model": "inkeep-qa", "retries": 0},
            "rag": {"backend": "inkeep", "upstream_model": "inkeep-rag", "retries": 0},
            "agent": {"backend": "agents", "upstream_model": "agent", "retries": 0},
            "unconfigured": {"backend": "nokey", "retries": 0},
            "dead": {"backend": "dead", "retries": 0},
        },
        keys=[static_key(CLIENT_KEY, id="test", team="alpha"),
              static_key(OTHER_KEY, id="other", team="beta", models=["qa"]),
              static_key(LIMITED_KEY, id="limited", team="gamma", rpm=2)],
        extra=extra,
    )
    return parse_config(text, base_dir=base_dir, env=env or {})


@asynccontextmanager
async def serve_gateway(config: GatewayConfig, **kw: Any) -> AsyncIterator[str]:
    async with run_server(create_app(config, **kw)) as url:
        yield url


async def settled(url: str) -> None:
    """Wait until the gateway has no chat completion in flight (its /metrics say so): every
    exchange it took has ended and handed its record to the observers."""
    async with httpx.AsyncClient(base_url=url) as http:
        async def idle() -> bool:
            found = await http.get("/metrics")
            return "\ngateway_in_flight_requests 0.0\n" in found.text

        await eventually(idle)


def async_client(url: str, key: str = CLIENT_KEY, **kw: Any) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, **kw)


def sync_client(url: str, key: str = CLIENT_KEY, **kw: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, **kw)
