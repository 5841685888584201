"""Line charts drawn on the server as SVG: nothing to load in the browser, and they scale
with the page (a ``viewBox``, no fixed size). Colours come from the stylesheet's ``c0``…
``c6`` classes (the page's CSP allows no inline styles); hovering a bucket shows its figures
(an SVG ``<title>``). Every label is escaped."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime

from markupsafe import Markup, escape

from gateway.stores.series import Step

WIDTH, HEIGHT = 440, 200  # drawn about this wide: the labels stay legible
LEFT, RIGHT, TOP, BOTTOM = 58, 8, 10, 24  # room for a label such as 100.0 %
COLOURS = 7
X_LABELS = 5

Format = Callable[[float | None], str]


def summed(line: Sequence[float | None]) -> str:
    """A line's total, for the legend of a chart of counts."""
    return f"{sum(v for v in line if v is not None):,.0f}"


def nice_ceiling(value: float) -> float:
    """The smallest of 1, 2, 2.5, 5 times a power of ten that is at least `value` (> 0)."""
    power = 10.0 ** math.floor(math.log10(value))
    for step in (1, 2, 2.5, 5):
        if step * power >= value:
            return step * power
    return 10 * power


def bucket_label(start: int, step: Step) -> str:
    moment = datetime.fromtimestamp(start, UTC)
    return moment.strftime("%m-%d" if step.seconds >= 86_400 else "%H:%M")


def _segments(points: Sequence[tuple[float, float] | None]) -> list[list[tuple[float, float]]]:
    """Runs of consecutive points; a None (no figure for that bucket) breaks the line."""
    runs: list[list[tuple[float, float]]] = [[]]
    for point in points:
        if point is None:
            if runs[-1]:
                runs.append([])
        else:
            runs[-1].append(point)
    return [run for run in runs if run]


def _path(run: list[tuple[float, float]]) -> str:
    return "M" + " L".join(f"{x:.1f} {y:.1f}" for x, y in run)


class _Frame:
    """Where a bucket and a value land in the plot area."""

    def __init__(self, buckets: int, top: float) -> None:
        self.buckets = buckets
        self.top = top
        self.width = WIDTH - LEFT - RIGHT
        self.height = HEIGHT - TOP - BOTTOM

    def x(self, i: int) -> float:
        return LEFT + (self.width * (i + 0.5) / self.buckets)

    def y(self, value: float) -> float:
        return TOP + self.height * (1 - value / self.top)


def line_chart(title: str, starts: Sequence[int], step: Step,
               lines: Mapping[str, Sequence[float | None]], fmt: Format,
               total: Callable[[Sequence[float | None]], str] | None = None) -> Markup:
    """A `<figure>` with the chart and its legend; `fmt` formats values (axis, tooltips),
    `total`, when given, a line's figure for the legend."""
    values = [v for line in lines.values() for v in line if v is not None]
    top = max(values, default=0)
    frame = _Frame(len(starts), nice_ceiling(top) if top > 0 else 1)
    svg = "".join([
        f'<svg viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="{escape(title)}" '
        'preserveAspectRatio="xMidYMid meet">',
        *_axes(frame, starts, step, fmt),
        *(part for n, line in enumerate(lines.items()) for part in _line(frame, n, *line)),
        *_hover(frame, starts, step, lines, fmt),
        "</svg>"])
    legend = "".join(_legend_item(n, name, line, total)
                     for n, (name, line) in enumerate(lines.items()))
    return Markup(f'<figure class="chart" data-has-data="{"true" if values else "false"}">'
                  f'<figcaption>{escape(title)}</figcaption>{svg}'
                  f'<ul class="legend">{legend}</ul></figure>')


def _line(frame: _Frame, n: int, name: str, line: Sequence[float | None]) -> list[str]:
    """The `n`th line: a path per run of figures, and a dot for a lone one (a path of one
    point is invisible)."""
    points = [None if v is None else (frame.x(i), frame.y(v)) for i, v in enumerate(line)]
    parts = []
    for run in _segments(points):
        parts.append(f'<path class="line c{n % COLOURS}" data-series="{escape(name)}" '
                     f'd="{_path(run)}"/>')
        if len(run) == 1:
            parts.append(f'<circle class="dot c{n % COLOURS}" cx="{run[0][0]:.1f}" '
                         f'cy="{run[0][1]:.1f}" r="3.5"/>')
    return parts


def _legend_item(n: int, name: str, line: Sequence[float | None],
                 total: Callable[[Sequence[float | None]], str] | None) -> str:
    figure = f' <span class="figure">{escape(total(line))}</span>' if total else ""
    return (f'<li data-series="{escape(name)}"><span class="swatch c{n % COLOURS}"></span>'
            f'{escape(name)}{figure}</li>')


def _axes(frame: _Frame, starts: Sequence[int], step: Step, fmt: Format) -> list[str]:
    parts = []
    for fraction in (0, 0.5, 1):
        value = frame.top * fraction
        y = frame.y(value)
        parts.append(f'<line class="grid" x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y:.1f}" '
                     f'y2="{y:.1f}"/>')
        parts.append(f'<text class="axis" x="{LEFT - 6}" y="{y + 4:.1f}" '
                     f'text-anchor="end">{escape(fmt(value))}</text>')
    every = max(1, math.ceil(len(starts) / X_LABELS))
    for i in range(0, len(starts), every):
        parts.append(f'<text class="axis" x="{frame.x(i):.1f}" y="{HEIGHT - 6}" '
                     f'text-anchor="middle">{escape(bucket_label(starts[i], step))}</text>')
    return parts


def _hover(frame: _Frame, starts: Sequence[int], step: Step,
           lines: Mapping[str, Sequence[float | None]], fmt: Format) -> list[str]:
    """A transparent column per bucket whose tooltip lists every line's figure there."""
    width = frame.width / max(1, frame.buckets)
    parts = []
    for i, start in enumerate(starts):
        figures = "; ".join(f"{name}: {fmt(line[i])}" for name, line in lines.items())
        parts.append(f'<rect class="hover" x="{frame.x(i) - width / 2:.1f}" y="{TOP}" '
                     f'width="{width:.1f}" height="{frame.height}"><title>'
                     f'{escape(bucket_label(start, step))} UTC — {escape(figures)}'
                     f'</title></rect>')
    return parts
