"""`/metrics` beyond the request counters: process and platform figures (one worker and
several), and the overhead histogram, which holds the figure of ``x-gateway-overhead-ms``."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from gateway.metrics import Metrics
from gateway.testing.configs import config_yaml
from gateway.testing.fake_inkeep import create_fake_inkeep_app
from gateway.testing.process import run_gateway
from gateway.testing.server import run_server
from tests.eventually import eventually
from tests.gateway_fixtures import (
    CLIENT_KEY,
    UPSTREAM_KEY,
    gateway_config,
    serve_gateway,
    settled,
)

PROCESS_FIGURES = ("process_resident_memory_bytes", "process_virtual_memory_bytes",
                   "process_cpu_seconds_total", "process_open_fds", "process_max_fds",
                   "process_start_time_seconds")


def samples(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Every sample of an exposition, by sample name."""
    found: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found.setdefault(sample.name, []).append((sample.labels, sample.value))
    return found


def test_one_process_exports_its_process_and_platform_figures() -> None:
    metrics = Metrics(CollectorRegistry(), multiprocess=False)
    found = samples(metrics.render()[0].decode())
    for name in PROCESS_FIGURES:
        [(labels, value)] = found[name]
        assert value > 0, name
    [(info, _)] = found["python_info"]
    assert info["implementation"] and info["version"]


def _workers(supervisor: int) -> list[int]:
    """The uvicorn workers of a ``gateway serve --workers N`` (multiprocessing's resource
    tracker, also a child, excluded)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except (OSError, ValueError):
            continue
        if entry.name.isdigit() and int(stat.rsplit(")", 1)[1].split()[1]) == supervisor \
                and b"spawn_main" in cmdline:
            found.append(int(entry.name))
    return found


def _resident(pid: int) -> int:
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGESIZE")


@pytest.mark.slow
@pytest.mark.redis
async def test_several_workers_export_their_figures_together(tmp_path: Path,
                                                             redis_url: str) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text(config_yaml(
        store=redis_url,
        backends={"up": {"kind": "openai", "base_url": "http://127.0.0.1:9",
                         "requires_key": False}},
        models={"m": {"backend": "up"}}, extra={"server": {"log_level": "warning"}}))
    with run_gateway(config, workers=2) as gateway:
        workers = _workers(gateway.pid)
        assert len(workers) == 2

        async def together() -> dict[str, list[tuple[dict[str, str], float]]] | None:
            # each worker writes its figures once a second: wait until both have
            async with httpx.AsyncClient() as client:
                found = samples((await client.get(f"{gateway.url}/metrics")).text)
            memory = sum(_resident(pid) for pid in workers)
            [(_, reported)] = found["process_resident_memory_bytes"]
            return found if abs(reported - memory) < 0.2 * memory else None

        found = await eventually(together)
    for name in PROCESS_FIGURES:  # once each, not once per worker
        [(labels, value)] = found[name]
        assert labels == {} and value > 0, name
    [(_, open_fds)] = found["process_open_fds"]
    [(_, max_fds)] = found["process_max_fds"]
    assert 0 < open_fds < max_fds
    assert len(found["python_info"]) == 1


@pytest.fixture
async def gateway() -> AsyncIterator[str]:
    async with run_server(create_fake_inkeep_app(api_key=UPSTREAM_KEY)) as upstream, \
            serve_gateway(gateway_config(upstream)) as url:
        yield url


async def test_the_overhead_histogram_holds_the_header_figure(gateway: str) -> None:
    headers = {"authorization": f"Bearer {CLIENT_KEY}"}
    said: dict[tuple[str, str], list[float]] = {}
    async with httpx.AsyncClient(base_url=gateway) as client:
        for model, backend, stream in [("qa", "inkeep", False), ("qa", "inkeep", True),
                                       ("dead", "dead", False)]:
            reply = await client.post("/v1/chat/completions", headers=headers, json={
                "model": model, "stream": stream,
                "messages": [{"role": "user", "content": "hello"}]})
            assert reply.status_code == (502 if model == "dead" else 200)
            said.setdefault((model, backend), []).append(
                float(reply.headers["x-gateway-overhead-ms"]) / 1000)
        # refused before routing: no model to file it under, as for the latency
        refused = await client.post("/v1/chat/completions", json={"model": "qa"})
        assert refused.status_code == 401
        await settled(gateway)  # a stream's figure is observed once its last byte is sent
        found = samples((await client.get("/metrics")).text)
    observed = {(labels["model"], labels["backend"]): value
                for labels, value in found["gateway_overhead_seconds_sum"]}
    counts = {(labels["model"], labels["backend"]): value
              for labels, value in found["gateway_overhead_seconds_count"]}
    assert counts == {key: len(values) for key, values in said.items()}
    for key, values in said.items():
        # the header rounds to a microsecond
        assert observed[key] == pytest.approx(sum(values), abs=1e-6 * len(values)), key
