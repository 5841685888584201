"""The measuring harness: what one load is (`Target`), how long it runs (`Timing`), and
`Bench`, which measures single targets or A/B pairs and records rows in the `Results`.
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from bench.cpu import CpuSample, cpu_window
from bench.gateways import CLIENT_KEY, GatewaySpec, RunningGateway, gateway_process
from bench.probe import Probe, probe
from bench.processes import BenchProcessError
from bench.report import Results, Row
from bench.upstream import Upstream
from bench.wrk import Load, WrkResult, combine, one_round, run_wrk

AUTH = f"Bearer {CLIENT_KEY}"
BUSY_CORES = 0.25  # other processes' load above which a row is flagged as disturbed
_RAISED = re.compile(r"^[A-Za-z_.]*(Error|Exception|Exit)\b.*:")


@dataclass(frozen=True)
class Timing:
    seconds: int  # one measurement
    warmup: int  # before the first measurement of a target
    rounds: int  # paired comparisons alternate A, B this many times ...
    round_seconds: int  # ... for this long each
    turns: int = 8  # interleaved pairs: each side's turns per round ...
    turn_seconds: float = 0.5  # ... of this long (see `Bench.interleaved`)


FULL = Timing(seconds=8, warmup=2, rounds=12, round_seconds=2)
QUICK = Timing(seconds=3, warmup=1, rounds=1, round_seconds=2, turns=2)


def chat_body(model: str, *, stream: bool = False, unique: bool = False) -> bytes:
    """A small chat request; ``@N@`` (unique bodies) is replaced per request by chat.lua."""
    question = "How fast is the gateway? " + ("@N@" if unique else "fixed question")
    stream_part = ',"stream":true' if stream else ""
    return (f'{{"model":"{model}","temperature":0{stream_part},"messages":['
            f'{{"role":"system","content":"You answer benchmark questions."}},'
            f'{{"role":"user","content":"{question}"}}]}}').encode()


@dataclass(frozen=True)
class Target:
    """One thing to load: a URL and a body."""

    row_id: str
    label: str
    url: str
    body: bytes
    server_pid: int  # the process doing the work (gateway, or nginx for direct rows)
    unique: bool = False
    notes: str = ""
    authorization: str = AUTH


class Bench:
    """Runs the selected variants; owns the long-lived processes through `stack`."""

    def __init__(self, timing: Timing, workdir: Path, upstream: Upstream, stack: ExitStack,
                 results: Results) -> None:
        self.timing = timing
        self.workdir = workdir
        self.upstream = upstream
        self.stack = stack
        self.results = results
        self._core: RunningGateway | None = None
        self._core_error: BenchProcessError | None = None
        self._redis_url: str | None = None

    # -- processes -------------------------------------------------------------------------

    def core(self) -> RunningGateway:
        """The core gateway (memory store, no limits/cache/sinks), kept for the whole run."""
        if self._core_error is not None:
            raise self._core_error  # started once, failed: do not retry for every row
        if self._core is None:
            try:
                self._core = self.stack.enter_context(self.gateway(GatewaySpec("core")))
            except BenchProcessError as exc:
                self._core_error = exc
                raise
        return self._core

    def redis_url(self) -> str:
        if self._redis_url is None:
            from gateway.testing.redis_server import redis_server

            self._redis_url = self.stack.enter_context(redis_server()).url
        return self._redis_url

    @contextmanager
    def gateway(self, spec: GatewaySpec) -> Iterator[RunningGateway]:
        """One variant's gateway; its idle RSS is recorded once /healthz answers."""
        redis_url = self.redis_url() if spec.redis else None
        with gateway_process(spec, self.upstream, redis_url=redis_url,
                             workdir=self.workdir) as running:
            time.sleep(0.5)  # let start-up settle before reading idle RSS
            self.results.rss_mb[f"{spec.name} idle"] = round(running.rss_mb(), 1)
            yield running

    # -- measurements ----------------------------------------------------------------------

    def _load(self, target: Target, connections: int,
              seconds: int) -> tuple[WrkResult, CpuSample]:
        load = Load(url=target.url, body=target.body, authorization=target.authorization,
                    connections=connections, seconds=seconds, unique=target.unique)
        with cpu_window(target.server_pid) as window:
            result = run_wrk(load)
        assert window.sample is not None
        return result, window.sample

    def check(self, target: Target) -> Probe:
        return probe(target.url, target.body, target.authorization)

    def measure(self, target: Target, connections: int) -> None:
        seen = self.check(target)
        if self.timing.warmup:
            self._load(target, connections, self.timing.warmup)
        result, cpu = self._load(target, connections, self.timing.seconds)
        self._record(target, connections, result, cpu, seen)

    def paired(self, base: Target, variant: Target, connections: int) -> None:
        """Alternate A, B, B, A, A, B, ... (`timing.rounds` rounds, each side first in half
        of them) so drift on a shared machine hits both sides of a ratio alike."""
        seen = {t.row_id: self.check(t) for t in (base, variant)}
        if self.timing.warmup:
            for target in (base, variant):
                self._load(target, connections, self.timing.warmup)
        runs: dict[str, list[tuple[WrkResult, CpuSample]]] = {base.row_id: [],
                                                               variant.row_id: []}
        for round_ in range(self.timing.rounds):
            for target in (base, variant) if round_ % 2 == 0 else (variant, base):
                runs[target.row_id].append(
                    self._load(target, connections, self.timing.round_seconds))
        for target in (base, variant):
            done = runs[target.row_id]
            cpu = done[0][1]
            for _, more in done[1:]:
                cpu = cpu + more
            self._record(target, connections, combine([r for r, _ in done]), cpu,
                         seen[target.row_id], paired=True,
                         rounds=tuple(r.rps for r, _ in done))

    def interleaved(self, base: Target, variant: Target, connections: int) -> None:
        """A pair on one server whose two loads take turns (`turns` of `turn_seconds` each
        per round, the first turn alternating), as bench/interleave.py does: both sides meet
        the same machine within half a second, where the 2 s windows of `paired` meet it
        seconds apart (one round's ratio: sd ~2% against ~12% on a shared VM). The server's
        CPU is shared by the two sides, so a row's note gives it per request over both;
        latencies include the turns a side waited stopped, so they mean nothing here."""
        if (base.url, base.server_pid, base.authorization) != \
                (variant.url, variant.server_pid, variant.authorization):
            raise BenchProcessError("an interleaved pair loads one server with one key")
        seen = {t.row_id: self.check(t) for t in (base, variant)}
        timing = self.timing
        bodies = (base.body, variant.body)

        def run(first: int, turns: int) -> tuple[WrkResult, WrkResult]:
            return one_round(base.url, base.authorization, bodies, slices=turns,
                             slice_seconds=timing.turn_seconds, first=first,
                             connections=connections)

        if timing.warmup:
            run(0, max(1, round(timing.warmup / timing.turn_seconds)))
        running = timing.turns * timing.turn_seconds  # each side's, per round
        runs: dict[str, list[WrkResult]] = {base.row_id: [], variant.row_id: []}
        cpu: CpuSample | None = None
        for round_ in range(timing.rounds):
            with cpu_window(base.server_pid) as window:
                a, b = run(round_ % 2, timing.turns)
            assert window.sample is not None
            cpu = window.sample if cpu is None else cpu + window.sample
            runs[base.row_id].append(replace(a, seconds=running))
            runs[variant.row_id].append(replace(b, seconds=running))
            print(f"  round {round_ + 1}: {base.label} {a.requests:,}, {variant.label} "
                  f"{b.requests:,} requests ({b.requests / max(a.requests, 1):.1%} of the "
                  f"first)", flush=True)
        assert cpu is not None
        requests = sum(r.requests for done in runs.values() for r in done)
        shared = f"{cpu.server_s / max(requests, 1) * 1e6:,.0f} µs CPU/req over both sides"
        for target in (base, variant):
            done = runs[target.row_id]
            self._record(target, connections, combine(done), cpu, seen[target.row_id],
                         rounds=tuple(r.rps for r in done), interleaved=shared)

    def _record(self, target: Target, connections: int, result: WrkResult, cpu: CpuSample,
                seen: Probe, *, paired: bool = False, rounds: tuple[float, ...] = (),
                interleaved: str = "") -> None:
        """`interleaved`: the note on the CPU shared by an interleaved pair (then `cpu` is
        both sides' and is not stored with the row)."""
        per_request = interleaved or f"{cpu.us_per_request(result.requests):,.0f} µs CPU/req"
        notes = [f"@{connections}", per_request]
        if cpu.other_cores > BUSY_CORES:
            notes.append(f"BUSY MACHINE: other load {cpu.other_cores:.2f} cores")
        if target.notes:
            notes.append(target.notes)
        if seen.note:
            notes.append(seen.note)
        if paired:
            notes.append(f"paired, {self.timing.rounds}x{self.timing.round_seconds}s")
        if interleaved:
            notes.append(f"interleaved, {self.timing.rounds} rounds of "
                         f"{self.timing.turns}x{self.timing.turn_seconds:g}s turns")
        self.results.add(Row(target.row_id, target.label, connections, result,
                             "; ".join(notes), cpu=None if interleaved else cpu,
                             rounds=rounds))
        print(f"  {target.label:<34} @{connections:<3} {result.rps:>9,.0f} req/s  "
              f"p50 {result.p50_ms:.2f} ms  p99 {result.p99_ms:.2f} ms  "
              f"server {cpu.server_cores:.2f} cores, other {cpu.other_cores:.2f}"
              + (f"  ERRORS {result.errors}" if result.error_count else ""), flush=True)

    def annotate(self, row_id: str, note: str) -> None:
        row = self.results.rows.get(row_id)
        if row is not None:
            notes = f"{row.notes}; {note}" if row.notes else note
            self.results.add(replace(row, notes=notes))

    def requests(self, row_id: str) -> int:
        """Requests completed in the measured runs of a row (0 if it did not run)."""
        row = self.results.rows.get(row_id)
        return row.result.requests if row is not None and row.result is not None else 0

    def invalidate(self, row_id: str, reason: str) -> None:
        row = self.results.rows.get(row_id)
        if row is not None:
            self.results.add(replace(row, invalid=reason))

    def skip(self, row_ids: list[tuple[str, str, int]], reason: str) -> None:
        for row_id, label, connections in row_ids:
            if row_id not in self.results.rows:
                self.results.add(Row(row_id, label, connections, skipped=reason))


def short_reason(exc: BaseException) -> str:
    """One line for the table: the last exception line of a traceback, else the first line."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    raised = [line for line in lines if _RAISED.match(line)]
    chosen = raised[-1] if raised else (lines[0] if lines else type(exc).__name__)
    return chosen[:100]


@contextmanager
def guarded(bench: Bench, rows: list[tuple[str, str, int]]) -> Iterator[None]:
    """A variant that cannot run is recorded as skipped (with why); the others still run."""
    try:
        yield
    except (BenchProcessError, OSError, ValueError) as exc:
        print(f"  ! {rows[0][1]}: {exc}", file=sys.stderr, flush=True)
        bench.skip(rows, short_reason(exc))


