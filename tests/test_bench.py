"""The benchmark's parts (bodies, configs, wrk's summary, budgets), one tiny real run with
nginx, wrk and a gateway, and one instruction count under callgrind; wrk, nginx and valgrind
are installed by `make test`, never skipped."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest

from bench import instructions
from bench.budgets import UNITS, parse_budget, read_budgets, verdict
from bench.measure import Server, chat_body, check_reply, parse_wrk
from bench.run import VARIANTS, gateway_yaml, run, table
from bench.upstream import Upstream, ask_body, completion_body, nginx, stream_body
from gateway.config import parse_config
from gateway.ndjson import NdjsonDecoder

REPO = Path(__file__).resolve().parent.parent


def test_upstream_bodies() -> None:
    assert orjson.loads(completion_body())["object"] == "chat.completion"
    events = stream_body().split(b"\n\n")
    assert sum(b"chat.completion.chunk" in e for e in events) == 10
    assert events[-2:] == [b"data: [DONE]", b""]
    items = [orjson.loads(line)["item"]["type"] for line in NdjsonDecoder().feed(ask_body())]
    assert items == ["answer"] * 10 + ["retrieval", "status", "metadata"]


@pytest.mark.parametrize("kind", ["core", "redis", "cache"])
def test_every_gateway_config_is_valid(kind: str, tmp_path: Path) -> None:
    upstream = Upstream("http://127.0.0.1:1", 0, tmp_path)
    redis_url = "redis://127.0.0.1:1/0" if kind == "redis" else None
    config = parse_config(gateway_yaml(upstream, kind, redis_url), env={})
    assert {"bench-json", "bench-sse", "bench-nuclia"} <= set(config.models)
    assert ("bench-cached" in config.models) is (kind == "cache")
    assert config.redis_url == redis_url
    assert bool(config.teams and config.teams["bench"].models) is (kind == "redis")
    assert config.backends["json"].base_url == "http://127.0.0.1:1/json/v1"


def test_parse_wrk_summary() -> None:
    got = parse_wrk("Running 1s test\nBENCH_JSON {\"requests\":3000,\"duration_us\":2000000,"
                    "\"non_2xx\":2,\"socket_errors\":1,\"p50_us\":400,\"p99_us\":1500}\n")
    assert (got.rps, got.p50_ms, got.p99_ms, got.errors) == (1500, 0.4, 1.5, 3)
    with pytest.raises(RuntimeError, match="no summary"):
        parse_wrk("unable to connect to 127.0.0.1:1 Connection refused")


def test_budgets_come_from_the_readme_for_every_row() -> None:
    budgets = read_budgets()
    assert set(budgets) == {v.name for v in VARIANTS} | {"idle"}
    assert budgets["nginx-1"] == []  # the floor: measured, not judged
    assert [b.unit for b in budgets["core-50"]] == ["req/s", "µs CPU/req"]
    assert all(b.unit in UNITS for row in budgets.values() for b in row)


def test_budget_syntax() -> None:
    both = parse_budget("≥ 3,000 req/s; ≤ 0.5 ms added p50")
    assert [(b.op, b.limit, b.unit) for b in both] == [("≥", 3000, "req/s"),
                                                        ("≤", 0.5, "ms added p50")]
    assert parse_budget(" — ") == []
    with pytest.raises(ValueError, match="cannot read the budget"):
        parse_budget("≥ 3,000 requests")


def test_verdicts() -> None:
    floor = parse_budget("≥ 3,000 req/s; ≤ 400 µs CPU/req")
    assert verdict({"req/s": 3500, "µs CPU/req": 228}, [], floor) == "PASS"
    assert verdict({"req/s": 2900, "µs CPU/req": 228}, [], floor) == \
        "FAIL: 2,900 req/s, budget ≥ 3,000"
    assert verdict({"req/s": 3500}, [], floor) == "FAIL: no µs CPU/req measured"
    assert verdict({"req/s": 3500, "µs CPU/req": 228}, ["3 wrk errors"], floor) == \
        "FAIL: 3 wrk errors"
    assert verdict({"req/s": 10}, [], []) == "-"


@pytest.mark.slow
def test_nginx_serves_the_bodies_and_the_probe_rejects_a_wrong_reply(tmp_path: Path) -> None:
    with nginx(tmp_path) as upstream:
        json_url, sse_url = (f"{upstream.url}/{path}/v1/chat/completions"
                             for path in ("json", "sse"))
        check_reply(Server(json_url, "", upstream.pid), chat_body("m", stream=False),
                    stream=False)
        check_reply(Server(sse_url, "", upstream.pid), chat_body("m", stream=True), stream=True)
        with pytest.raises(RuntimeError, match="probe: 0 chunks"):
            check_reply(Server(json_url, "", upstream.pid), b"{}", stream=True)
        with pytest.raises(RuntimeError, match="x-gateway-cache: None"):
            check_reply(Server(json_url, "", upstream.pid), b"{}", stream=False, cache_hit=True)
        assert upstream.cached_calls() == 0
    assert not (tmp_path / "nginx" / "nginx.pid").exists()  # stopped


@pytest.mark.slow
def test_a_tiny_real_run_through_nginx_wrk_and_a_gateway(tmp_path: Path) -> None:
    variants = [v for v in VARIANTS if v.name in ("nginx-1", "core-1")]
    rows = run(variants, tmp_path, warmup=0, seconds=1)
    assert [row.name for row in rows] == ["nginx-1", "idle", "core-1"]
    assert all(row.problems == [] for row in rows), rows
    core = rows[2].figures
    assert core["req/s"] > 0 and core["µs CPU/req"] > 0 and core["MB RSS"] > 20
    assert core["ms added p50"] == pytest.approx(core["ms p50"] - rows[0].figures["ms p50"])
    printed = table(rows, {"nginx-1": "-", "idle": "PASS", "core-1": "PASS"})
    assert printed.splitlines()[0].split()[:3] == ["row", "conns", "req/s"]
    assert "core-1" in printed and "ms added p50" in printed


@pytest.mark.slow
@pytest.mark.timeout(300)  # under valgrind: start-up a few times slower, counting 50 times
def test_instructions_per_streamed_request_are_counted(tmp_path: Path) -> None:
    per_request = instructions.count(tmp_path, requests=20, warmup=5, stream=True)
    # a streamed request is over a million instructions; had counting begun at the start,
    # the imports alone would make it hundreds of millions per request
    assert 300_000 < per_request < 10_000_000


@pytest.mark.slow
def test_sigterm_stops_every_process(tmp_path: Path) -> None:
    bench = subprocess.Popen(
        [sys.executable, "bench/run.py", "--only", "core-50"], cwd=REPO,
        stderr=subprocess.PIPE, text=True, env={**os.environ, "TMPDIR": str(tmp_path)})
    assert bench.stderr is not None
    assert "core-50" in bench.stderr.readline()  # nginx and the gateway are up: loading
    bench.send_signal(signal.SIGTERM)
    assert bench.wait(20) == 130
    bench.stderr.close()
    deadline = time.monotonic() + 5  # a SIGKILLed process takes a moment to be gone
    while left := [pid for pid, cmd in command_lines() if str(tmp_path) in cmd]:
        assert time.monotonic() < deadline, left
        time.sleep(0.01)


def command_lines() -> list[tuple[int, str]]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            found.append((int(entry.name), (entry / "cmdline").read_text(errors="replace")))
        except (ValueError, OSError):
            continue  # not a process, or gone meanwhile
    return found
