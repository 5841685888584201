"""`make run` (`gateway serve --demo`): the shipped config plus the SAMPLE upstreams, through a
real uvicorn server and the real openai SDK, as a newcomer first sees the gateway."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
from pydantic import SecretStr

from gateway.config import load_config
from gateway.demo import DEMO_KEY, demo_app
from gateway.testing.server import run_server
from tests.gateway_fixtures import async_client

CONFIG = Path(__file__).resolve().parent.parent / "config" / "gateway.yaml"
HELLO = [{"role": "user", "content": "hello"}]


async def test_the_demo_answers_on_every_sample_model_and_caches_nuclia() -> None:
    app, banner = demo_app(load_config(CONFIG), "127.0.0.1", 8080)
    assert DEMO_KEY in banner and "demo-nuclia's are cached" in banner
    async with run_server(app) as url, async_client(url, key=DEMO_KEY) as client:
        listed = {model.id for model in (await client.models.list()).data}
        assert {"demo-inkeep-qa", "demo-inkeep-agents", "demo-nuclia"} <= listed
        for model in ("demo-inkeep-qa", "demo-inkeep-agents", "demo-nuclia"):
            whole = await client.chat.completions.create(model=model, messages=HELLO)
            assert "sample" in (whole.choices[0].message.content or "").lower(), model
            stream = await client.chat.completions.create(
                model=model, messages=HELLO, stream=True, stream_options={"include_usage": True})
            chunks = [chunk async for chunk in stream]
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            assert "sample" in text.lower() and chunks[-1].usage is not None, model

        asked = [await client.chat.completions.with_raw_response.create(
            model=model, messages=[{"role": "user", "content": "twice"}])
            for model in ("demo-nuclia", "demo-nuclia", "demo-inkeep-qa")]
    assert [reply.headers["x-gateway-cache"] for reply in asked] == ["miss", "hit", "bypass"]
    assert asked[0].parse().choices[0].message.content == \
        asked[1].parse().choices[0].message.content


async def test_the_demo_makes_up_an_admin_key_and_prints_the_console() -> None:
    app, banner = demo_app(load_config(CONFIG), "127.0.0.1", 8080)
    found = re.search(r"console: http://127\.0\.0\.1:8080/console/  admin key: (\S+)", banner)
    assert found is not None
    admin_key = found.group(1)
    assert admin_key not in demo_app(load_config(CONFIG), "127.0.0.1", 8080)[1]  # per run
    async with run_server(app) as url, httpx.AsyncClient(base_url=f"{url}/console") as http:
        signed_in = await http.post("/login", data={"admin_key": admin_key})
        assert signed_in.status_code == 303
        assert (await http.get("/")).status_code == 200


def test_a_configured_admin_key_is_never_printed() -> None:
    config = load_config(CONFIG)
    chosen = config.model_copy(update={"server": config.server.model_copy(
        update={"admin_key": SecretStr("operators-own-key")})})
    _, banner = demo_app(chosen, "127.0.0.1", 8080)
    assert "operators-own-key" not in banner and "sign in with the configured" in banner
