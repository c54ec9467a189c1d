"""One MQTT message in, one InfluxDB point or one rejection out — the same for the live gateway
and for ``replay-dead-letters``, so a letter replayed today meets exactly today's rules."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from homeiot.core import codec
from homeiot.core.errors import InvalidDataError
from homeiot.core.lineprotocol import encode_reading
from homeiot.core.reading import check_not_future
from homeiot.core.topics import source_from_topic


@dataclass(frozen=True, slots=True)
class Point:
    """A reading ready for InfluxDB: its line-protocol ``line`` and who/what it is."""

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
    try:
        reading = check_not_future(codec.decode(payload, source), now, rules.max_ahead)
        line = encode_reading(reading, rules.measurement)
    except InvalidDataError as exc:
        return Rejection(str(exc), source, codec.peek_seq(payload))
    return Point(source, reading.seq, reading.ts, line)
