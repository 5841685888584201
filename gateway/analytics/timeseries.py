"""The time series read back for the console: a window (the last hour, day or 30 days) of
buckets, grouped by team, model or backend, with totals per group and per bucket, and
percentiles estimated from the buckets' histograms (linear within a histogram bucket, as
Prometheus' ``histogram_quantile``)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from gateway.stores.series import (
    BOUNDS_MS,
    DAY,
    HOUR,
    LATENCY,
    MINUTE,
    TTFT,
    WIDTH,
    SeriesRow,
    SeriesStore,
    Step,
    add_values,
)

GroupBy = Literal["team", "model", "backend"]
OTHERS = "(others)"


@dataclass(frozen=True, slots=True)
class Window:
    name: str
    label: str
    step: Step
    buckets: int

    def starts(self, now: float) -> list[int]:
        """The buckets' starts, oldest first; the last one holds `now`."""
        last = self.step.start(now)
        return [last - (self.buckets - 1 - i) * self.step.seconds for i in range(self.buckets)]


WINDOWS = {w.name: w for w in (Window("hour", "Last hour", MINUTE, 60),
                               Window("day", "Last 24 hours", HOUR, 24),
                               Window("month", "Last 30 days", DAY, 30))}


def percentile(histogram: Sequence[int], q: float) -> float | None:
    """The `q` quantile (0..1) in ms of what the histogram counted; None when it is empty.
    Above the last bound, the last bound (the histogram knows no more)."""
    total = sum(histogram)
    if not total:
        return None
    rank = q * total
    seen = 0
    for i, count in enumerate(histogram):
        if count and seen + count >= rank:
            if i >= len(BOUNDS_MS):
                return float(BOUNDS_MS[-1])
            lower = BOUNDS_MS[i - 1] if i else 0
            return lower + (BOUNDS_MS[i] - lower) * (rank - seen) / count
        seen += count
    return float(BOUNDS_MS[-1])


@dataclass(frozen=True, slots=True)
class Totals:
    """Summed counts and histograms (in the series' `FIELDS` order) of some buckets."""

    values: tuple[int, ...] = (0,) * WIDTH

    def plus(self, values: Sequence[int]) -> Totals:
        return Totals(add_values(self.values, values))

    @property
    def requests(self) -> int:
        return self.values[0]

    @property
    def errors(self) -> int:
        return self.values[1]

    @property
    def prompt_tokens(self) -> int:
        return self.values[2]

    @property
    def completion_tokens(self) -> int:
        return self.values[3]

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @property
    def error_rate(self) -> float | None:
        return self.errors / self.requests if self.requests else None

    def latency(self, q: float) -> float | None:
        return percentile(self.values[LATENCY:TTFT], q)

    def ttft(self, q: float) -> float | None:
        return percentile(self.values[TTFT:], q)


Metric = Callable[[Totals], float | None]


class Trend:
    """A window's rows, summed per group and bucket."""

    def __init__(self, window: Window, starts: list[int], rows: Iterable[SeriesRow]) -> None:
        self.window = window
        self.starts = starts
        self.rows = list(rows)

    def total(self) -> Totals:
        return _sum(row.values for row in self.rows)

    def by(self, group: GroupBy, top: int | None = None) -> dict[str, Totals]:
        """Totals per group, the busiest first; beyond `top` groups, the rest as one."""
        sums: dict[str, Totals] = {}
        for row in self.rows:
            name = getattr(row, group)
            sums[name] = sums.get(name, Totals()).plus(row.values)
        ranked = sorted(sums.items(), key=lambda item: (-item[1].requests, item[0]))
        if top is None or len(ranked) <= top:
            return dict(ranked)
        rest = _sum(t.values for _, t in ranked[top:])
        return {**dict(ranked[:top]), OTHERS: rest}

    def lines(self, metric: Metric, group: GroupBy | None = None, top: int = 6
              ) -> dict[str, list[float | None]]:
        """`metric` per bucket: one line in all, or one per group (`top` of them, then the
        rest as one line)."""
        names = list(self.by(group, top)) if group is not None else ["all"]
        keep = set(names) - {OTHERS}
        cells: dict[tuple[str, int], Totals] = {}
        for row in self.rows:
            name = "all" if group is None else getattr(row, group)
            key = (name if name in keep or group is None else OTHERS, row.start)
            cells[key] = cells.get(key, Totals()).plus(row.values)
        empty = Totals()  # a quiet bucket: 0 requests, no latency
        return {name: [metric(cells.get((name, start), empty)) for start in self.starts]
                for name in names}


def _sum(values: Iterable[Sequence[int]]) -> Totals:
    total = Totals()
    for v in values:
        total = total.plus(v)
    return total


async def read_trend(store: SeriesStore, window: Window, now: float) -> Trend:
    starts = window.starts(now)
    rows = await store.query(window.step, starts[0], starts[-1] + window.step.seconds)
    return Trend(window, starts, rows)
