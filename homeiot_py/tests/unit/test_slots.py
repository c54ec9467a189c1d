"""Half-hour slots and the history days to read back, in memory."""

from __future__ import annotations

from datetime import UTC, date, datetime

import pytest

from homeiot.core import codec, lineprotocol
from homeiot.core.errors import InvalidReadingError
from homeiot.core.reading import Reading
from homeiot.core.slots import day_readings, days_to_read, last_slot, slot_reading, slot_times

NOW = datetime(2025, 12, 16, 16, 47, tzinfo=UTC)  # 2025-12-17 01:47 JST


def test_a_day_has_48_slots_from_jst_midnight() -> None:
    slots = slot_times(date(2025, 12, 17))
    assert len(slots) == 48
    assert slots[0] == datetime(2025, 12, 16, 15, tzinfo=UTC)  # 00:00 JST
    assert slots[-1] == datetime(2025, 12, 17, 14, 30, tzinfo=UTC)  # 23:30 JST


def test_last_slot() -> None:
    assert last_slot(NOW) == datetime(2025, 12, 16, 16, 30, tzinfo=UTC)
    assert last_slot(datetime(2025, 12, 16, 16, 30, tzinfo=UTC)).minute == 30


def test_days_to_read() -> None:
    assert days_to_read(NOW, None, 2) == [1, 0]  # nothing known: yesterday and today
    assert days_to_read(NOW, None, 0) == []
    # the last slot published was 23:30 JST yesterday: only today
    assert days_to_read(NOW, datetime(2025, 12, 16, 14, 30, tzinfo=UTC), 5) == [0]
    # 23:00 JST yesterday: 23:30 is still missing, across midnight
    assert days_to_read(NOW, datetime(2025, 12, 16, 14, tzinfo=UTC), 5) == [1, 0]
    # a week ago, capped at what the setting allows
    assert days_to_read(NOW, datetime(2025, 12, 9, 14, tzinfo=UTC), 3) == [2, 1, 0]


def test_day_readings_skip_the_future_the_known_and_the_missing() -> None:
    values: list[float | None] = [100.0 + i for i in range(48)]
    values[2] = None  # the meter has no value for 01:00
    out = day_readings("meter1", date(2025, 12, 17), values, now=NOW,
                       after=datetime(2025, 12, 16, 15, tzinfo=UTC))  # 00:00 JST published
    assert [(r.ts, r.fixed_energy_normal_kwh) for r in out] == [
        (datetime(2025, 12, 16, 15, 30, tzinfo=UTC), 101.0),  # 00:30; 01:00 has no value
        (datetime(2025, 12, 16, 16, 30, tzinfo=UTC), 103.0),  # 01:30; 02:00 is in the future
    ]
    assert all(r.ts == r.fixed_ts and r.power_w is None for r in out)
    with pytest.raises(ValueError, match="48 values"):
        day_readings("meter1", date(2025, 12, 17), values[:47], now=NOW, after=None)


def test_a_slot_reading_round_trips_and_is_keyed_by_its_half_hour() -> None:
    at = datetime(2025, 12, 16, 15, 30, tzinfo=UTC)
    reading = slot_reading("meter1", at, 1234.5)
    payload = codec.encode(reading)
    assert b"power_w" not in payload
    assert codec.decode(payload, "meter1") == reading
    line = lineprotocol.encode_reading(reading)
    assert line.endswith(f" {int(at.timestamp() * 1000)}")
    assert "power_w" not in line
    assert "fixed_energy_normal_kwh=1234.5" in line


def test_only_a_slot_reading_goes_without_power() -> None:
    at = datetime(2025, 12, 16, 15, 30, tzinfo=UTC)
    with pytest.raises(InvalidReadingError, match="power_w"):
        Reading("meter1", at, 0, None)
    with pytest.raises(InvalidReadingError, match="power_w"):  # fixed_ts is not its ts
        Reading("meter1", NOW, 0, None, fixed_ts=at, fixed_energy_normal_kwh=1.0)
