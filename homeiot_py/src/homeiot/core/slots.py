"""Half-hour slots: the meter's cumulative energy at each half-hour boundary, as readings.

A smart meter fixes its normal-direction cumulative energy every 30 minutes (EPC 0xEA, the latest
one) and keeps the last days of them (EPC 0xE2: 48 values of one day, 00:00 to 23:30 in the meter's
time, the day chosen by 0xE5 as "days back from today"). A day has 48 slots. Each slot becomes one
*slot reading* whose ``ts`` and ``fixed_ts`` are the half hour itself, so a slot published twice —
live, read back after an outage, read back again after a restart — is the same InfluxDB point and
overwrites itself.

Pure: the caller passes the time and the values.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

from homeiot.core.reading import Reading

SLOT = timedelta(minutes=30)
SLOTS_PER_DAY = 48
#: The meter's clock: Japanese smart meters keep JST.
METER_TZ = ZoneInfo("Asia/Tokyo")


def slot_reading(source: str, at: datetime, kwh: float) -> Reading:
    """The reading of one half-hour slot (``seq`` is a placeholder; the outbox numbers it)."""
    return Reading(source=source, ts=at, seq=0, power_w=None, fixed_ts=at,
                   fixed_energy_normal_kwh=kwh)


def slot_times(day: date, tz: ZoneInfo = METER_TZ) -> list[datetime]:
    """The 48 half hours of ``day`` in the meter's zone, in UTC (0xE2's order)."""
    start = datetime.combine(day, time(), tzinfo=tz).astimezone(UTC)
    return [start + i * SLOT for i in range(SLOTS_PER_DAY)]


def last_slot(now: datetime) -> datetime:
    """The latest half-hour boundary at or before ``now`` (UTC; JST has no half-hour offset)."""
    now = now.astimezone(UTC)
    return now.replace(minute=now.minute - now.minute % 30, second=0, microsecond=0)


def days_to_read(now: datetime, after: datetime | None, max_days: int,
                 tz: ZoneInfo = METER_TZ) -> list[int]:
    """Which days of history to read (0xE5 values: days back from the meter's today), oldest first.

    Without ``after`` (nothing known, e.g. just started) the last ``max_days`` days; with it, the
    days from the one holding the slot after ``after`` up to today — at most ``max_days``.
    """
    if max_days < 1:
        return []
    today = now.astimezone(tz).date()
    back = max_days - 1
    if after is not None:
        back = min(back, max(0, (today - (after + SLOT).astimezone(tz).date()).days))
    return list(range(back, -1, -1))


def day_readings(source: str, day: date, values: Sequence[float | None], *, now: datetime,
                 after: datetime | None,
                 unwrap: Callable[[float | None], float | None] = lambda v: v,
                 tz: ZoneInfo = METER_TZ) -> list[Reading]:
    """Slot readings from one day of 0xE2 values: the slots that have a value, are not after
    ``now`` and come after ``after`` (already published), each unwrapped by ``unwrap``."""
    if len(values) != SLOTS_PER_DAY:
        raise ValueError(f"a day of history has {SLOTS_PER_DAY} values, got {len(values)}")
    out = []
    for at, value in zip(slot_times(day, tz), values, strict=True):
        if at > now or (after is not None and at <= after):
            continue
        kwh = unwrap(value)
        if kwh is not None:
            out.append(slot_reading(source, at, kwh))
    return out
