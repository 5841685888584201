"""The benchmark's own pieces: fixed upstream bodies, gateway configs that the schema accepts,
wrk summary parsing, report verdicts, and nginx really serving the bodies (a real process)."""

from __future__ import annotations

import shutil
import urllib.request
from pathlib import Path

import orjson
import pytest

from bench.gateways import CLIENT_KEY, GatewaySpec, render_config
from bench.harness import chat_body, short_reason
from bench.probe import count_chunks, probe
from bench.processes import BenchProcessError
from bench.report import Results, Row, render, round_error, round_ratio, verdicts
from bench.upstream import Upstream, ask_body, completion_body, nginx_upstream, stream_body
from bench.wrk import WrkResult, combine, parse_summary
from gateway.config import parse_config
from gateway.ndjson import NdjsonDecoder

UP = Upstream(url="http://127.0.0.1:1", pid=0, logs=Path("/nonexistent"))


def result(rps: float, p50: float = 1.0, errors: int = 0) -> WrkResult:
    return WrkResult(requests=int(rps * 10), seconds=10.0, errors={"status": errors},
                     p50_ms=p50, p90_ms=p50, p99_ms=p50 * 2, mean_ms=p50, max_ms=p50 * 3)


def test_stream_body_is_ten_chunks_then_done() -> None:
    chunks, done = count_chunks(stream_body())
    assert (chunks, done) == (10, True)


def test_completion_body_is_a_chat_completion() -> None:
    data = orjson.loads(completion_body())
    assert data["object"] == "chat.completion"
    assert data["choices"][0]["message"]["content"]


def test_ask_body_in_nuclia_order() -> None:
    decoder = NdjsonDecoder()
    items = [orjson.loads(line)["item"]["type"] for line in decoder.feed(ask_body())]
    assert items == ["answer"] * 10 + ["retrieval", "status", "metadata"]


@pytest.mark.parametrize("spec", [
    GatewaySpec("core"), GatewaySpec("limits", limits=True),
    GatewaySpec("all-limits", all_limits=True),
    GatewaySpec("redis", all_limits=True, redis=True), GatewaySpec("cache", cache=True),
    GatewaySpec("sink", sink=True),
])
def test_every_variant_config_is_valid(spec: GatewaySpec, tmp_path: Path) -> None:
    raw = render_config(spec, UP, redis_url="redis://127.0.0.1:1/0", workdir=tmp_path)
    config = parse_config(orjson.dumps(raw).decode(), base_dir=tmp_path, env={})
    assert {"bench-json", "bench-sse", "bench-nuclia"} <= set(config.models)
    assert ("bench-cached" in config.models) is spec.cache
    assert (config.redis_url is not None) is spec.redis
    assert len(config.analytics.sinks) == (1 if spec.sink else 0)
    if spec.limits or spec.all_limits:
        team = config.teams["bench"]
        assert team.rpm and team.tpm and config.keys.static[0].rpm
        assert bool(team.models and team.daily_token_budget) is spec.all_limits


def test_unique_body_has_the_placeholder_and_is_json() -> None:
    body = chat_body("bench-json", unique=True)
    assert b"@N@" in body
    data = orjson.loads(body.replace(b"@N@", b"1"))
    assert data["temperature"] == 0 and "stream" not in data
    assert orjson.loads(chat_body("m", stream=True))["stream"] is True


def test_parse_wrk_summary() -> None:
    out = ("Running 1s test\nBENCH_JSON {\"requests\":3000,\"duration_us\":1000000,"
           "\"bytes\":9,\"errors\":{\"connect\":0,\"read\":0,\"write\":0,\"status\":2,"
           "\"timeout\":0},\"latency_us\":{\"mean\":420.5,\"max\":9000,\"p50\":400,"
           "\"p90\":600,\"p99\":1500,\"p999\":3000}}\n")
    got = parse_summary(out)
    assert got.rps == 3000 and got.p50_ms == 0.4 and got.p99_ms == 1.5
    assert got.error_count == 2
    with pytest.raises(BenchProcessError):
        parse_summary("wrk: connection refused")


def test_combine_sums_requests_and_time() -> None:
    got = combine([result(1000, 1.0), result(3000, 3.0)])
    assert got.rps == 2000 and got.p50_ms == 2.0


def test_verdicts_pass_fail_and_missing() -> None:
    res = Results()
    res.add(Row("core-json-50", "core", 50, result(3500)))
    res.add(Row("core-sse-50", "core stream", 50, result(1400)))
    res.add(Row("core-json-1", "core", 1, result(2000, p50=0.45)))
    res.add(Row("direct-json-1", "nginx", 1, result(20000, p50=0.05)))
    res.add(Row("no-cache", "no cache", 50, result(2000)))
    res.add(Row("cache-miss", "miss", 50, result(1950)))
    res.add(Row("sink", "sink", 50, result(2000, errors=3)))
    res.add(Row("no-sink", "no sink", 50, result(2000)))
    res.add(Row("cache-hit", "hit", 50, skipped="ModuleNotFoundError: gateway.response_cache"))
    res.rss_mb["core idle"] = 70.0
    by_name = {v.name.split(" >=")[0].split(" <=")[0]: v for v in verdicts(res)}
    assert by_name["core non-stream @50"].passed is True
    assert by_name["stream (10 chunks) @50"].passed is False
    assert by_name["added p50 @1"].passed is True
    assert by_name["idle RSS"].passed is True
    assert by_name["cache miss cost"].passed is True
    assert by_name["one webhook sink"].passed is None  # errors: not a valid measurement
    assert by_name["cache hit"].passed is None
    assert "ModuleNotFoundError" in by_name["cache hit"].why
    table = render(res)
    assert "3 ERRORS" in table and "PASS" in table and "FAIL" in table


def test_pair_ratio_is_the_median_of_its_rounds() -> None:
    # one round disturbed (the variant's second round ran during a burst of other load)
    base = Row("limits-memory-base", "core", 50, result(4000), rounds=(1000, 1000, 1000, 1000))
    got = Row("limits-memory", "limits", 50, result(3300), rounds=(950, 500, 940, 960))
    assert round_ratio(got, base) == pytest.approx(0.945)
    res = Results()
    res.add(base)
    res.add(got)
    verdict = next(v for v in verdicts(res) if v.name.startswith("keys+limits (memory)"))
    assert verdict.passed is True and verdict.value.startswith("94.5% (median of 4 rounds")
    # with its noise: 1.25 x the standard deviation of the round ratios / sqrt(4)
    assert round_error(got, base) == " ±14.1%" and "rounds ±14.1%;" in verdict.value
    assert round_error(Row("a", "a", 50, rounds=(1, 1)), Row("b", "b", 50, rounds=(1, 1))) == ""
    # rows without rounds (a quick run of one round each) compare their totals
    plain = Row("limits-memory", "limits", 50, result(3300))
    assert round_ratio(plain, Row("b", "core", 50, result(4000))) == pytest.approx(0.825)


def test_interleaved_figure_is_the_median_cost_with_its_error() -> None:
    from bench.interleave import summarize

    figure = summarize([1.04, 1.05, 1.06, 1.30])  # one round disturbed: the median drops it
    assert figure["cost"] == pytest.approx(0.055)
    assert figure["error"] == pytest.approx(1.2533 * figure["round_sd"] / 2)
    assert summarize([1.0, 1.1])["error"] == 0.0  # too few rounds to tell


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("wrk") is None or (shutil.which("nginx") is None
                                                    and not Path("/usr/sbin/nginx").exists()),
                    reason="wrk or nginx is not installed")
def test_interleaved_round_takes_turns_and_stops_both_loads(tmp_path: Path) -> None:
    from bench.wrk import one_round

    with nginx_upstream(tmp_path) as up:
        url = f"{up.json_base}/chat/completions"
        body = chat_body("x")
        a, b = one_round(url, f"Bearer {CLIENT_KEY}", (body, body), slices=3,
                         slice_seconds=0.1, first=1, connections=4)
    # both sides ran (and were summarised after the SIGINT), neither saw an error
    assert a.requests > 0 and b.requests > 0
    assert a.error_count == b.error_count == 0


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("wrk") is None or (shutil.which("nginx") is None
                                                    and not Path("/usr/sbin/nginx").exists()),
                    reason="wrk or nginx is not installed")
def test_interleaved_pair_records_each_round_at_its_running_time(tmp_path: Path) -> None:
    from contextlib import ExitStack

    from bench.harness import Bench, Target, Timing

    timing = Timing(seconds=1, warmup=0, rounds=3, round_seconds=1, turns=2, turn_seconds=0.2)
    results = Results()
    with nginx_upstream(tmp_path) as up, ExitStack() as stack:
        url = f"{up.json_base}/chat/completions"
        bench = Bench(timing, tmp_path, up, stack, results)
        a, b = (Target(row, row, url, chat_body(row, unique=True), server_pid=up.pid,
                       unique=True) for row in ("no-cache", "cache-miss"))
        bench.interleaved(a, b, 4)
        with pytest.raises(BenchProcessError, match="one server"):
            bench.interleaved(a, Target("x", "x", url + "?other", b.body, server_pid=0), 4)
    for row_id in ("no-cache", "cache-miss"):
        row = results.rows[row_id]
        assert row.ok and len(row.rounds) == 3 and all(rps > 0 for rps in row.rounds)
        assert row.result is not None
        assert row.result.seconds == pytest.approx(3 * 2 * 0.2)  # running, not stopped, time
        assert row.cpu is None and "over both sides" in row.notes  # one process served both
    assert "cache miss cost" in render(results)


def test_short_reason_picks_the_exception_line() -> None:
    exc = BenchProcessError("exited with status 3:\nTraceback\n  File x\n"
                            "ModuleNotFoundError: No module named 'gateway.response_cache'\n"
                            "ERROR:    Application startup failed. Exiting.")
    assert short_reason(exc) == "ModuleNotFoundError: No module named 'gateway.response_cache'"


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nginx") is None and not Path("/usr/sbin/nginx").exists(),
                    reason="nginx is not installed")
def test_nginx_serves_the_fixed_bodies(tmp_path: Path) -> None:
    auth = f"Bearer {CLIENT_KEY}"
    with nginx_upstream(tmp_path) as up:
        body = chat_body("x")
        assert probe(f"{up.json_base}/chat/completions", body, auth).note == ""
        assert probe(f"{up.sse_base}/chat/completions", body, auth).note == "10 chunks/answer"
        assert probe(f"{up.cached_base}/chat/completions", body, auth).note == ""
        request = urllib.request.Request(f"{up.nuclia_base}/kb/bench/ask", data=body,
                                         method="POST")
        with urllib.request.urlopen(request, timeout=5) as reply:
            assert reply.read() == ask_body()
            assert reply.headers["content-type"] == "application/x-ndjson"
        for path in ("/hook", "/v1/conversations"):
            request = urllib.request.Request(up.url + path, data=b"{}", method="POST")
            with urllib.request.urlopen(request, timeout=5) as reply:
                assert reply.read() == b"{}"
    assert not (tmp_path / "nginx" / "nginx.pid").exists()  # stopped


def test_cpu_window_accounts_the_server_process() -> None:
    import os
    import time

    from bench.cpu import CpuSample, cpu_window

    with cpu_window(os.getpid()) as window:
        # burn CPU in "the server" (this process) for several clock ticks (10 ms each)
        until = time.process_time() + 0.05
        while time.process_time() < until:
            pass
    assert window.sample is not None
    sample = window.sample
    assert sample.server_s > 0 and sample.wall_s > 0
    both = sample + CpuSample(1.0, 0.5, 0.1, 0.2)
    assert both.wall_s == sample.wall_s + 1.0
    assert both.us_per_request(1) == both.server_s * 1e6
