from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from homeiot.core.errors import EncodingError
from homeiot.core.lineprotocol import FieldValue, encode_line, encode_reading
from homeiot.core.reading import Reading, epoch_ms


def test_reading_point() -> None:
    ts = datetime(2025, 12, 16, 15, 0, 0, 5000, tzinfo=UTC)
    line = encode_reading(Reading("meter1", ts, 3, 512, energy_normal_kwh=1.25))
    assert line == "meter_readings,source=meter1 seq=3i,power_w=512.0,energy_normal_kwh=1.25 " \
                   "1765897200005"


@pytest.mark.parametrize(
    ("measurement", "tags", "fields", "expected"),
    [
        ("m", {}, {"f": 1.5}, "m f=1.5 1"),
        ("my m,x", {}, {"f": 1}, r"my\ m\,x f=1i 1"),
        ("m=x", {}, {"f": True}, "m=x f=true 1"),
        ("m", {"b": "2", "a": "x y"}, {"f": False}, r"m,a=x\ y,b=2 f=false 1"),
        ("m", {"k,=": "v,= "}, {"f k": 1.0}, r"m,k\,\==v\,\=\  f\ k=1.0 1"),
        ("m", {"t": "東京"}, {"s": 'say "hi" \\ ok'}, r'm,t=東京 s="say \"hi\" \\ ok" 1'),
        ("m", {"p": r"C:\x"}, {"f": 1}, r"m,p=C:\x f=1i 1"),
        ("m", {}, {"big": 2**63 - 1}, f"m big={2**63 - 1}i 1"),
    ],
)
def test_escaping(measurement: str, tags: dict[str, str], fields: dict[str, FieldValue],
                  expected: str) -> None:
    assert encode_line(measurement, tags, fields, 1) == expected


@pytest.mark.parametrize(
    ("measurement", "tags", "fields", "message"),
    [
        ("m", {}, {"f": float("nan")}, "not finite"),
        ("m", {}, {"f": float("-inf")}, "not finite"),
        ("m", {}, {}, "at least one field"),
        ("", {}, {"f": 1}, "measurement must be a non-empty"),
        ("#m", {}, {"f": 1}, "comment"),
        ("m", {"k": ""}, {"f": 1}, "value must be a non-empty"),
        ("m", {"": "v"}, {"f": 1}, "tag key must be a non-empty"),
        ("m", {"k": "a\nb"}, {"f": 1}, "newline"),
        ("m", {"k": "a\\"}, {"f": 1}, "backslash"),
        ("m", {"k": "a\\\\b"}, {"f": 1}, "backslash"),
        ("m", {"k": "a\\,b"}, {"f": 1}, "backslash"),
        ("m", {}, {"time": 1}, "reserved"),
        ("m", {"_x": "v"}, {"f": 1}, "reserved"),
        ("m", {}, {"f": 2**63}, "64 bits"),
        ("m", {}, {"f": "a\rb"}, "newline"),
        ("m", {}, {"f": None}, "unsupported type"),
    ],
)
def test_unencodable_values_are_errors(measurement: str, tags: dict[str, str],
                                       fields: dict[str, object], message: str) -> None:
    with pytest.raises(EncodingError, match=message):
        encode_line(measurement, tags, fields, 1)  # type: ignore[arg-type]


optional_current = st.none() | st.floats(-1e4, 1e4)
optional_energy = st.none() | st.floats(0, 1e12)


@given(
    source=st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}", fullmatch=True),
    ts=st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2199, 12, 31),
                    timezones=st.just(UTC)),
    seq=st.integers(0, 2**63 - 1), power=st.floats(-1e6, 1e6), current_r=optional_current,
    current_t=optional_current, energy_n=optional_energy, energy_r=optional_energy,
    fixed=st.none() | st.tuples(st.datetimes(min_value=datetime(2000, 1, 1),
                                             max_value=datetime(2199, 12, 31),
                                             timezones=st.just(UTC)), st.floats(0, 1e12)),
    measurement=st.sampled_from(["meter_readings", "my readings", "a,b"]),
)
def test_fast_reading_encoder_equals_the_generic_one(
        source: str, ts: datetime, seq: int, power: float, current_r: float | None,
        current_t: float | None, energy_n: float | None, energy_r: float | None,
        fixed: tuple[datetime, float] | None, measurement: str) -> None:
    reading = Reading(source, ts, seq, power, current_r_a=current_r, current_t_a=current_t,
                      energy_normal_kwh=energy_n, energy_reverse_kwh=energy_r,
                      fixed_ts=fixed[0] if fixed else None,
                      fixed_energy_normal_kwh=fixed[1] if fixed else None)
    generic = encode_line(measurement, {"source": source}, reading.fields(), epoch_ms(reading.ts))
    assert encode_reading(reading, measurement) == generic


def test_status_lines_are_floats_under_their_component() -> None:
    from datetime import UTC, datetime  # noqa: PLC0415

    from homeiot.core.status import status_line  # noqa: PLC0415

    line = status_line("gateway", datetime(2026, 1, 2, tzinfo=UTC), dead_letters=3,
                       broker_cert_days_left=29.5)
    assert line == ("homeiot_status,component=gateway dead_letters=3.0,broker_cert_days_left=29.5 "
                    "1767312000000")
