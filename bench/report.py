"""The benchmark's results: one row per measurement, the targets with PASS/FAIL, the printed
table, and the machine-readable JSON written to ``bench/results/``.
"""

from __future__ import annotations

import math
import platform
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from bench.cpu import CpuSample
from bench.wrk import WrkResult


@dataclass(frozen=True)
class Row:
    """One measurement (or why it did not run)."""

    id: str
    label: str
    connections: int
    result: WrkResult | None = None
    notes: str = ""
    skipped: str | None = None
    invalid: str | None = None  # it ran, but did not measure what it claims
    cpu: CpuSample | None = None
    rounds: tuple[float, ...] = ()  # req/s of each round of an alternating pair


    @property
    def ok(self) -> bool:
        return (self.result is not None and self.result.error_count == 0
                and self.invalid is None)

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "label": self.label, "connections": self.connections,
                "notes": self.notes, "skipped": self.skipped, "invalid": self.invalid,
                "result": self.result.as_dict() if self.result else None,
                "cpu": self.cpu.as_dict() if self.cpu else None,
                "rounds_rps": [round(r, 1) for r in self.rounds],
                "server_cpu_us_per_request": round(self.cpu.us_per_request(
                    self.result.requests), 1) if self.cpu and self.result else None}


@dataclass
class Results:
    rows: dict[str, Row] = field(default_factory=dict)
    # "<gateway> idle" for every gateway started, "core after load"
    rss_mb: dict[str, float] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def add(self, row: Row) -> None:
        self.rows[row.id] = row

    def measured(self, row_id: str) -> WrkResult | None:
        row = self.rows.get(row_id)
        return row.result if row is not None and row.ok else None


@dataclass(frozen=True)
class Verdict:
    name: str
    value: str
    passed: bool | None  # None: not measured (skipped or errors)
    why: str = ""


def _rate(row_id: str, floor: float) -> Callable[[Results], Verdict | str]:
    def check(res: Results) -> Verdict | str:
        got = res.measured(row_id)
        if got is None:
            return row_id
        return Verdict("", f"{got.rps:,.0f}/s", got.rps >= floor)
    return check


def _round_ratios(got: Row, base: Row) -> list[float]:
    return [b / a for b, a in zip(got.rounds, base.rounds, strict=False) if a]


def round_ratio(got: Row, base: Row) -> float:
    """B / A of a pair: the median of its rounds' ratios (each round's two sides ran back to
    back, so a burst of other load skews one round, not the figure), else the totals'."""
    pairs = _round_ratios(got, base)
    if len(pairs) != len(got.rounds) or not pairs:
        return got.result.rps / base.result.rps if got.result and base.result and \
            base.result.rps else 0.0
    pairs.sort()
    middle = len(pairs) // 2
    return pairs[middle] if len(pairs) % 2 else (pairs[middle - 1] + pairs[middle]) / 2


def median_error(values: Sequence[float]) -> float:
    """The standard error of the median of `values` (1.25 · their standard deviation / √N);
    0 below 3 values."""
    if len(values) < 3:
        return 0.0
    return 1.2533 * statistics.stdev(values) / math.sqrt(len(values))


def round_error(got: Row, base: Row) -> str:
    """`` ±x%``: the standard error of the median of a pair's round ratios, so that a reader
    sees when a figure is within the noise of its threshold; empty below 3 rounds."""
    pairs = _round_ratios(got, base)
    if len(pairs) < 3:
        return ""
    return f" ±{median_error(pairs):.1%}"


def _pair(res: Results, row_id: str, base_id: str) -> tuple[Row, Row] | str:
    got, base = res.rows.get(row_id), res.rows.get(base_id)
    if got is None or not got.ok:
        return row_id
    if base is None or not base.ok:
        return base_id
    return got, base


def _ratio(row_id: str, base_id: str, floor: float) -> Callable[[Results], Verdict | str]:
    def check(res: Results) -> Verdict | str:
        pair = _pair(res, row_id, base_id)
        if isinstance(pair, str):
            return pair
        got, base = pair
        share = round_ratio(got, base)
        return Verdict("", f"{share:.1%} (median of {len(got.rounds)} rounds"
                           f"{round_error(got, base)}; "
                           f"{_rps(got)} vs {_rps(base)})", share >= floor)
    return check


def _rps(row: Row) -> str:
    return f"{row.result.rps:,.0f}" if row.result else "-"


def _miss_cost(res: Results) -> Verdict | str:
    pair = _pair(res, "cache-miss", "no-cache")
    if isinstance(pair, str):
        return pair
    miss, none = pair
    cost = 1 - round_ratio(miss, none)
    return Verdict("", f"{cost:+.1%} (median of {len(miss.rounds)} rounds"
                       f"{round_error(miss, none)}; {_rps(miss)} vs {_rps(none)})", cost <= 0.05)


def _added_p50(res: Results) -> Verdict | str:
    gw, direct = res.measured("core-json-1"), res.measured("direct-json-1")
    if gw is None or direct is None:
        return "core-json-1" if gw is None else "direct-json-1"
    added = gw.p50_ms - direct.p50_ms
    return Verdict("", f"{added:.3f} ms ({gw.p50_ms:.3f} - {direct.p50_ms:.3f})", added <= 0.5)


def _idle_rss(res: Results) -> Verdict | str:
    idle = res.rss_mb.get("core idle")
    if idle is None:
        return "core-json-50"
    return Verdict("", f"{idle:.1f} MB", idle <= 80.0)


TARGETS: list[tuple[str, Callable[[Results], Verdict | str]]] = [
    ("core non-stream @50 >= 3,000 req/s", _rate("core-json-50", 3000)),
    ("stream (10 chunks) @50 >= 1,500 answers/s", _rate("core-sse-50", 1500)),
    ("added p50 @1 <= 0.5 ms (gateway - nginx direct)", _added_p50),
    ("idle RSS <= 80 MB", _idle_rss),
    ("keys+limits (memory) >= 90% of core", _ratio("limits-memory", "limits-memory-base", 0.9)),
    ("keys+limits (redis) >= 2,000 req/s", _rate("limits-redis", 2000)),
    ("cache hit >= 5,000 req/s", _rate("cache-hit", 5000)),
    ("cache miss cost <= 5% (vs no cache, unique bodies)", _miss_cost),
    ("one webhook sink >= 90% of no sink", _ratio("sink", "no-sink", 0.9)),
    ("nuclia stream @50 >= 1,200 answers/s", _rate("nuclia-stream", 1200)),
]


def verdicts(res: Results) -> list[Verdict]:
    out = []
    for name, check in TARGETS:
        got = check(res)
        if isinstance(got, str):
            row = res.rows.get(got)
            why = (row.skipped or row.invalid or "errors during the run") if row else "not run"
            out.append(Verdict(name, "-", None, why))
        else:
            out.append(Verdict(name, got.value, got.passed))
    return out


def _table(header: list[str], rows: list[list[str]], right: set[int]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return " | ".join(c.rjust(w) if i in right else c.ljust(w)
                          for i, (c, w) in enumerate(zip(cells, widths, strict=True))).rstrip()

    rule = "-+-".join("-" * w for w in widths)
    return "\n".join([line(header), rule, *(line(r) for r in rows)])


def render(res: Results) -> str:
    rows = []
    for row in res.rows.values():
        if row.result is None:
            rows.append([row.label, "-", "-", "-", f"skipped: {row.skipped}"])
            continue
        r = row.result
        notes = row.notes
        if r.error_count:
            notes = f"{r.error_count} ERRORS {r.errors}; {notes}"
        if row.invalid:
            notes = f"INVALID: {row.invalid}; {notes}"
        rows.append([row.label, f"{r.rps:,.0f}", f"{r.p50_ms:.2f}", f"{r.p99_ms:.2f}", notes])
    parts = [_table(["variant", "req/s", "p50 ms", "p99 ms", "notes"], rows, {1, 2, 3})]
    if res.rss_mb:
        parts.append("RSS (VmRSS, MB): " + ", ".join(
            f"{k} {v:.1f}" for k, v in res.rss_mb.items()))
    marks = {True: "PASS", False: "FAIL", None: "n/a"}
    parts.append(_table(["target", "measured", "result"],
                        [[v.name, v.value if v.passed is not None else v.why,
                          marks[v.passed]] for v in verdicts(res)], set()))
    return "\n\n".join(parts)


def machine() -> dict[str, Any]:
    import os

    return {"python": platform.python_version(), "platform": platform.platform(),
            "cpus": os.cpu_count(), "loadavg_at_start": os.getloadavg()}


def write_json(res: Results, folder: Path, stamp: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    data = {"meta": res.meta, "rss_mb": res.rss_mb,
            "rows": [row.as_dict() for row in res.rows.values()],
            "targets": [{"name": v.name, "measured": v.value, "passed": v.passed,
                         "why": v.why} for v in verdicts(res)]}
    blob = orjson.dumps(data, option=orjson.OPT_INDENT_2)
    (folder / f"run-{stamp}.json").write_bytes(blob)
    last = folder / "last.json"
    last.write_bytes(blob)
    return last
