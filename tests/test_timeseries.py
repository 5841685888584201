"""Reading the series back: windows, grouping, percentiles from bucket histograms."""

from __future__ import annotations

import pytest

from gateway.analytics.timeseries import OTHERS, WINDOWS, Totals, Trend, percentile, read_trend
from gateway.stores.series import (
    BOUNDS_MS,
    FIELDS,
    HISTOGRAM,
    LATENCY,
    WIDTH,
    MemorySeriesStore,
    SeriesRow,
)

T0 = 1_763_856_000


def row(start: int = T0, team: str = "alpha", model: str = "qa", backend: str = "inkeep",
        latency: dict[int, int] | None = None, **counts: int) -> SeriesRow:
    values = [0] * WIDTH
    for name, n in counts.items():
        values[FIELDS.index(name)] = n
    for i, n in (latency or {}).items():
        values[LATENCY + i] = n
    return SeriesRow(start, team, model, backend, tuple(values))


def test_percentile_interpolates_within_a_bucket() -> None:
    histogram = [0] * HISTOGRAM
    histogram[4] = 10  # ten values in (50, 100] ms
    assert percentile(histogram, 0.5) == pytest.approx(75.0)
    assert percentile(histogram, 1.0) == pytest.approx(100.0)
    histogram[0] = 10  # and ten in [0, 5]
    assert percentile(histogram, 0.25) == pytest.approx(2.5)
    assert percentile(histogram, 0.95) == pytest.approx(95.0)
    assert percentile([0] * HISTOGRAM, 0.5) is None
    above = [0] * HISTOGRAM
    above[-1] = 3
    assert percentile(above, 0.5) == BOUNDS_MS[-1]


def test_windows_end_with_the_bucket_of_now() -> None:
    hour = WINDOWS["hour"].starts(T0 + 3599)
    assert len(hour) == 60 and hour[-1] == T0 + 3540 and hour[0] == T0
    month = WINDOWS["month"].starts(T0 + 10)
    assert len(month) == 30 and month[-1] == T0 and month[-2] == T0 - 86_400


def test_groups_rank_by_requests_and_fold_the_rest() -> None:
    rows = [row(team=f"t{i}", requests=i + 1, errors=i) for i in range(5)]
    trend = Trend(WINDOWS["hour"], [T0], rows)
    assert list(trend.by("team")) == ["t4", "t3", "t2", "t1", "t0"]
    top = trend.by("team", top=2)
    assert list(top) == ["t4", "t3", OTHERS]
    assert (top[OTHERS].requests, top[OTHERS].errors) == (6, 3)
    assert trend.total().requests == 15 and trend.total().error_rate == pytest.approx(10 / 15)


def test_lines_per_bucket_show_quiet_buckets_as_zero_and_no_latency() -> None:
    starts = [T0, T0 + 60, T0 + 120]
    rows = [row(T0, requests=2, latency={4: 2}), row(T0 + 120, model="rag", requests=1,
                                                      latency={0: 1})]
    trend = Trend(WINDOWS["hour"], starts, rows)
    assert trend.lines(lambda t: t.requests, "model") == {"qa": [2, 0, 0], "rag": [0, 0, 1]}
    assert trend.lines(lambda t: t.latency(0.5)) == {"all": [75.0, None, 2.5]}
    assert Totals().error_rate is None


async def test_read_trend_takes_the_window_from_the_store() -> None:
    store = MemorySeriesStore(30, clock=lambda: T0 + 3599)
    await store.add([row(T0 - 60, requests=9), row(T0, requests=1), row(T0 + 3540, requests=2)])
    trend = await read_trend(store, WINDOWS["hour"], T0 + 3599)
    assert trend.total().requests == 3  # the minute before the window is not in it
    day = await read_trend(store, WINDOWS["day"], T0 + 3599)
    assert day.total().requests == 12
