"""The HTML statement's charts: PNG images drawn with matplotlib's Agg canvas.

Figures are built directly (no pyplot), so nothing touches a display or global state and two
reports can draw at once. The PNGs are returned base64-encoded for data URIs.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Sequence

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator

from worker.reports.statement import Trend

_COIN_SERIES = (
    ("balance", "balance"),
    ("save_sum", "save_sum"),
    ("cost_sum", "cost_sum"),
    ("present_sum", "present_sum"),
)


def totals_png_b64(trend: Trend) -> str:
    """30-day trend of the Midas totals of each complete nightly run."""
    fig, ax = _figure("Midas totals per nightly run (coins)", trend)
    for name, label in _COIN_SERIES:
        ax.plot(_days(trend), _gaps(getattr(trend, name)), marker="o", markersize=3, label=label)
    ax.legend(loc="upper left", fontsize=8)
    return _png_b64(fig)


def open_cases_png_b64(trend: Trend) -> str:
    """30-day trend of the mismatch cases open at the end of each day."""
    fig, ax = _figure("Mismatch cases open at the end of the day", trend)
    ax.bar(_days(trend), trend.open_cases, color="#b00020", width=0.8)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    return _png_b64(fig)


def _figure(title: str, trend: Trend) -> tuple[Figure, Axes]:
    fig = Figure(figsize=(8, 3.2), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.set_title(title, fontsize=10)
    # Days are plotted as 0..n-1 and labelled by hand: the whole period shows even where it
    # has no data, and both charts line up day by day.
    days = _days(trend)
    ax.set_xlim(-0.5, len(days) - 0.5)
    step = max(1, len(days) // 8)
    ticks = days[::-1][::step][::-1]  # always label the statement's own date (the last)
    ax.set_xticks(ticks, [trend.dates[i].strftime("%m-%d") for i in ticks])
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:,.0f}"))
    ax.grid(True, axis="y", alpha=0.3)
    ax.tick_params(labelsize=8)
    return fig, ax


def _days(trend: Trend) -> list[int]:
    return list(range(len(trend.dates)))


def _gaps(values: Sequence[int | None]) -> list[float]:
    # NaN breaks the line: a date without a complete run is a gap, never a zero.
    return [math.nan if v is None else float(v) for v in values]


def _png_b64(fig: Figure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return base64.b64encode(buf.getvalue()).decode("ascii")
