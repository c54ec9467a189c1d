"""One MQTT message in, one InfluxDB point or one rejection out — the same for the live gateway
and for ``replay-dead-letters``, so a letter replayed today meets exactly today's rules."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, NamedTuple

from homeiot.core import codec
from homeiot.core.errors import InvalidDataError
from homeiot.core.lineprotocol import encode_reading, reading_line
from homeiot.core.reading import (
    FLOAT_BOUNDS,
    FLOAT_FIELDS,
    MAX_SEQ,
    MAX_TS,
    MIN_TS,
    check_not_future,
    epoch_ms,
)
from homeiot.core.topics import source_from_topic


class Point(NamedTuple):
    """A reading ready for InfluxDB: its line-protocol ``line`` and who/what it is. (A named
    tuple: one is made per message on the gateway's hot path, and a frozen dataclass costs five
    times as much to build.)"""

    source: str
    seq: int
    ts: datetime
    line: str


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why a message can never become a point (it belongs in the dead letters); ``source`` and
    ``seq`` when the topic and payload still name them (see :func:`codec.peek_seq`)."""

    reason: str
    source: str | None = None
    seq: int | None = None


@dataclass(frozen=True, slots=True)
class Rules:
    """What ingesting depends on: the base topic, the measurement, how far ahead a reading's
    time may be."""

    base_topic: str
    measurement: str
    max_ahead: timedelta


def ingest(rules: Rules, topic: str, payload: bytes, now: datetime) -> Point | Rejection:
    """Decode ``payload`` received on ``topic`` at ``now`` into a point, or say why not."""
    try:
        source = source_from_topic(rules.base_topic, topic)
    except InvalidDataError as exc:
        return Rejection(str(exc))
    point = _plain_point(rules, source, payload, now)
    return point if point is not None else _checked(rules, source, payload, now)


def _checked(rules: Rules, source: str, payload: bytes, now: datetime) -> Point | Rejection:
    """Any payload, through :class:`Reading`'s checks: the point, or the refusal naming why."""
    try:
        reading = check_not_future(codec.decode(payload, source), now, rules.max_ahead)
        line = encode_reading(reading, rules.measurement)
    except InvalidDataError as exc:
        return Rejection(str(exc), source, codec.peek_seq(payload))
    return Point(source, reading.seq, reading.ts, line)


#: The keys of a plain live reading (no half-hour slot): the plain path's only shape.
_PLAIN_KEYS = frozenset({"v", "ts", "seq", *FLOAT_FIELDS}) - {"fixed_energy_normal_kwh"}
_PLAIN_REQUIRED = frozenset({"v", "ts", "seq", "power_w"})
_PLAIN_BOUNDS = tuple((name, *FLOAT_BOUNDS[name]) for name in FLOAT_FIELDS
                      if name in _PLAIN_KEYS)


def _plain_point(rules: Rules, source: str, payload: bytes, now: datetime) -> Point | None:
    """The gateway's hot path: the point of a plain, valid live reading — a compact object of
    float values, as publishers send it — built without a :class:`Reading` (whose checks cost
    most of a message's time on paho's thread). None for anything else: the checked path then
    decides, so every refusal and its message stay its own. Checks exactly what the checked path
    checks for such a payload; a differential property test holds the two equal."""
    obj = codec.plain_object(payload) if len(payload) <= codec.MAX_PAYLOAD_BYTES else None
    if obj is None or obj["v"] != codec.SCHEMA_VERSION or not \
            _PLAIN_REQUIRED <= obj.keys() <= _PLAIN_KEYS:
        return None  # v and seq are ints (plain_object checks), values are not nested
    seq = obj["seq"]
    try:
        ts = codec.parse_ts("ts", obj["ts"])  # in UTC: the pattern ends in "Z"
    except InvalidDataError:
        return None
    if not 0 <= seq <= MAX_SEQ or not MIN_TS <= ts < MAX_TS or ts - now > rules.max_ahead:
        return None
    values = _plain_values(obj)
    if values is None:
        return None
    try:
        line = reading_line(rules.measurement, source, seq, values, ts_ms=epoch_ms(ts))
    except InvalidDataError:
        return None  # a measurement line protocol cannot carry: the checked path names it
    return Point(source, seq, ts, line)


def _plain_values(obj: dict[str, Any]) -> list[tuple[str, float]] | None:
    """The present values in field order, if each is a float in its range; else None."""
    values = []
    for name, low, high in _PLAIN_BOUNDS:
        value = obj.get(name)
        if value is None:
            if name in obj:
                return None  # null: refused by the checked path
            continue
        if type(value) is not float or not low <= value <= high:
            return None  # an integer, a bool, a string, out of range: the checked path decides
        values.append((name, value))
    return values

