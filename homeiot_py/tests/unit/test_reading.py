from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from homeiot.core.errors import InvalidReadingError, TopicError
from homeiot.core.reading import Reading, epoch_ms, validate_source

TS = datetime(2025, 12, 16, 15, 0, 0, 123456, tzinfo=UTC)


def test_normalises_to_utc_milliseconds() -> None:
    jst = timezone(timedelta(hours=9))
    reading = Reading("meter1", TS.astimezone(jst), 1, 500)
    assert reading.ts == datetime(2025, 12, 16, 15, 0, 0, 123000, tzinfo=UTC)
    assert reading.ts.tzinfo is UTC
    assert reading.power_w == 500.0
    assert isinstance(reading.power_w, float)


def test_is_frozen() -> None:
    reading = Reading("meter1", TS, 1, 500.0)
    with pytest.raises(AttributeError):
        reading.power_w = 1.0  # type: ignore[misc]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"ts": datetime(2025, 1, 1)}, "ts"),
        ({"ts": datetime(1999, 12, 31, tzinfo=UTC)}, "ts"),
        ({"seq": -1}, "seq"),
        ({"seq": True}, "seq"),
        ({"seq": 1.0}, "seq"),
        ({"power_w": float("nan")}, "power_w"),
        ({"power_w": float("inf")}, "power_w"),
        ({"power_w": 2_000_000.0}, "power_w"),
        ({"power_w": True}, "power_w"),
        ({"current_r_a": 1e9}, "current_r_a"),
        ({"energy_normal_kwh": -0.1}, "energy_normal_kwh"),
        ({"fixed_energy_normal_kwh": 1.0}, "fixed_ts"),
        ({"fixed_ts": TS}, "fixed_ts"),
    ],
)
def test_rejects_impossible_values(kwargs: dict[str, object], field: str) -> None:
    args: dict[str, object] = {"source": "meter1", "ts": TS, "seq": 1, "power_w": 1.0}
    args.update(kwargs)
    with pytest.raises(InvalidReadingError) as info:
        Reading(**args)  # type: ignore[arg-type]
    assert info.value.field == field
    assert field in str(info.value)


@pytest.mark.parametrize("source", ["", "a/b", "+", "#", "a b", "-x", "x" * 64, "é", "a\nb"])
def test_rejects_bad_sources(source: str) -> None:
    with pytest.raises(TopicError, match="source"):
        validate_source(source)


def test_fields_are_present_values_only_with_stable_types() -> None:
    reading = Reading("meter1", TS, 7, 100, current_r_a=1.5, fixed_ts=TS,
                      fixed_energy_normal_kwh=12.0)
    assert reading.fields() == {
        "seq": 7, "power_w": 100.0, "current_r_a": 1.5, "fixed_energy_normal_kwh": 12.0,
        "fixed_ts_ms": epoch_ms(reading.ts),
    }


def test_epoch_ms() -> None:
    assert epoch_ms(datetime(1970, 1, 1, 0, 0, 1, 2000, tzinfo=UTC)) == 1002
