"""Local days: their UTC windows (23, 24 or 25 hours around DST changes) and catch-up planning."""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

from homeiot.core.errors import InvalidDataError


def day_window(day: date, tz: ZoneInfo) -> tuple[datetime, datetime]:
    """``[start, end)`` in UTC of the local ``day`` in ``tz``: local midnight to next midnight."""
    start = datetime.combine(day, time(0), tz).astimezone(UTC)
    end = datetime.combine(day + timedelta(days=1), time(0), tz).astimezone(UTC)
    return start, end


def local_day(ts: datetime, tz: ZoneInfo) -> date:
    """The local date of an aware timestamp."""
    return ts.astimezone(tz).date()


def yesterday(now: datetime, tz: ZoneInfo) -> date:
    """The local day before ``now``'s local day (the seed's "previous day in JST")."""
    return local_day(now, tz) - timedelta(days=1)


def plan_days(*, last_archived: date | None, through: date, max_days: int) -> list[date]:
    """The days a catch-up run archives: from the day after ``last_archived`` through ``through``
    (only ``through`` on a first run), oldest first, at most ``max_days`` of them."""
    if max_days < 1:
        raise InvalidDataError(f"max_days must be at least 1, got {max_days}")
    first = through if last_archived is None else last_archived + timedelta(days=1)
    days: list[date] = []
    day = first
    while day <= through and len(days) < max_days:
        days.append(day)
        day += timedelta(days=1)
    return days


def date_range(first: date, last: date) -> list[date]:
    """Every day from ``first`` through ``last``; raises when ``first`` is after ``last``."""
    if first > last:
        raise InvalidDataError(f"the range {first}..{last} is empty: start is after end")
    return [first + timedelta(days=i) for i in range((last - first).days + 1)]
