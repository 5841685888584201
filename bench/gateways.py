"""Gateways under test: one YAML config per variant, served by ``python -m gateway serve`` as a
subprocess (one worker) on a free port.

Every config routes the same models to the fake upstream: ``bench-json`` (whole answers),
``bench-sse`` (streams), ``bench-nuclia`` (Nuclia ``/ask`` ndjson), plus ``bench-cached``
(the JSON body on a logged path, with the response cache on) when the variant enables the cache.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from bench.processes import BenchProcessError, free_port, read_rss_mb, spawn, stop, wait_http
from bench.upstream import KBID, Upstream

REPO = Path(__file__).resolve().parent.parent
CLIENT_KEY = "sk-bench-client-key-0123456789abcdef"
TEAM = "bench"
# generous: the limiter runs on every request but never refuses
HUGE = 1_000_000_000


@dataclass(frozen=True)
class GatewaySpec:
    """What one gateway process has switched on."""

    name: str
    # key rpm/tpm/concurrency and team rpm/tpm (the limits of the key-management issue),
    # all never reached
    limits: bool = False
    # and every other limit type too: team per-model rpm/tpm, daily and monthly token budgets
    all_limits: bool = False
    redis: bool = False  # store on the throw-away redis-server instead of in-process
    cache: bool = False  # add the ``bench-cached`` model with the response cache on
    # the in-process cache's memory bound (None: the default); a small one is full after
    # the warm-up, as a long-running gateway's is: every further miss also evicts
    cache_bytes: int | None = None
    sink: bool = False  # one webhook analytics sink (nginx ``/hook``)
    sink_batch: int = 1  # the sink's ``batch``: records per POST
    # the client uses a key made by ``gateway keys create`` in the variant's key store (the
    # key file, or Redis) instead of the static key of the config
    created_key: bool = False


def render_config(spec: GatewaySpec, upstream: Upstream, *, redis_url: str | None,
                  workdir: Path) -> dict[str, Any]:
    """The gateway config (as a mapping) for one variant."""
    backends: dict[str, Any] = {
        "json": {"kind": "openai", "base_url": upstream.json_base, "requires_key": False},
        "cached": {"kind": "openai", "base_url": upstream.cached_base, "requires_key": False},
        "sse": {"kind": "openai", "base_url": upstream.sse_base, "requires_key": False},
        "nuclia": {"kind": "nuclia", "base_url": upstream.nuclia_base, "kbid": KBID,
                   "requires_key": False},
    }
    models: dict[str, Any] = {
        "bench-json": {"backend": "json", "upstream_model": "bench-upstream"},
        "bench-sse": {"backend": "sse", "upstream_model": "bench-upstream"},
        "bench-nuclia": {"backend": "nuclia"},
    }
    if spec.cache:
        models["bench-cached"] = {"backend": "cached", "upstream_model": "bench-upstream",
                                  "cache": {"enabled": True, "ttl": 3600}}
    key: dict[str, Any] = {"id": "bench", "team": TEAM,
                           "sha256": hashlib.sha256(CLIENT_KEY.encode()).hexdigest()}
    config: dict[str, Any] = {
        "server": {"log_json": True},
        "store": "memory",
        "backends": backends,
        "models": models,
        "keys": {"static": [key]},
        "analytics": {"outbox": {"spool_dir": str(workdir / "outbox")}},
    }
    if spec.cache_bytes is not None:
        config["cache"] = {"memory_max_bytes": spec.cache_bytes}
    if spec.redis:
        if redis_url is None:
            raise ValueError(f"{spec.name}: needs a redis-server")
        config["store"] = redis_url
        config["store_prefix"] = f"bench-{spec.name}"
    if spec.limits or spec.all_limits:
        key.update(rpm=HUGE, tpm=HUGE, max_concurrent=100_000)
        team: dict[str, Any] = {"rpm": HUGE, "tpm": HUGE}
        if spec.all_limits:
            team.update(daily_token_budget=HUGE * 1000, monthly_token_budget=HUGE * 1000,
                        models={name: {"rpm": HUGE, "tpm": HUGE} for name in models})
        config["teams"] = {TEAM: team}
        config["limits"] = {"key_rpm": HUGE, "key_tpm": HUGE, "key_max_concurrent": 100_000}
    if spec.sink:
        config["analytics"]["sinks"] = [{"name": "hook", "kind": "webhook",
                                         "url": upstream.hook, "timeout": 5,
                                         "batch": spec.sink_batch}]
    return config


@dataclass(frozen=True)
class RunningGateway:
    spec: GatewaySpec
    url: str
    pid: int
    log: Path
    authorization: str  # the client's Authorization header value

    @property
    def chat_url(self) -> str:
        return f"{self.url}/v1/chat/completions"

    def rss_mb(self) -> float:
        return read_rss_mb(self.pid)


def gateway_env() -> dict[str, str]:
    env = dict(os.environ)
    # the config decides the store; never let the caller's environment switch it
    env.pop("GATEWAY_REDIS_URL", None)
    env.pop("GATEWAY_CONFIG", None)
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    return env


def create_key(config: Path) -> str:
    """A key with never-reached limits, made by ``gateway keys create`` in the config's store."""
    argv = [sys.executable, "-m", "gateway", "keys", "create", "--team", TEAM, "--name",
            "bench", "--rpm", str(HUGE), "--tpm", str(HUGE), "--max-concurrent", "100000",
            "--config", str(config)]
    done = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, env=gateway_env(),
                          timeout=60, check=False)
    lines = done.stdout.split()
    if done.returncode != 0 or not lines:
        reason = (done.stderr.strip().splitlines() or ["no key printed"])[-1]
        raise BenchProcessError(f"gateway keys create failed ({done.returncode}): {reason}")
    return lines[0]


@contextmanager
def gateway_process(spec: GatewaySpec, upstream: Upstream, *, redis_url: str | None,
                    workdir: Path, wrapper: Sequence[str] = (),
                    start_timeout: float = 30) -> Iterator[RunningGateway]:
    """Serve one variant until the block exits (then TERM, and KILL if it lingers).
    `wrapper` goes before the command (``valgrind --tool=callgrind ...``)."""
    home = workdir / f"gateway-{spec.name}"
    home.mkdir(parents=True, exist_ok=True)
    config = home / "gateway.yaml"
    config.write_text(yaml.safe_dump(
        render_config(spec, upstream, redis_url=redis_url, workdir=home), sort_keys=False))
    key = create_key(config) if spec.created_key else CLIENT_KEY
    port = free_port()
    log = home / "gateway.log"
    proc: subprocess.Popen[bytes] = spawn(
        [*wrapper, sys.executable, "-m", "gateway", "serve", "--config", str(config),
         "--port", str(port)],
        log=log, cwd=REPO, env=gateway_env(),
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/healthz", proc, log, timeout=start_timeout)
        yield RunningGateway(spec=spec, url=url, pid=proc.pid, log=log,
                             authorization=f"Bearer {key}")
    finally:
        stop(proc, grace=10)
