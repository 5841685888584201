"""One row of the benchmark: a request to check the reply, a warm-up, then the load from wrk
(compiled, one thread: on two cores a Python client would measure itself) while the server's
CPU time is read from /proc, and its memory after."""

from __future__ import annotations

import os
import shutil
import subprocess
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from bench.upstream import CHUNKS

SCRIPT = Path(__file__).with_name("chat.lua")
MARK = "BENCH_JSON "


@dataclass(frozen=True)
class Server:
    """Where a row's load goes, and the process doing the work (gateway, or nginx)."""

    url: str  # its chat completions URL
    authorization: str
    pid: int
    metrics_url: str = ""  # a gateway's /metrics


@dataclass
class Row:
    name: str
    connections: int
    figures: dict[str, float] = field(default_factory=dict)  # by `budgets.UNITS`
    problems: list[str] = field(default_factory=list)  # it fails whatever its figures say


def chat_body(model: str, *, stream: bool) -> bytes:
    return orjson.dumps({"model": model, "temperature": 0, "stream": stream, "messages": [
        {"role": "system", "content": "You answer benchmark questions."},
        {"role": "user", "content": "How fast is the gateway?"}]})


@dataclass(frozen=True)
class WrkResult:
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    errors: int  # socket errors and non-2xx replies

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


def parse_wrk(output: str) -> WrkResult:
    """The summary line that ``chat.lua``'s ``done()`` printed."""
    for line in output.splitlines():
        if line.startswith(MARK):
            got = orjson.loads(line[len(MARK):])
            return WrkResult(got["requests"], got["duration_us"] / 1e6, got["p50_us"] / 1000,
                             got["p99_us"] / 1000, got["non_2xx"] + got["socket_errors"])
    raise RuntimeError(f"wrk printed no summary:\n{output[-2000:]}")


def run_wrk(server: Server, body: bytes, connections: int, seconds: int) -> WrkResult:
    wrk = shutil.which("wrk")
    if wrk is None:
        raise RuntimeError("wrk is not installed (`make bench` installs it)")
    env = {**os.environ, "BENCH_BODY": body.decode(), "BENCH_AUTH": server.authorization}
    argv = [wrk, "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "10s",
            "-s", str(SCRIPT), server.url]
    done = subprocess.run(argv, capture_output=True, text=True, env=env,
                          timeout=seconds + 60, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr.strip()}")
    return parse_wrk(done.stdout)


def _proc(pid: int, name: str) -> list[str]:
    """/proc/<pid>/<name> of `pid` and of its children (nginx's worker)."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [Path(f"/proc/{each}/{name}").read_text() for each in [pid, *children]]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time so far (fields 14 and 15 of stat, counted after "(name) ")."""
    fields = [stat[stat.rindex(")") + 2:].split() for stat in _proc(pid, "stat")]
    return sum(int(f[11]) + int(f[12]) for f in fields) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    kib = [int(line.split()[1]) for status in _proc(pid, "status")
           for line in status.splitlines() if line.startswith("VmRSS:")]
    return sum(kib) * 1024 / 1e6


def check_answer(data: bytes, *, stream: bool) -> None:
    """Raise unless `data` is a chat.completion, or a stream of the upstream's chunks (at
    least) ending in [DONE]."""
    if stream:
        events = [line for line in data.splitlines() if line.startswith(b"data:")]
        chunks = sum(b"chat.completion.chunk" in line for line in events)
        if chunks < CHUNKS or events[-1] != b"data: [DONE]":
            raise RuntimeError(f"probe: {chunks} chunks, last line {events[-1:]!r}")
    elif orjson.loads(data).get("object") != "chat.completion":
        raise RuntimeError(f"probe: not a chat.completion: {data[:200]!r}")


def check_reply(server: Server, body: bytes, *, stream: bool, cache_hit: bool = False) -> None:
    """POST `body` once; raise if the reply is not what the row claims to measure: a 200 with
    a chat.completion, or a stream of the upstream's chunks (at least) ending in [DONE]."""
    request = urllib.request.Request(server.url, data=body, method="POST", headers={
        "content-type": "application/json", "authorization": server.authorization})
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            data, headers = reply.read(), reply.headers
    except urllib.error.HTTPError as exc:
        raise RuntimeError(f"probe: HTTP {exc.code} {exc.read()[:200]!r}") from exc
    check_answer(data, stream=stream)
    if cache_hit and headers.get("x-gateway-cache") != "hit":
        raise RuntimeError(f"probe: x-gateway-cache: {headers.get('x-gateway-cache')}")


def measure(row: Row, server: Server, body: bytes, *, warmup: int, seconds: int) -> None:
    """Load `server` with `body`: a warm-up of `warmup` seconds, then the measured run."""
    if warmup:
        run_wrk(server, body, row.connections, warmup)
    before = cpu_seconds(server.pid)
    got = run_wrk(server, body, row.connections, seconds)
    cpu = cpu_seconds(server.pid) - before
    row.figures.update({"req/s": got.rps, "ms p50": got.p50_ms, "ms p99": got.p99_ms,
                        "MB RSS": rss_mb(server.pid)})
    if got.requests:
        row.figures["µs CPU/req"] = cpu / got.requests * 1e6
    if got.errors or not got.requests:
        row.problems.append(f"{got.errors:,} wrk errors or non-2xx of {got.requests:,}")
