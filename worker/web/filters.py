"""Jinja filters: times in the business time zone, coins with separators, durations."""

from __future__ import annotations

import datetime as dt
from zoneinfo import ZoneInfo

from flask import Flask

from worker.config import Settings
from worker.reports.render import coins


def local_time(value: dt.datetime | None, tz: ZoneInfo) -> str:
    if value is None:
        return "-"
    return value.astimezone(tz).strftime("%Y-%m-%d %H:%M:%S %z")


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    h, rest = divmod(int(seconds), 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def register(app: Flask, settings: Settings) -> None:
    tz = settings.tz
    app.jinja_env.filters["local"] = lambda value: local_time(value, tz)
    app.jinja_env.filters["coins"] = coins
    app.jinja_env.filters["duration"] = duration
    app.jinja_env.globals["timezone"] = settings.RECON_TIMEZONE
