"""``gateway serve --demo``: the gateway plus local SAMPLE upstreams, no vendor account needed.

The fake Inkeep, Inkeep-agents and Nuclia servers of `gateway.testing` run in the gateway's own
event loop on free loopback ports; ``demo-*`` models route to them and a fixed demo key is
accepted. Every answer says it is a sample. Without a configured ``server.admin_key`` the demo
makes one up for this run and prints it, so that the console can be signed in to.
"""

from __future__ import annotations

import hashlib
import secrets
from contextlib import AsyncExitStack
from typing import Any

from pydantic import SecretStr

from gateway.config import BackendConfig, CachePolicy, GatewayConfig, ModelConfig, StaticKey
from gateway.testing.process import free_port
from gateway.testing.server import run_server

DEMO_KEY = "gw-demo_sample-key-for-local-demo-only"
DEMO_KBID = "demo-kb"
# demo-nuclia's answers are cached, so that asking it twice shows `x-gateway-cache: hit`
DEMO_CACHE = CachePolicy(enabled=True, ttl=300)


def demo_config(config: GatewayConfig, inkeep_port: int, nuclia_port: int,
                admin_key: str | None = None) -> GatewayConfig:
    """`admin_key`: set as ``server.admin_key`` (the demo's own, when none is configured)."""
    backends = dict(config.backends)
    backends["demo-inkeep"] = BackendConfig(
        kind="inkeep", base_url=f"http://127.0.0.1:{inkeep_port}/v1", requires_key=False)
    backends["demo-inkeep-agents"] = BackendConfig(
        kind="openai", base_url=f"http://127.0.0.1:{inkeep_port}/run/v1", requires_key=False)
    backends["demo-nuclia"] = BackendConfig(
        kind="nuclia", base_url=f"http://127.0.0.1:{nuclia_port}/api/v1", kbid=DEMO_KBID,
        requires_key=False)
    models = dict(config.models)
    models["demo-inkeep-qa"] = ModelConfig(
        backend="demo-inkeep", upstream_model="inkeep-qa",
        description="SAMPLE: local fake of Inkeep's QA mode")
    models["demo-inkeep-agents"] = ModelConfig(
        backend="demo-inkeep-agents", upstream_model="agent",
        description="SAMPLE: local fake of Inkeep's agents API (no model/usage/[DONE])")
    models["demo-nuclia"] = ModelConfig(
        backend="demo-nuclia", cache=DEMO_CACHE,
        description="SAMPLE: local fake of a Nuclia Knowledge Box (answers cached 5 min)")
    digest = hashlib.sha256(DEMO_KEY.encode()).hexdigest()
    keys = config.keys.model_copy(update={"static": [
        *config.keys.static,
        StaticKey(id="demo", team="demo", sha256=digest, name="demo key"),
    ]})
    update: dict[str, Any] = {"backends": backends, "models": models, "keys": keys}
    if admin_key is not None:
        update["server"] = config.server.model_copy(update={"admin_key": SecretStr(admin_key)})
    return config.model_copy(update=update)


def demo_app(config: GatewayConfig, host: str, port: int, *, handle_signals: bool = False
             ) -> tuple[Any, str]:
    from gateway.app import create_app, has_admin_key
    from gateway.testing.fake_inkeep import create_fake_inkeep_app
    from gateway.testing.fake_nuclia import create_fake_nuclia_app

    inkeep_port, nuclia_port = free_port(), free_port()
    admin_key = None if has_admin_key(config) else f"demo-admin-{secrets.token_urlsafe(12)}"
    demo = demo_config(config, inkeep_port, nuclia_port, admin_key)

    async def start_samples(stack: AsyncExitStack) -> None:
        await stack.enter_async_context(
            run_server(create_fake_inkeep_app(delay=0.05), port=inkeep_port))
        await stack.enter_async_context(
            run_server(create_fake_nuclia_app(kbid=DEMO_KBID), port=nuclia_port))

    banner = (
        f"gateway demo: SAMPLE upstreams on 127.0.0.1:{inkeep_port} (Inkeep) and "
        f"127.0.0.1:{nuclia_port} (Nuclia)\n"
        f"  models: demo-inkeep-qa, demo-inkeep-agents, demo-nuclia (sample answers; "
        f"demo-nuclia's are cached for {DEMO_CACHE.ttl:.0f} s)\n"
        f"  key:    {DEMO_KEY}\n"
        f"  try:    curl -N http://{host}:{port}/v1/chat/completions "
        f"-H 'Authorization: Bearer {DEMO_KEY}' -H 'Content-Type: application/json' "
        "-d '{\"model\":\"demo-inkeep-qa\",\"stream\":true,"
        "\"messages\":[{\"role\":\"user\",\"content\":\"hello\"}]}'\n"
        f"  console: http://{host}:{port}/console/  "
        + (f"admin key: {admin_key} (made up for this run; set server.admin_key to choose one)"
           if admin_key else "(sign in with the configured server.admin_key)")
    )
    return create_app(demo, on_startup=start_samples, handle_signals=handle_signals), banner
