"""Server-drawn SVG charts: scaled, gaps for missing figures, every label escaped."""

from __future__ import annotations

import re

from gateway.console.charts import line_chart, nice_ceiling, summed
from gateway.console.rendering import ms, number
from gateway.stores.series import HOUR, MINUTE

T0 = 1_763_856_000


def test_nice_ceilings() -> None:
    assert [nice_ceiling(v) for v in (0.3, 1, 7, 12, 24, 260, 999)] == [
        0.5, 1, 10, 20, 25, 500, 1000]


def test_lines_have_one_path_per_run_and_a_dot_for_a_lone_figure() -> None:
    chart = str(line_chart("Latency", [T0 + 60 * i for i in range(5)], MINUTE,
                           {"p50": [10, 20, None, 5, None], "p95": [None] * 5}, ms))
    paths = re.findall(r'<path class="line c0" data-series="p50" d="([^"]+)"', chart)
    assert [p.count("L") for p in paths] == [1, 0]  # 10 and 20 joined, then 5 alone
    assert chart.count('<circle class="dot c0"') == 1  # the lone 5 ms
    assert 'data-series="p95"' in chart and 'class="line c1"' not in chart  # no figures
    assert "00:00 UTC — p50: 10 ms; p95: –" in chart  # the first bucket's tooltip
    assert 'data-has-data="true"' in chart


def test_every_label_is_escaped() -> None:
    evil = '<img src=x onerror="alert(1)">'
    chart = str(line_chart(evil, [T0], HOUR, {evil: [3]}, number, summed))
    assert "<img" not in chart and "&lt;img" in chart
    assert 'onerror="' not in chart


def test_an_empty_chart_still_draws_its_axes() -> None:
    chart = str(line_chart("Requests", [T0, T0 + 3600], HOUR, {"all": [0, 0]}, number, summed))
    assert "<svg" in chart and "<path" in chart and 'class="figure">0<' in chart
    empty = str(line_chart("Latency", [T0], HOUR, {"p50": [None]}, ms))
    assert 'data-has-data="false"' in empty
