"""Drive load with wrk (one thread: this machine has two cores) and read back its summary;
two loads taking turns on one server (`one_round`, for interleaved pairs).

The Lua script (``bench/chat.lua``) POSTs the chat body with the client's key and prints one
``BENCH_JSON {...}`` line from wrk's ``done()`` hook: requests, duration, errors and latency
percentiles in microseconds.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from bench.processes import BenchProcessError

SCRIPT = Path(__file__).with_name("chat.lua")
_MARK = "BENCH_JSON "


@dataclass(frozen=True)
class Load:
    """One wrk invocation."""

    url: str
    body: bytes
    authorization: str
    connections: int
    seconds: int
    unique: bool = False  # "@N@" in the body becomes a per-request counter


@dataclass(frozen=True)
class WrkResult:
    requests: int
    seconds: float
    errors: dict[str, int]
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    max_ms: float

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    def as_dict(self) -> dict[str, Any]:
        return {"requests": self.requests, "seconds": round(self.seconds, 3),
                "rps": round(self.rps, 1), "p50_ms": self.p50_ms, "p90_ms": self.p90_ms,
                "p99_ms": self.p99_ms, "mean_ms": self.mean_ms, "max_ms": self.max_ms,
                "errors": self.errors}


def wrk_binary() -> str:
    binary = shutil.which("wrk")
    if binary is None:
        raise BenchProcessError("wrk is not installed (`make bench` installs it)")
    return binary


def wrk_version() -> str:
    done = subprocess.run([wrk_binary(), "--version"], capture_output=True, text=True,
                          check=False)
    return (done.stdout or done.stderr).splitlines()[0].strip() if (done.stdout or done.stderr) \
        else "unknown"


def parse_summary(output: str) -> WrkResult:
    """The `WrkResult` in wrk's output (the ``BENCH_JSON`` line printed by ``done()``)."""
    for line in output.splitlines():
        if line.startswith(_MARK):
            data = orjson.loads(line[len(_MARK):])
            lat = data["latency_us"]
            return WrkResult(
                requests=int(data["requests"]), seconds=data["duration_us"] / 1e6,
                errors={k: int(v) for k, v in data["errors"].items()},
                p50_ms=lat["p50"] / 1000, p90_ms=lat["p90"] / 1000, p99_ms=lat["p99"] / 1000,
                mean_ms=round(lat["mean"] / 1000, 3), max_ms=lat["max"] / 1000,
            )
    raise BenchProcessError(f"wrk printed no summary:\n{output[-2000:]}")


def wrk_command(load: Load) -> tuple[list[str], dict[str, str]]:
    """The argv (``-t1``) and environment of a wrk run of `load` with ``chat.lua``."""
    env = dict(os.environ)
    env.update(BENCH_BODY=load.body.decode(), BENCH_AUTH=load.authorization,
               BENCH_UNIQUE="1" if load.unique else "0", BENCH_RUN=uuid.uuid4().hex[:12])
    argv = [wrk_binary(), "-t1", f"-c{load.connections}", f"-d{load.seconds}s",
            "--timeout", "10s", "-s", str(SCRIPT), load.url]
    return argv, env


def run_wrk(load: Load) -> WrkResult:
    """Run wrk once and return its summary."""
    argv, env = wrk_command(load)
    done = subprocess.run(argv, capture_output=True, text=True, env=env, check=False,
                          timeout=load.seconds + 60)
    if done.returncode != 0:
        raise BenchProcessError(f"wrk failed ({done.returncode}): {done.stderr.strip()}")
    return parse_summary(done.stdout)


def combine(results: list[WrkResult]) -> WrkResult:
    """Several runs of the same load as one: summed requests and time, mean percentiles."""
    if len(results) == 1:
        return results[0]
    n = len(results)
    errors: dict[str, int] = {}
    for result in results:
        for key, value in result.errors.items():
            errors[key] = errors.get(key, 0) + value
    return WrkResult(
        requests=sum(r.requests for r in results), seconds=sum(r.seconds for r in results),
        errors=errors, p50_ms=round(sum(r.p50_ms for r in results) / n, 3),
        p90_ms=round(sum(r.p90_ms for r in results) / n, 3),
        p99_ms=round(sum(r.p99_ms for r in results) / n, 3),
        mean_ms=round(sum(r.mean_ms for r in results) / n, 3),
        max_ms=max(r.max_ms for r in results),
    )


# -- turns: two loads alternating on one server (bench/interleave.py, Bench.interleaved) ----

def start_wrk(url: str, body: bytes, authorization: str, connections: int
              ) -> subprocess.Popen[str]:
    """A wrk run of unique bodies that lasts until it is interrupted (`stop_wrk`), stopped
    at once."""
    argv, env = wrk_command(Load(url=url, body=body, authorization=authorization,
                                 connections=connections, seconds=3600, unique=True))
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, text=True)
    os.kill(proc.pid, signal.SIGSTOP)
    return proc


def stop_wrk(procs: Sequence[subprocess.Popen[str]]) -> list[WrkResult]:
    """Interrupt stopped wrk runs together and read their summaries. A SIGINT may reach wrk's
    worker thread (which then stops) instead of its main thread (asleep for ``-d``): it is
    repeated until the process is gone."""
    for proc in procs:
        os.kill(proc.pid, signal.SIGINT)
    for proc in procs:
        os.kill(proc.pid, signal.SIGCONT)
    deadline = time.monotonic() + 30
    while any(p.poll() is None for p in procs):
        if time.monotonic() > deadline:
            for proc in procs:
                proc.kill()
            raise BenchProcessError("wrk did not stop on SIGINT")
        time.sleep(0.2)
        for proc in procs:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGINT)
    return [parse_summary(proc.communicate(timeout=30)[0]) for proc in procs]


def one_round(url: str, authorization: str, bodies: tuple[bytes, bytes], *,
              slices: int, slice_seconds: float, first: int, connections: int
              ) -> tuple[WrkResult, WrkResult]:
    """`slices` turns of `slice_seconds` for each side, alternating, `first` side first."""
    procs = [start_wrk(url, body, authorization, connections) for body in bodies]
    try:
        for turn in range(2 * slices):
            proc = procs[(turn + first) % 2]
            os.kill(proc.pid, signal.SIGCONT)
            time.sleep(slice_seconds)
            os.kill(proc.pid, signal.SIGSTOP)
        a, b = stop_wrk(procs)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for side, result in (("A", a), ("B", b)):
        if result.error_count:
            raise BenchProcessError(f"side {side}: wrk saw errors {result.errors}")
    return a, b
