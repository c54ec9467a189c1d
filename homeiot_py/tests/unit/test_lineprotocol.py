from __future__ import annotations

from datetime import UTC, datetime

import pytest

from homeiot.core.errors import EncodingError
from homeiot.core.lineprotocol import FieldValue, encode_line, encode_reading
from homeiot.core.reading import Reading


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
