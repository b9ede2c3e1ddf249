"""The HTML statement's charts: small SVG images written here, returned base64-encoded for
data URIs (the statement stays one self-contained file).

Two charts of 30 points need no plotting library: matplotlib took ~0.8 s of every HTML
statement to import and ~0.2 s to rasterise (docs/benchmarks.md §5b), more than the
statement's own figures once they were stored.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Sequence
from html import escape

from worker.reports.statement import Trend

_COIN_SERIES = (
    ("balance", "#1f77b4"),
    ("save_sum", "#ff7f0e"),
    ("cost_sum", "#2ca02c"),
    ("present_sum", "#d62728"),
)
WIDTH, HEIGHT = 800, 320
LEFT, RIGHT, TOP, BOTTOM = 90, 20, 34, 30  # room for the y labels, the title, the dates
FONT = 'font-family="system-ui, sans-serif"'


def totals_svg_b64(trend: Trend) -> str:
    """30-day trend of the Midas totals of each complete nightly run."""
    series = [(name, colour, getattr(trend, name)) for name, colour in _COIN_SERIES]
    known = [v for _, _, values in series for v in values if v is not None]
    plot = _Plot("Midas totals per nightly run (coins)", trend, known, integer=False)
    for _, colour, values in series:
        # A date without a complete run is a gap in the line, never a zero.
        for run in _runs_of_known(values):
            points = " ".join(f"{plot.x(i):.1f},{plot.y(values[i]):.1f}" for i in run)
            plot.parts.append(
                f'<polyline points="{points}" fill="none" stroke="{colour}" stroke-width="1.5"/>'
            )
            plot.parts.extend(
                f'<circle cx="{plot.x(i):.1f}" cy="{plot.y(values[i]):.1f}" r="2.5" '
                f'fill="{colour}"/>'
                for i in run
            )
    for n, (name, colour, _) in enumerate(series):
        y = TOP + 12 + n * 14
        plot.parts.append(
            f'<rect x="{LEFT + 8}" y="{y - 8}" width="14" height="3" fill="{colour}"/>'
            f'<text x="{LEFT + 26}" y="{y}" font-size="11" {FONT}>{escape(name)}</text>'
        )
    return plot.b64()


def open_cases_svg_b64(trend: Trend) -> str:
    """30-day trend of the mismatch cases open at the end of each day."""
    plot = _Plot("Mismatch cases open at the end of the day", trend, trend.open_cases, True)
    width = plot.step * 0.8
    for i, count in enumerate(trend.open_cases):
        top, base = plot.y(count), plot.y(0)
        plot.parts.append(
            f'<rect x="{plot.x(i) - width / 2:.1f}" y="{top:.1f}" width="{width:.1f}" '
            f'height="{max(0.0, base - top):.1f}" fill="#b00020"/>'
        )
    return plot.b64()


class _Plot:
    """Axes over the trend's dates (0..n-1, labelled by hand, so both charts line up day by
    day and the whole period shows even where it has no data) and a value range."""

    def __init__(self, title: str, trend: Trend, values: Sequence[int], integer: bool) -> None:
        self.days = len(trend.dates)
        self.step = (WIDTH - LEFT - RIGHT) / max(1, self.days)
        low, high = (min(values), max(values)) if values else (0, 1)
        if integer:
            low = min(0, low)
        self.ticks = _ticks(low, high, integer)
        self.low, self.high = self.ticks[0], self.ticks[-1]
        self.parts: list[str] = [
            f'<text x="{WIDTH / 2}" y="18" font-size="13" text-anchor="middle" {FONT}>'
            f"{escape(title)}</text>"
        ]
        for tick in self.ticks:
            y = self.y(tick)
            self.parts.append(
                f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y:.1f}" y2="{y:.1f}" '
                f'stroke="#ddd"/><text x="{LEFT - 6}" y="{y + 4:.1f}" font-size="11" '
                f'text-anchor="end" {FONT}>{tick:,.0f}</text>'
            )
        every = max(1, self.days // 8)
        for i in range(self.days - 1, -1, -every):  # always the statement's own date
            self.parts.append(
                f'<text x="{self.x(i):.1f}" y="{HEIGHT - 10}" font-size="11" '
                f'text-anchor="middle" {FONT}>{trend.dates[i].strftime("%m-%d")}</text>'
            )
        self.parts.append(
            f'<rect x="{LEFT}" y="{TOP}" width="{WIDTH - LEFT - RIGHT}" '
            f'height="{HEIGHT - TOP - BOTTOM}" fill="none" stroke="#888"/>'
        )

    def x(self, day: int) -> float:
        return LEFT + self.step * (day + 0.5)

    def y(self, value: float) -> float:
        span = (self.high - self.low) or 1
        return HEIGHT - BOTTOM - (value - self.low) / span * (HEIGHT - TOP - BOTTOM)

    def b64(self) -> str:
        svg = (
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
            f'viewBox="0 0 {WIDTH} {HEIGHT}">{"".join(self.parts)}</svg>'
        )
        return base64.b64encode(svg.encode()).decode("ascii")


def _ticks(low: float, high: float, integer: bool) -> list[float]:
    """About five round steps from below `low` to above `high`."""
    if high == low:
        low, high = low - 1, high + 1
    raw = (high - low) / 5
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    if integer:
        step = max(1, math.ceil(step))
    first = math.floor(low / step) * step
    count = math.ceil((high - first) / step)
    return [first + n * step for n in range(count + 1)]


def _runs_of_known(values: Sequence[int | None]) -> list[list[int]]:
    """The indexes of the known values, in unbroken runs."""
    runs: list[list[int]] = []
    for i, v in enumerate(values):
        if v is None:
            continue
        if runs and runs[-1][-1] == i - 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs
