"""`/metrics` beyond the request counters: process and platform figures, one worker and
several."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from gateway.metrics import Metrics
from gateway.testing.configs import config_yaml
from gateway.testing.process import run_gateway
from tests.eventually import eventually

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
