"""The business calendar alone: dates of instants, the nightly's times, the skew (no services)."""

from __future__ import annotations

import datetime as dt

import pytest

from worker.business_calendar import BusinessCalendar, FutureDate
from worker.config import ConfigError, load_settings

UTC = dt.UTC


def cal(**env: str) -> BusinessCalendar:
    return load_settings(env).calendar


def test_business_dates_are_local_dates() -> None:
    shanghai = cal(RECON_TIMEZONE="Asia/Shanghai")
    assert shanghai.date_of(dt.datetime(2026, 11, 24, 15, 59, tzinfo=UTC)) == dt.date(2026, 11, 24)
    assert shanghai.date_of(dt.datetime(2026, 11, 24, 16, 0, tzinfo=UTC)) == dt.date(2026, 11, 25)
    start, end = shanghai.day_bounds(dt.date(2026, 11, 25))
    assert (start, end) == (
        dt.datetime(2026, 11, 24, 16, tzinfo=UTC),
        dt.datetime(2026, 11, 25, 16, tzinfo=UTC),
    )


def test_naive_instants_are_refused() -> None:
    with pytest.raises(ValueError, match="time zone"):
        cal().date_of(dt.datetime(2026, 11, 24, 12))


@pytest.mark.parametrize(
    ("zone", "day", "hours"),
    [
        ("America/New_York", dt.date(2026, 3, 8), 23),  # spring forward
        ("America/New_York", dt.date(2026, 11, 1), 25),  # fall back
        ("Asia/Shanghai", dt.date(2026, 3, 8), 24),
    ],
)
def test_a_business_day_is_23_24_or_25_hours(zone: str, day: dt.date, hours: int) -> None:
    start, end = cal(RECON_TIMEZONE=zone).day_bounds(day)
    assert end - start == dt.timedelta(hours=hours)


def test_the_nightly_fires_at_local_time() -> None:
    c = cal(RECON_TIMEZONE="Asia/Shanghai", RECON_NIGHTLY_AT="02:30")
    assert c.nightly_fire_at(dt.date(2026, 11, 25)) == dt.datetime(2026, 11, 24, 18, 30, tzinfo=UTC)


@pytest.mark.parametrize(
    ("nightly_at", "sent_local", "expected"),
    [
        # 23:30 start: a message sent on time stands for that evening's date...
        ("23:30", dt.datetime(2026, 11, 24, 23, 30, 1), dt.date(2026, 11, 24)),
        # ...and one sent (or retried) after midnight still does.
        ("23:30", dt.datetime(2026, 11, 25, 0, 10), dt.date(2026, 11, 24)),
        ("23:30", dt.datetime(2026, 11, 25, 23, 29), dt.date(2026, 11, 24)),
        ("23:30", dt.datetime(2026, 11, 25, 23, 30), dt.date(2026, 11, 25)),
        # 02:30 start: a beat that was down at 02:30 and sends at 03:00 means today.
        ("02:30", dt.datetime(2026, 11, 25, 3, 0), dt.date(2026, 11, 25)),
        ("02:30", dt.datetime(2026, 11, 25, 2, 29), dt.date(2026, 11, 24)),
        ("00:00", dt.datetime(2026, 11, 25, 0, 0), dt.date(2026, 11, 25)),
    ],
)
def test_the_date_a_nightly_start_stands_for(
    nightly_at: str, sent_local: dt.datetime, expected: dt.date
) -> None:
    c = cal(RECON_TIMEZONE="Asia/Shanghai", RECON_NIGHTLY_AT=nightly_at)
    sent = sent_local.replace(tzinfo=c.tz).astimezone(UTC)
    assert c.nightly_date_for(sent) == expected


def test_the_deadline_is_on_the_next_day_when_not_later_than_the_start() -> None:
    early = cal(RECON_TIMEZONE="Asia/Shanghai", RECON_NIGHTLY_AT="02:30")
    assert early.nightly_deadline(dt.date(2026, 11, 25)) == dt.datetime(
        2026, 11, 25, 0, 0, tzinfo=UTC
    )  # 08:00 in Shanghai, same day
    late = cal(RECON_TIMEZONE="Asia/Shanghai", RECON_NIGHTLY_AT="23:30")
    assert late.nightly_deadline(dt.date(2026, 11, 24)) == dt.datetime(
        2026, 11, 25, 0, 0, tzinfo=UTC
    )  # 08:00 the next morning


def test_future_dates_are_refused_and_today_is_not() -> None:
    c = cal(RECON_TIMEZONE="Asia/Shanghai")
    now = dt.datetime(2026, 11, 24, 16, 30, tzinfo=UTC)  # 00:30 on the 25th in Shanghai
    c.require_begun(dt.date(2026, 11, 25), now)
    with pytest.raises(FutureDate, match="2026-11-26 has not begun in Asia/Shanghai"):
        c.require_begun(dt.date(2026, 11, 26), now)


def test_a_day_is_over_at_its_local_midnight() -> None:
    c = cal(RECON_TIMEZONE="Asia/Shanghai")
    end = c.day_bounds(dt.date(2026, 11, 24))[1]
    assert not c.is_over(dt.date(2026, 11, 24), end - dt.timedelta(microseconds=1))
    assert c.is_over(dt.date(2026, 11, 24), end)


def test_the_skew_is_a_setting_with_bounds() -> None:
    assert cal().skew == dt.timedelta(seconds=120)
    now = dt.datetime(2026, 11, 24, tzinfo=UTC)
    assert cal(RECON_CLOCK_SKEW_SECONDS="30").latest_believable(now) == now + dt.timedelta(
        seconds=30
    )
    for bad in ("-1", "3601", "soon"):
        with pytest.raises(ConfigError, match="RECON_CLOCK_SKEW_SECONDS"):
            load_settings({"RECON_CLOCK_SKEW_SECONDS": bad})
    with pytest.raises(ConfigError, match="RECON_NIGHTLY_DEADLINE"):
        load_settings({"RECON_NIGHTLY_DEADLINE": "8am"})
