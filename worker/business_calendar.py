"""The business calendar: the only place that turns instants into business dates and back.

Every question of the form "which day is this?" or "when does that day's work happen?" is
answered here, in `RECON_TIMEZONE`, so that beat, the runs, the confirm step, intake and the
statements cannot disagree:

- the business date of an instant, and a date's bounds (local midnight to local midnight, 23
  or 25 hours on a DST change);
- the instant the nightly run of a date is due (`RECON_NIGHTLY_AT`, local) and the date a
  nightly start stands for: the date of the latest scheduled fire time at or before the
  moment it was sent, so a message that waited past midnight, or a retry, keeps its date;
- the deadline of a date's nightly (`RECON_NIGHTLY_DEADLINE`, local, on the next calendar day
  when it is not after the start time);
- the tolerated clock skew between the game's clock and ours (`RECON_CLOCK_SKEW_SECONDS`):
  how far in the future a ledger row may be dated, and how long before a fetch ledger rows
  are still taken as "in flight".

Dates are `datetime.date`; instants are timezone-aware `datetime`s (UTC when we make them).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from zoneinfo import ZoneInfo


class FutureDate(ValueError):
    """A business date that has not begun in RECON_TIMEZONE: nothing can be observed for it."""


def utcnow() -> dt.datetime:
    """The worker's clock. Every default `now` of the project comes from here."""
    return dt.datetime.now(dt.UTC)


def _aware(instant: dt.datetime) -> dt.datetime:
    if instant.tzinfo is None:
        raise ValueError("an instant must carry its time zone")
    return instant


@dataclass(frozen=True)
class BusinessCalendar:
    """Built by `Settings.calendar` from RECON_TIMEZONE, RECON_NIGHTLY_AT,
    RECON_NIGHTLY_DEADLINE and RECON_CLOCK_SKEW_SECONDS."""

    tz: ZoneInfo
    nightly_at: dt.time
    deadline: dt.time
    skew: dt.timedelta

    # -- dates and their bounds ---------------------------------------------------------------

    def date_of(self, instant: dt.datetime) -> dt.date:
        """The business date an instant falls on."""
        return _aware(instant).astimezone(self.tz).date()

    def today(self, now: dt.datetime | None = None) -> dt.date:
        return self.date_of(now or utcnow())

    def local(self, day: dt.date, at: dt.time) -> dt.datetime:
        """The instant of local time `at` on `day`, in UTC. A time that a DST change skips
        is read with the offset before the change (zoneinfo's fold=0)."""
        return dt.datetime.combine(day, at, tzinfo=self.tz).astimezone(dt.UTC)

    def day_bounds(self, day: dt.date) -> tuple[dt.datetime, dt.datetime]:
        """Local midnight to the next local midnight, as UTC instants."""
        return self.local(day, dt.time(0)), self.local(day + dt.timedelta(days=1), dt.time(0))

    def has_begun(self, day: dt.date, now: dt.datetime | None = None) -> bool:
        return day <= self.today(now)

    def require_begun(self, day: dt.date, now: dt.datetime | None = None) -> None:
        """FutureDate unless `day` has begun: a run or statement of the future observes
        nothing and would be joined later by the real one."""
        today = self.today(now)
        if day > today:
            raise FutureDate(
                f"{day} has not begun in {self.tz.key} (today is {today}); "
                "runs and statements are for dates that have begun"
            )

    def is_over(self, day: dt.date, now: dt.datetime | None = None) -> bool:
        """Whether the whole of `day` lies in the past: a statement made before is partial."""
        return (now or utcnow()) >= self.day_bounds(day)[1]

    # -- the nightly --------------------------------------------------------------------------

    def nightly_fire_at(self, day: dt.date) -> dt.datetime:
        """When the nightly run of `day` is due to start."""
        return self.local(day, self.nightly_at)

    def nightly_date_for(self, sent_at: dt.datetime) -> dt.date:
        """The business date a nightly start sent at `sent_at` stands for: the date of the
        latest scheduled start at or before it.

        With the start at 23:30, a message sent at 23:30 and run at 00:10 is still for the
        evening's date; a beat that was down at 02:30 and sends at 03:00 means today's.
        """
        day = self.date_of(sent_at)
        return day if self.nightly_fire_at(day) <= sent_at else day - dt.timedelta(days=1)

    def nightly_deadline(self, day: dt.date) -> dt.datetime:
        """When the nightly run of `day` should be complete: RECON_NIGHTLY_DEADLINE after its
        start (the next calendar day when the deadline is not later in the day)."""
        on = day if self.deadline > self.nightly_at else day + dt.timedelta(days=1)
        return self.local(on, self.deadline)

    def night_window(self, day: dt.date, now: dt.datetime) -> tuple[dt.datetime, dt.datetime]:
        """The time a nightly of `day` planned at `now` has for fetching: from now (or its
        fire time, if planned early) to its deadline.

        A start at or after the deadline (a backfill, a night that waited for the one before)
        gets a night as long as a scheduled one, from now: it must fit somewhere, and the next
        nightly closes it if it is still running then.
        """
        start = max(_aware(now), self.nightly_fire_at(day))
        deadline = self.nightly_deadline(day)
        if deadline <= start:
            deadline = start + (deadline - self.nightly_fire_at(day))
        return start, deadline

    # -- clocks that disagree -----------------------------------------------------------------

    def latest_believable(self, now: dt.datetime | None = None) -> dt.datetime:
        """The latest `occurred_at` a ledger row may carry now: the game's clock may run
        ahead of ours by the tolerated skew, not more."""
        return (now or utcnow()) + self.skew

    def settled_before(self, fetched_at: dt.datetime) -> dt.datetime:
        """Ledger rows dated after this instant may still be in flight for a fetch made at
        `fetched_at` (the game's clock may be behind or ahead of ours by the skew)."""
        return _aware(fetched_at) - self.skew


def days_before(now: dt.datetime, days: float) -> dt.datetime:
    """The start of the window "the last `days` days" ending at `now` (24-hour days: an
    account's age of observation does not change with a DST shift)."""
    return _aware(now) - dt.timedelta(days=days)


def age_s(then: dt.datetime, now: dt.datetime) -> float:
    """Seconds from `then` to `now`."""
    return (_aware(now) - _aware(then)).total_seconds()


def hh_mm(value: str) -> dt.time:
    """A validated "HH:MM" setting as a time of day."""
    hh, mm = value.split(":")
    return dt.time(int(hh), int(mm))
