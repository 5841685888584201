"""`gateway.testing.process`: a real ``gateway serve`` started, waited for, crashed and
always stopped, worker processes included."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import httpx
import pytest

from gateway.testing.configs import config_yaml
from gateway.testing.process import ProcessError, run_gateway

pytestmark = pytest.mark.slow

ADMIN_KEY = "admin-secret-from-the-environment"


def write_config(tmp_path: Path, extra: str = "", store: str = "memory") -> Path:
    path = tmp_path / "gateway.yaml"
    path.write_text(config_yaml(
        backends={"up": {"kind": "openai", "base_url": "http://127.0.0.1:9",
                         "requires_key": False}},
        models={"m": {"backend": "up"}}, store=store, extra=extra))
    return path


def running_in_group(pgid: int) -> list[int]:
    """The pids of a process group that still run (zombies left for init to reap excluded)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            state, _, group = (entry / "stat").read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, ValueError):
            continue  # not a process, or gone meanwhile
        if int(group) == pgid and state != "Z":
            found.append(int(entry.name))
    return found


@pytest.mark.redis
def test_workers_and_environment_then_the_whole_group_stops(tmp_path: Path,
                                                            redis_url: str) -> None:
    config = write_config(tmp_path, "server: {admin_key: '${PROC_TEST_ADMIN_KEY}'}",
                          store=redis_url)
    with run_gateway(config, workers=2, env={"PROC_TEST_ADMIN_KEY": ADMIN_KEY},
                     ready="/readyz") as gateway:
        reply = httpx.get(f"{gateway.url}/admin/keys",
                          headers={"authorization": f"Bearer {ADMIN_KEY}"})
        assert reply.status_code == 200  # the admin key came from `env`
        assert len(running_in_group(gateway.pid)) >= 3  # the supervisor and two workers
    deadline = time.monotonic() + 5  # a SIGKILLed process takes a moment to be gone
    while running := running_in_group(gateway.pid):
        assert time.monotonic() < deadline, running
        time.sleep(0.01)


def test_sigterm_is_a_graceful_shutdown(tmp_path: Path) -> None:
    with run_gateway(write_config(tmp_path)) as gateway:
        gateway.send_signal(signal.SIGTERM)
        gateway.proc.wait(10)
    assert "Application shutdown complete" in gateway.log()


def test_kill_is_a_crash_and_the_block_still_exits(tmp_path: Path) -> None:
    with run_gateway(write_config(tmp_path)) as gateway:
        assert httpx.get(f"{gateway.url}/healthz").status_code == 200
        assert gateway.kill() == -9
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{gateway.url}/healthz")
    assert "Shutting down" not in gateway.log()  # no shutdown code ran


def test_a_gateway_that_cannot_start_fails_at_once_with_its_log(tmp_path: Path) -> None:
    with pytest.raises(ProcessError, match="exited with status 2") as failed, \
            run_gateway(write_config(tmp_path, "models: {m: {backend: nope}}"), timeout=20):
        pass
    assert "models.m.backend: unknown backend 'nope'" in str(failed.value)
