"""Instructions per request under callgrind: what each part costs, the same on any machine.

Throughput ratios on a shared 2-core VM move by ±5% between runs, and absolute req/s by 3×
between machines; valgrind's count of executed instructions for the same code and load does
not. Each variant's gateway runs under ``valgrind --tool=callgrind --instr-atstart=no`` in
front of the bench's nginx; after a warm-up, the instructions of a long and of a short wrk
load are counted (each dumped once the gateway is idle again), and their difference is
divided by the difference of the requests wrk completed.

    .venv/bin/python bench/instructions.py                # every variant, ~6 minutes
    .venv/bin/python bench/instructions.py --only limits  # repeatable

Prints instructions per request per variant and the ratios the targets are about
(keys+limits vs core, cache miss vs no cache); writes ``bench/results/instructions.json``.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.gateways import GatewaySpec, RunningGateway, gateway_process  # noqa: E402
from bench.harness import chat_body  # noqa: E402
from bench.probe import probe  # noqa: E402
from bench.processes import BenchProcessError  # noqa: E402
from bench.upstream import Upstream, nginx_upstream  # noqa: E402
from bench.variants import CACHE_MISS  # noqa: E402
from bench.wrk import Load, run_wrk  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "instructions.json"
_TOTALS = re.compile(r"^(?:summary|totals):\s+(\d+)", re.MULTILINE)


@dataclass(frozen=True)
class Window:
    """One counted load: which model, which key, unique bodies or one."""

    name: str
    model: str
    unique: bool = False


# variant -> (gateway, the loads counted on it, in order)
VARIANTS: dict[str, tuple[GatewaySpec, tuple[Window, ...]]] = {
    "core": (GatewaySpec("core"), (Window("core", "bench-json"),)),
    "limits": (GatewaySpec("limits-memory", limits=True, created_key=True),
               (Window("keys+limits (memory)", "bench-json"),)),
    "limits-all": (GatewaySpec("limits-memory-all", all_limits=True, created_key=True),
                   (Window("all limit types (memory)", "bench-json"),)),
    "limits-redis": (GatewaySpec("limits-redis", all_limits=True, redis=True, created_key=True),
                     (Window("keys+limits (redis)", "bench-json"),)),
    "cache-hit": (GatewaySpec("cache-hit", cache=True), (Window("cache hit", "bench-cached"),)),
    "cache-miss": (CACHE_MISS,
                   (Window("no cache (unique bodies)", "bench-json", unique=True),
                    Window("cache miss (unique bodies)", "bench-cached", unique=True))),
    # the mirror's whole cost: accepting the record, the outbox, delivery in batches of 64
    "sink": (GatewaySpec("sink", sink=True, sink_batch=64),
             (Window("one webhook sink (batch 64)", "bench-json"),)),
}
RATIOS = (("keys+limits (memory)", "core"), ("all limit types (memory)", "core"),
          ("cache miss (unique bodies)", "no cache (unique bodies)"),
          ("one webhook sink (batch 64)", "core"))


def callgrind_control(*args: str) -> None:
    subprocess.run(["callgrind_control", *args], check=True, capture_output=True, timeout=120)


def dump(pid: int, out: Path) -> int:
    """Dump the counts since the last dump (or since counting started) and return their
    total: callgrind writes ``<out>.<n>``, numbered from 1."""
    before = {p.name for p in out.parent.glob(out.name + ".*")}
    callgrind_control("--dump", str(pid))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for path in out.parent.glob(out.name + ".*"):
            if path.name in before:
                continue
            found = _TOTALS.search(path.read_text(errors="replace"))
            if found:  # the totals line is written last
                print(f"  {path}: {int(found.group(1)):,}", flush=True)
                return int(found.group(1))
        time.sleep(0.5)
    raise BenchProcessError(f"callgrind wrote no dump next to {out}")


@contextmanager
def counted_gateway(spec: GatewaySpec, upstream: Upstream, workdir: Path,
                    redis_url: str | None) -> Iterator[tuple[RunningGateway, Path]]:
    out = workdir / f"callgrind-{spec.name}.out"
    wrapper = ["valgrind", "--tool=callgrind", "--instr-atstart=no",
               f"--callgrind-out-file={out}"]
    with gateway_process(spec, upstream, redis_url=redis_url, workdir=workdir,
                         wrapper=wrapper, start_timeout=300) as running:
        yield running, out


def count(running: RunningGateway, out: Path, window: Window, connections: int,
          seconds: int, warmup: int, idle: int) -> tuple[float, int]:
    """(instructions, requests) of one window, as the difference between a long and a short
    load: the requests cut off when wrk stops (counted in the instructions, not in the
    requests) are the same in both and cancel out. What the idle gateway runs in the same
    time (timers: the outbox writer, pub/sub polls, flushes) is taken off each load: under
    valgrind a request takes ~30x longer, so per-second work would weigh ~30x more."""
    body = chat_body(window.model, unique=window.unique)
    auth = running.authorization
    seen = probe(running.chat_url, body, auth)
    if seen.status != 200:
        raise BenchProcessError(f"{window.name}: probe answered {seen.status}")
    load = Load(url=running.chat_url, body=body, authorization=auth, connections=connections,
                seconds=warmup, unique=window.unique)
    run_wrk(load)
    time.sleep(2)  # the warm-up's cut-off requests finish before counting starts
    # counting stays on once started: a dump after switching it off and on again reports
    # a wrapped-around total (valgrind 3.19); a dump zeroes the counts instead
    callgrind_control("--instr=on", str(running.pid))
    dump(running.pid, out)
    started = time.monotonic()
    time.sleep(idle)
    idle_rate = dump(running.pid, out) / (time.monotonic() - started)
    loads = []
    for length in (max(1, seconds // 3), seconds):
        started = time.monotonic()
        result = run_wrk(Load(**{**load.__dict__, "seconds": length}))
        time.sleep(2)  # requests cut off by wrk's stop finish inside the window
        total = dump(running.pid, out)
        if result.error_count:
            raise BenchProcessError(f"{window.name}: wrk saw errors {result.errors}")
        loads.append((total - idle_rate * (time.monotonic() - started), result.requests))
    (short, short_requests), (long, long_requests) = loads
    return long - short, long_requests - short_requests


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--only", action="append", choices=list(VARIANTS), metavar="NAME",
                        help=f"run only this variant (repeatable): {', '.join(VARIANTS)}")
    parser.add_argument("--seconds", type=int, default=45,
                        help="the long counted load of each window (the short one is a third)")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--idle", type=int, default=10,
                        help="seconds of idle counting before each window")
    parser.add_argument("--keep", action="store_true",
                        help="keep the work folder (callgrind dumps: callgrind_annotate them)")
    args = parser.parse_args(argv)
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        print("error: valgrind is not installed (apt-get install valgrind)", file=sys.stderr)
        return 2
    selected = [v for v in VARIANTS if not args.only or v in args.only]
    figures: dict[str, dict[str, float]] = {}
    workdir = Path(tempfile.mkdtemp(prefix="gw-instr-"))
    with ExitStack() as stack:
        if not args.keep:
            stack.callback(shutil.rmtree, workdir, ignore_errors=True)
        else:
            print(f"work folder: {workdir}")
        upstream = stack.enter_context(nginx_upstream(workdir))
        redis_url = None
        for name in selected:
            spec, windows = VARIANTS[name]
            if spec.redis and redis_url is None:
                from gateway.testing.redis_server import redis_server

                redis_url = stack.enter_context(redis_server()).url
            with counted_gateway(spec, upstream, workdir, redis_url) as (running, out):
                for window in windows:
                    instructions, requests = count(running, out, window, args.connections,
                                                   args.seconds, warmup=8, idle=args.idle)
                    per = instructions / max(requests, 1)
                    figures[window.name] = {"instructions": round(instructions),
                                            "requests": requests, "per_request": round(per)}
                    print(f"{window.name:<30} {per:>12,.0f} instructions/request "
                          f"({requests:,} requests)", flush=True)
    print()
    for variant, base in RATIOS:
        if variant in figures and base in figures:
            a, b = figures[variant]["per_request"], figures[base]["per_request"]
            print(f"{variant} vs {base}: {a - b:+,.0f} instructions/request, "
                  f"throughput ratio {b / a:.1%} (cost {a / b - 1:+.1%})")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({"connections": args.connections, "seconds": args.seconds,
                                   "figures": figures}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
