"""``make bench`` (see bench/README.md): the rows, the server each one loads (nginx, or a
``core``, ``redis`` or ``cache`` gateway in front of it), and the table of their figures
against the README's budgets, also written to ``bench/results/last.json``."""

from __future__ import annotations

import argparse
import itertools
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as bench/run.py

from bench.budgets import UNITS, read_budgets, show, verdict  # noqa: E402
from bench.measure import Row, Server, chat_body, check_reply, measure, rss_mb  # noqa: E402
from bench.upstream import Upstream, nginx  # noqa: E402
from gateway.testing.configs import config_yaml, static_key  # noqa: E402
from gateway.testing.process import gateway_env, run_gateway  # noqa: E402
from gateway.testing.redis_server import redis_server  # noqa: E402

RESULTS = Path(__file__).with_name("results") / "last.json"
CLIENT_KEY = "sk-bench-client-key-0123456789abcdef"
TEAM = "bench"
HUGE = 10**9  # limits checked on every request, never reached


@dataclass(frozen=True)
class Variant:
    name: str  # its row, as in the README's table and `--only`
    server: str  # "nginx" (direct), or the kind of gateway: "core", "redis", "cache"
    model: str
    connections: int
    stream: bool = False


VARIANTS = (
    Variant("nginx-1", "nginx", "bench-json", 1),
    Variant("core-1", "core", "bench-json", 1),
    Variant("core-50", "core", "bench-json", 50),
    Variant("stream-50", "core", "bench-sse", 50, stream=True),
    Variant("nuclia-50", "core", "bench-nuclia", 50, stream=True),
    Variant("limits-redis-50", "redis", "bench-json", 50),
    Variant("cache-hit-50", "cache", "bench-cached", 50),
)


def gateway_yaml(upstream: Upstream, kind: str, redis_url: str | None = None) -> str:
    """The config of one kind of gateway; each kind routes the same models to nginx."""
    def openai(path: str) -> dict[str, Any]:
        return {"kind": "openai", "base_url": f"{upstream.url}/{path}/v1", "requires_key": False}

    backends = {"json": openai("json"), "sse": openai("sse"),
                "nuclia": {"kind": "nuclia", "base_url": f"{upstream.url}/api/v1",
                           "kbid": "bench", "requires_key": False}}
    models: dict[str, Any] = {"bench-json": {"backend": "json"}, "bench-sse": {"backend": "sse"},
                              "bench-nuclia": {"backend": "nuclia"}}
    extra: dict[str, Any] = {}
    if kind == "cache":
        backends["cached"] = openai("cached")
        models["bench-cached"] = {"backend": "cached", "cache": {"enabled": True, "ttl": 3600}}
    if kind == "redis":
        limits = {"rpm": HUGE, "tpm": HUGE}
        extra = {"store_prefix": "bench", "teams": {TEAM: {
            **limits, "daily_token_budget": HUGE, "monthly_token_budget": HUGE,
            "models": dict.fromkeys(models, limits)}}}
    return config_yaml(backends=backends, models=models, store=redis_url or "memory",
                       keys=[static_key(CLIENT_KEY, id="bench", team=TEAM)], extra=extra)


def create_key(config: Path) -> str:
    """A key with rpm, tpm and concurrency limits, made in the config's store."""
    done = subprocess.run(
        [sys.executable, "-m", "gateway", "keys", "create", "--config", str(config), "--team",
         TEAM, "--rpm", str(HUGE), "--tpm", str(HUGE), "--max-concurrent", "100000"],
        capture_output=True, text=True, env=gateway_env(), timeout=60, check=False)
    if done.returncode != 0 or not done.stdout.split():
        raise RuntimeError(f"gateway keys create failed: {done.stderr.strip()[-300:]}")
    return done.stdout.split()[0]


@contextmanager
def serving(kind: str, upstream: Upstream, workdir: Path) -> Iterator[Server]:
    """nginx (`kind` "nginx"), or a gateway of that kind until the block exits."""
    if kind == "nginx":
        yield Server(f"{upstream.url}/json/v1/chat/completions", "", upstream.pid)
        return
    with ExitStack() as stack:
        redis_url = stack.enter_context(redis_server()).url if kind == "redis" else None
        config = workdir / kind / "gateway.yaml"
        config.parent.mkdir()
        config.write_text(gateway_yaml(upstream, kind, redis_url))
        key = create_key(config) if redis_url else CLIENT_KEY
        gateway = stack.enter_context(run_gateway(config))
        yield Server(f"{gateway.url}/v1/chat/completions", f"Bearer {key}", gateway.pid,
                     f"{gateway.url}/metrics")


def fallbacks(server: Server) -> int:
    """Limit checks that fell back from the store to the in-process limiter."""
    with urllib.request.urlopen(server.metrics_url, timeout=10) as reply:
        lines = reply.read().decode().splitlines()
    return sum(int(float(line.split()[-1])) for line in lines
               if line.startswith("gateway_store_unavailable_total"))


def run_variant(variant: Variant, server: Server, upstream: Upstream, *, warmup: int,
                seconds: int) -> Row:
    row = Row(variant.name, variant.connections)
    body = chat_body(variant.model, stream=variant.stream)
    cached = variant.server == "cache"
    try:
        if cached:
            check_reply(server, body, stream=False)  # the miss that fills the cache
        check_reply(server, body, stream=variant.stream, cache_hit=cached)
        measure(row, server, body, warmup=warmup, seconds=seconds)
        if cached and (calls := upstream.cached_calls()) != 1:
            row.problems.append(f"{calls} calls reached the upstream, not 1")
        if server.metrics_url and (fell_back := fallbacks(server)):
            row.problems.append(f"{fell_back} limit checks fell back from the store")
    except (RuntimeError, OSError) as exc:
        row.problems.append(str(exc).splitlines()[0])
    return row


def run(variants: Sequence[Variant], workdir: Path, *, warmup: int, seconds: int) -> list[Row]:
    """Measure `variants` in order; each kind of gateway runs while its rows are measured."""
    rows: list[Row] = []
    with nginx(workdir) as upstream:
        for kind, group in itertools.groupby(variants, key=lambda v: v.server):
            todo = list(group)
            try:
                with serving(kind, upstream, workdir) as server:
                    if kind == "core":
                        rows.append(Row("idle", 0, {"MB RSS": rss_mb(server.pid)}))
                    for variant in todo:
                        print(f"  {variant.name} ...", file=sys.stderr, flush=True)
                        rows.append(run_variant(variant, server, upstream, warmup=warmup,
                                                seconds=seconds))
            except (RuntimeError, OSError) as exc:  # the gateway did not start, or stop
                print(f"  ! {kind}: {exc}", file=sys.stderr, flush=True)
                done = {row.name for row in rows}
                rows += [Row(v.name, v.connections, problems=[str(exc).splitlines()[0]])
                         for v in todo if v.name not in done]
    figures = {row.name: row.figures for row in rows}
    if "ms p50" in figures.get("nginx-1", {}) and "ms p50" in figures.get("core-1", {}):
        core = figures["core-1"]
        core["ms added p50"] = core["ms p50"] - figures["nginx-1"]["ms p50"]
    return rows


def table(rows: Sequence[Row], verdicts: dict[str, str]) -> str:
    widths = {unit: max(len(unit), 7) + 2 for unit in UNITS}
    lines = [f"{'row':<16}{'conns':>5}" + "".join(f"{u:>{w}}" for u, w in widths.items())
             + "  verdict"]
    for row in rows:
        cells = "".join(f"{show(row.figures[u]) if u in row.figures else '':>{w}}"
                        for u, w in widths.items())
        lines.append(f"{row.name:<16}{row.connections or '':>5}{cells}  {verdicts[row.name]}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 s runs after 1 s warm-ups")
    parser.add_argument("--only", action="append", metavar="NAME",
                        choices=[v.name for v in VARIANTS], help="this row only (repeatable)")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a row fails")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # stop everything, as Ctrl-C
    only = set(args.only or [v.name for v in VARIANTS])
    only |= {"nginx-1"} if "core-1" in only else set()  # its added latency is over nginx's
    budgets, started = read_budgets(), time.time()
    try:
        with tempfile.TemporaryDirectory(prefix="gw-bench-") as workdir:
            rows = run([v for v in VARIANTS if v.name in only], Path(workdir),
                       warmup=1 if args.quick else 2, seconds=3 if args.quick else 8)
    except KeyboardInterrupt:
        print("interrupted: every process is stopped", file=sys.stderr)
        return 130
    verdicts = {row.name: verdict(row.figures, row.problems, budgets.get(row.name, []))
                for row in rows}
    print(table(rows, verdicts))
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_bytes(orjson.dumps(
        {"started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
         "quick": args.quick, "rows": [{**asdict(r), "verdict": verdicts[r.name]} for r in rows]},
        option=orjson.OPT_INDENT_2))
    failed = any(v.startswith("FAIL") for v in verdicts.values())
    return 1 if args.strict and failed else 0


if __name__ == "__main__":
    sys.exit(main())
