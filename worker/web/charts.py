"""Small SVG line charts for the account page, computed here and drawn by the template: only
numbers reach the markup (no user text), and no script is needed to see them."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass

from worker.recon.console import Fetch

WIDTH, HEIGHT = 640.0, 180.0
PAD_X, PAD_Y = 56.0, 16.0


@dataclass(frozen=True, slots=True)
class Chart:
    check: str
    midas_points: str  # "x,y x,y …" for <polyline points>
    ledger_points: str
    y_min: int
    y_max: int
    first: dt.datetime
    last: dt.datetime
    width: float = WIDTH
    height: float = HEIGHT
    pad_x: float = PAD_X
    pad_y: float = PAD_Y

    @property
    def y_axis_x(self) -> float:
        return self.pad_x - 4


def check_charts(fetches: Sequence[Fetch], check_names: Sequence[str]) -> list[Chart]:
    """One chart per check: Midas' counter and the ledger's running side, fetch by fetch."""
    ok = [f for f in fetches if f.checks]
    if not ok:
        return []
    t0, t1 = ok[0].snapshot.fetched_at, ok[-1].snapshot.fetched_at
    span = max((t1 - t0).total_seconds(), 1.0)
    charts = []
    for name in check_names:
        series = [
            (f.snapshot.fetched_at, p.midas_value, p.ledger_value)
            for f in ok
            for p in f.checks
            if p.check == name
        ]
        if not series:
            continue
        values = [v for _, m, ledger in series for v in (m, ledger)]
        lo, hi = min(values), max(values)
        if lo == hi:
            lo, hi = lo - 1, hi + 1

        def xy(at: dt.datetime, value: int, lo: int = lo, hi: int = hi) -> str:
            x = PAD_X + (WIDTH - 2 * PAD_X) * (at - t0).total_seconds() / span
            y = HEIGHT - PAD_Y - (HEIGHT - 2 * PAD_Y) * (value - lo) / (hi - lo)
            return f"{x:.1f},{y:.1f}"

        charts.append(
            Chart(
                check=name,
                midas_points=" ".join(xy(at, m) for at, m, _ in series),
                ledger_points=" ".join(xy(at, ledger) for at, _, ledger in series),
                y_min=lo,
                y_max=hi,
                first=t0,
                last=t1,
            )
        )
    return charts
