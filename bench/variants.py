"""The benchmark's variants, one ``run_<name>`` function each (``--only NAME`` picks one).

Ratios (keys+limits vs core, cache miss vs no cache, one sink vs none) are measured as
alternating A/B pairs; absolute targets are single measurements at 50 connections.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from bench.gateways import GatewaySpec
from bench.harness import Bench, Target, chat_body, guarded

CHAT = "/chat/completions"


def run_core(bench: Bench) -> None:
    """Non-stream and stream at 1 and 50 connections, through the gateway and nginx direct."""
    up = bench.upstream
    plan = [(False, "non-stream", "json", up.json_base), (True, "stream", "sse", up.sse_base)]
    for stream, kind, tag, base in plan:
        model = "bench-sse" if stream else "bench-json"
        body = chat_body(model, stream=stream)
        for connections in (1, 50):
            direct = Target(f"direct-{tag}-{connections}", f"nginx direct, {kind}",
                            base + CHAT, body, server_pid=up.pid)
            with guarded(bench, [(direct.row_id, direct.label, connections)]):
                bench.measure(direct, connections)
            row = (f"core-{tag}-{connections}", f"core, {kind}", connections)
            with guarded(bench, [row]):
                core = bench.core()
                target = Target(row[0], row[1], core.chat_url, body, server_pid=core.pid)
                bench.measure(target, connections)
    with guarded(bench, [("core-json-1", "core, non-stream", 1)]):
        bench.results.rss_mb["core after load"] = round(bench.core().rss_mb(), 1)


def run_limits_memory(bench: Bench) -> None:
    """Two pairs against the core: the key-management issue's limits (the target), then every
    limit type at once (reported, no target)."""
    body = chat_body("bench-json")
    cases = [
        (GatewaySpec("limits-memory", limits=True, created_key=True), "limits-memory",
         "keys+limits (memory)", "key rpm/tpm/concurrency + team rpm/tpm"),
        (GatewaySpec("limits-memory-all", all_limits=True, created_key=True),
         "limits-memory-all", "all limit types (memory)",
         "+ team per-model rpm/tpm + daily/monthly budgets"),
    ]
    for spec, row_id, label, limits in cases:
        rows = [(row_id + "-base", f"core (paired with {label})", 50), (row_id, label, 50)]
        with guarded(bench, rows):
            core = bench.core()
            with bench.gateway(spec) as gateway:
                bench.paired(Target(rows[0][0], rows[0][1], core.chat_url, body,
                                    server_pid=core.pid),
                             Target(row_id, label, gateway.chat_url, body,
                                    server_pid=gateway.pid,
                                    notes=f"created key; {limits}, never reached",
                                    authorization=gateway.authorization), 50)


def run_limits_redis(bench: Bench) -> None:
    row = ("limits-redis", "keys+limits (redis)", 50)
    with guarded(bench, [row]):
        spec = GatewaySpec("limits-redis", all_limits=True, redis=True, created_key=True)
        with bench.gateway(spec) as gateway:
            target = Target(row[0], row[1], gateway.chat_url, chat_body("bench-json"),
                            server_pid=gateway.pid,
                            notes="key created in redis; all limit types on redis",
                            authorization=gateway.authorization)
            bench.measure(target, 50)
            keys = redis_keys(bench.redis_url())
            bench.annotate(row[0], f"{keys} redis keys after the run")
            fallbacks = metric_total(gateway.url, "gateway_store_unavailable_total")
            if fallbacks:
                # each one sends a second of requests to the in-process limiter instead
                bench.invalidate(row[0], f"{fallbacks} limit checks fell back from Redis")


def redis_keys(url: str) -> int:
    import redis

    client = redis.Redis.from_url(url)
    try:
        return int(client.dbsize())
    finally:
        client.close()


def run_cache_hit(bench: Bench) -> None:
    row = ("cache-hit", "cache hit (memory)", 50)
    with guarded(bench, [row]):
        with bench.gateway(GatewaySpec("cache-hit", cache=True)) as gateway:
            target = Target(row[0], row[1], gateway.chat_url, chat_body("bench-cached"),
                            server_pid=gateway.pid, notes="one body: all hits after the first")
            before = bench.upstream.cached_calls()
            bench.measure(target, 50)
            seen = bench.check(target)
            if seen.cache:
                bench.annotate(row[0], seen.cache)
            calls = settled(bench.upstream.cached_calls) - before
            bench.annotate(row[0], f"{calls:,} upstream calls")
            if calls > max(10, bench.requests(row[0]) // 100):
                bench.invalidate(row[0], "the cache let requests through to the upstream")


# ~1,000 entries of the bench's answer: at its memory bound after the warm-up (as in a gateway
# that has run for a while), so a miss also evicts and the cache no longer grows the memory
CACHE_MISS_BYTES = 1_000_000
CACHE_MISS = GatewaySpec("cache-miss", cache=True, cache_bytes=CACHE_MISS_BYTES)


def run_cache_miss(bench: Bench) -> None:
    rows = [("no-cache", "no cache (unique bodies)", 50),
            ("cache-miss", "cache miss (memory, unique bodies)", 50)]
    with guarded(bench, rows):
        with bench.gateway(CACHE_MISS) as gateway:
            bench.interleaved(
                Target(rows[0][0], rows[0][1], gateway.chat_url,
                       chat_body("bench-json", unique=True), server_pid=gateway.pid, unique=True,
                       notes="model without cache"),
                Target(rows[1][0], rows[1][1], gateway.chat_url,
                       chat_body("bench-cached", unique=True), server_pid=gateway.pid,
                       unique=True,
                       notes="lookup + store every answer, cache at its 1 MB bound"), 50)
            calls = settled(bench.upstream.cached_calls)
            bench.annotate(rows[1][0], f"{calls:,} upstream calls (incl. warm-up)")
            if calls < bench.requests(rows[1][0]) * 0.99:
                bench.invalidate(rows[1][0], "some requests were cache hits")


def run_sink(bench: Bench) -> None:
    rows = [("no-sink", "no sink (core)", 50), ("sink", "one webhook sink, batch 64", 50),
            ("sink-single", "one webhook sink, 1 record/POST", 50)]
    body = chat_body("bench-json")
    with guarded(bench, rows):
        core = bench.core()
        with bench.gateway(GatewaySpec("sink", sink=True, sink_batch=64)) as gateway:
            before = bench.upstream.sink_posts()
            bench.paired(Target(rows[0][0], rows[0][1], core.chat_url, body,
                                server_pid=core.pid),
                         Target(rows[1][0], rows[1][1], gateway.chat_url, body,
                                server_pid=gateway.pid, notes="outbox + delivery to nginx"), 50)
            posts = settled(bench.upstream.sink_posts) - before
            delivered = delivered_records(gateway.url)
            bench.annotate(rows[1][0], f"{delivered:,} records in {posts:,} POSTs (incl. "
                                       "warm-up)")
            if posts == 0 or delivered == 0:
                bench.invalidate(rows[1][0], "the sink received nothing")
        with bench.gateway(GatewaySpec("sink-single", sink=True)) as gateway:
            before = bench.upstream.sink_posts()
            bench.measure(Target(rows[2][0], rows[2][1], gateway.chat_url, body,
                                 server_pid=gateway.pid, notes="for comparison, not paired"), 50)
            posts = settled(bench.upstream.sink_posts) - before
            bench.annotate(rows[2][0], f"{posts:,} sink POSTs (incl. warm-up)")
            if posts == 0:
                bench.invalidate(rows[2][0], "the sink received nothing")


def metric_total(url: str, name: str, having: str = "") -> int:
    """The sum of a counter's samples on the gateway's /metrics (those whose labels contain
    `having`)."""
    import httpx

    text = httpx.get(f"{url}/metrics", timeout=5).text
    return sum(int(float(line.rsplit(" ", 1)[1])) for line in text.splitlines()
               if line.startswith(name + "{") and having in line)


def delivered_records(url: str) -> int:
    """Records the gateway's mirror delivered (its /metrics), once the count settles."""
    return settled(lambda: metric_total(url, "gateway_outbox_deliveries_total",
                                        'result="delivered"'))


def settled(count: Callable[[], int], timeout: float = 8.0) -> int:
    """A logged count once it stops growing (nginx flushes its logs every second, and the
    outbox may still be delivering)."""
    deadline = time.monotonic() + timeout
    last = -1
    while time.monotonic() < deadline:
        time.sleep(1.2)
        now = count()
        if now == last:
            break
        last = now
    return count()


def run_nuclia(bench: Bench) -> None:
    row = ("nuclia-stream", "nuclia stream (ndjson -> SSE)", 50)
    with guarded(bench, [row]):
        core = bench.core()
        target = Target(row[0], row[1], core.chat_url, chat_body("bench-nuclia", stream=True),
                        server_pid=core.pid,
                        notes="10 answer items; req/s = answers/s")
        bench.measure(target, 50)
