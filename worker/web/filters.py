"""Jinja filters: times in the business time zone, coins with separators, durations."""

from __future__ import annotations

import datetime as dt

from flask import Flask

from worker.config import Settings
from worker.reports.render import coins


def register(app: Flask, settings: Settings) -> None:
    tz = settings.tz

    def local(value: dt.datetime | None) -> str:
        if value is None:
            return "-"
        return value.astimezone(tz).strftime("%Y-%m-%d %H:%M:%S %z")

    def duration(seconds: float | None) -> str:
        if seconds is None:
            return "-"
        s = int(seconds)
        h, rest = divmod(s, 3600)
        m, sec = divmod(rest, 60)
        return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"

    app.jinja_env.filters["local"] = local
    app.jinja_env.filters["coins"] = coins
    app.jinja_env.filters["duration"] = duration
    app.jinja_env.globals["timezone"] = settings.RECON_TIMEZONE
