"""ingest(): the gateway's plain-payload path must give exactly what the checked path gives.

The plain path (``_plain_point``) builds a point without a :class:`Reading`; whenever it answers,
its point must equal the checked path's, and whenever the checked path refuses, it must not
answer (so the refusal and its message stay the checked path's)."""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from homeiot.core import codec, ingest
from homeiot.core.ingest import Point, Rejection, Rules
from homeiot.core.reading import Reading

RULES = Rules("home/power", "meter_readings", timedelta(minutes=5))
NOW = datetime(2025, 12, 16, 15, 0, tzinfo=UTC)
TOPIC = "home/power/meter1"


def both(payload: bytes, now: datetime = NOW) -> tuple[Point | None, Point | Rejection]:
    return (ingest._plain_point(RULES, "meter1", payload, now),
            ingest._checked(RULES, "meter1", payload, now))


def assert_agree(payload: bytes, now: datetime = NOW) -> Point | None:
    plain, checked = both(payload, now)
    if plain is not None:
        assert plain == checked
        assert type(plain.ts) is datetime
        assert plain.ts.tzinfo is UTC
    assert ingest.ingest(RULES, TOPIC, payload, now) == checked
    return plain


def test_a_publishers_payload_takes_the_plain_path() -> None:
    reading = Reading("meter1", NOW - timedelta(seconds=1), 42, 532.0, current_r_a=3.5,
                      current_t_a=1.0, energy_normal_kwh=12345.6, energy_reverse_kwh=0.0)
    point = assert_agree(codec.encode(reading))
    assert point is not None
    assert point.line == ("meter_readings,source=meter1 seq=42i,power_w=532.0,current_r_a=3.5,"
                          "current_t_a=1.0,energy_normal_kwh=12345.6,energy_reverse_kwh=0.0 "
                          "1765897199000")


@pytest.mark.parametrize(("payload", "refusal"), [
    # each is plain JSON the plain path reads, then must leave to the checked path
    (b'{"v":1,"ts":"2025-12-16T15:05:00.001Z","seq":1,"power_w":1.0}', "in the future"),
    (b'{"v":1,"ts":"2025-02-30T15:00:00.000Z","seq":1,"power_w":1.0}', "not a real date"),
    (b'{"v":1,"ts":"1999-12-31T23:59:59.999Z","seq":1,"power_w":1.0}', "outside 2000..2199"),
    (b'{"v":1,"ts":"2025-12-16T15:00:00+09:00","seq":1,"power_w":1.0}', "UTC timestamp"),
    (b'{"v":1,"ts":"2025-12-16T15:00:00.000Z","seq":-1,"power_w":1.0}', "outside 0..2**63-1"),
    (b'{"v":1,"ts":"2025-12-16T15:00:00.000Z","seq":9223372036854775808,"power_w":1.0}',
     "outside 0..2**63-1"),
    (b'{"v":1,"ts":"2025-12-16T15:00:00.000Z","seq":1,"power_w":1e7}', "plausible range"),
    (b'{"v":1,"ts":"2025-12-16T15:00:00.000Z","seq":1,"power_w":1.0,'
     b'"energy_normal_kwh":-0.5}', "plausible range"),
    (b'{"v":1,"ts":"2025-12-16T15:00:00.000Z","seq":1,"power_w":null}', "null is not allowed"),
    (b'{"v":2,"ts":"2025-12-16T15:00:00.000Z","seq":1,"power_w":1.0}', "schema version"),
    (b'{"v":1,"ts":"2025-12-16T15:00:00.000Z","seq":1}', "power_w"),
    (b'{"v":1,"ts":"2025-12-16T15:00:00.000Z","seq":1,"power_w":1.0,"x":1.0}', "unknown key"),
    (b'{"v":1,"ts":"2025-12-16T15:00:00.000Z","seq":1,"power_w":"1"}', "must be a number"),
    (b'{"v":1,"ts":"2025-12-16T15:00:00.000Z","seq":1,"power_w":true}', "must be a number"),
    (b'{"v":1,"ts":"2025-12-16T15:00:00.000Z","seq":1,"power_w":1.0,'
     b'"fixed_energy_normal_kwh":1.0}', "together"),
    (b'{"v":1,"ts":"2025-12-16T15:00:00.000Z","seq":1,"power_w":1.0' + b" " * 4100 + b"}",
     "more than 4096"),
])
def test_every_refusal_is_the_checked_paths(payload: bytes, refusal: str) -> None:
    plain, checked = both(payload)
    assert plain is None
    assert isinstance(checked, Rejection)
    assert refusal in checked.reason
    assert ingest.ingest(RULES, TOPIC, payload, NOW) == checked


def test_integers_and_slot_readings_are_stored_by_the_checked_path() -> None:
    for payload in (b'{"v":1,"ts":"2025-12-16T15:00:00.000Z","seq":1,"power_w":100}',
                    b'{"v":1,"ts":"2025-12-16T15:00:00.000Z","seq":1,"energy_normal_kwh":1.5,'
                    b'"fixed_ts":"2025-12-16T15:00:00.000Z","fixed_energy_normal_kwh":1.5}'):
        plain, checked = both(payload)
        assert plain is None
        assert isinstance(checked, Point)


def test_the_newest_allowed_time_is_stored_and_one_millisecond_more_is_not() -> None:
    edge = b'{"v":1,"ts":"2025-12-16T15:05:00.000Z","seq":1,"power_w":1.0}'
    assert assert_agree(edge) is not None
    assert isinstance(both(edge, NOW - timedelta(milliseconds=1))[1], Rejection)


stamps = st.datetimes(min_value=datetime(1999, 12, 31), max_value=datetime(2200, 1, 2),
                      timezones=st.just(UTC))
FIELDS = ("power_w", "current_r_a", "current_t_a", "energy_normal_kwh", "energy_reverse_kwh")
# In range for every field (the energies must be >= 0).
plausible = st.floats(0, 1e4)
anything = st.one_of(
    st.none(), st.booleans(), st.text(max_size=3), st.floats(), st.integers(-2**70, 2**70),
    st.integers(0, 2**63 - 1), st.sampled_from([0.0, -0.0, 1e6, 1e6 + 1, -1e6, 1e4, -1e4 - 0.5,
                                                1e12, 1e12 * 1.01, 5e-324, -5e-324, 2**63]))
# At most one key spoiled (else nearly every payload is refused for several reasons at once).
spoilers = st.none() | st.tuples(st.sampled_from([*FIELDS, "v", "seq", "ts", "fixed_ts",
                                                  "fixed_energy_normal_kwh", "x"]), anything)


@settings(max_examples=800)
@given(ts=stamps, seq=st.integers(0, 2**63 - 1), power=plausible | plausible.map(lambda f: -f),
       values=st.lists(st.none() | plausible, min_size=4, max_size=4), spoiler=spoilers,
       ahead_ms=st.integers(-1000, 1000), digits=st.sampled_from([0, 1, 2, 3]),
       order=st.randoms(use_true_random=False))
def test_the_plain_path_agrees_with_the_checked_path(ts: datetime, seq: int, power: float,
                                                     values: list[float | None],
                                                     spoiler: tuple[str, Any] | None,
                                                     ahead_ms: int, digits: int,
                                                     order: random.Random) -> None:
    """Payloads as a publisher (or a broken one) writes them — valid ones, and ones with one key
    spoiled by any JSON value — at times near every limit (2000, 2200, now + the allowed
    minutes, to the millisecond), with 0-3 fraction digits."""
    stamp = ts.strftime("%Y-%m-%dT%H:%M:%S") + (
        "." + f"{ts.microsecond // 1000:03d}"[:digits] if digits else "") + "Z"
    obj: dict[str, Any] = {"v": 1, "ts": stamp, "seq": seq, "power_w": power}
    obj.update((name, value) for name, value in zip(FIELDS[1:], values, strict=True)
               if value is not None)
    if spoiler is not None:
        obj[spoiler[0]] = spoiler[1]
    keys = list(obj)
    order.shuffle(keys)  # publishers write the keys in field order; others need not
    payload = json.dumps({key: obj[key] for key in keys}, separators=(",", ":")).encode()
    at_limit = datetime.fromisoformat(stamp) - RULES.max_ahead
    assert_agree(payload, at_limit + timedelta(milliseconds=ahead_ms))
    assert_agree(payload)


@settings(max_examples=300)
@given(st.binary(max_size=200) | st.text(max_size=120).map(str.encode))
def test_the_plain_path_agrees_on_anything(payload: bytes) -> None:
    """Arbitrary bytes: the plain path never raises, and stays out of the way."""
    assert_agree(payload)


def test_a_measurement_line_protocol_cannot_carry_is_refused_by_name() -> None:
    rules = Rules("home/power", "#meter", timedelta(minutes=5))
    payload = b'{"v":1,"ts":"2025-12-16T15:00:00.000Z","seq":1,"power_w":1.0}'
    assert ingest._plain_point(rules, "meter1", payload, NOW) is None
    outcome = ingest.ingest(rules, TOPIC, payload, NOW)
    assert isinstance(outcome, Rejection)
    assert "starts with '#'" in outcome.reason
