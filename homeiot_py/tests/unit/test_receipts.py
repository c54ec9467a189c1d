"""Receipts on the wire, and what the gateway can still tell about a payload it rejects."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from homeiot.core import codec, receipts
from homeiot.core.errors import PayloadError, TopicError
from homeiot.core.ingest import Rejection, Rules, ingest


def test_a_receipt_round_trips_with_and_without_dead_letters() -> None:
    assert receipts.encode(((0, 41), (45, 45))) == b'{"v":1,"stored":[[0,41],[45,45]]}'
    wire = receipts.encode(((0, 41),), ((42, 42),))
    assert wire == b'{"v":1,"stored":[[0,41]],"dead":[[42,42]]}'
    assert receipts.decode(wire) == receipts.Body(((0, 41),), ((42, 42),))
    # A gateway from before dead letters were named: nothing is dead.
    assert receipts.decode(b'{"v":1,"stored":[[1,2]]}') == receipts.Body(((1, 2),), ())


@pytest.mark.parametrize("payload", [
    b"nope", b'{"v":2,"stored":[]}', b'{"v":1}', b'{"v":1,"stored":[],"dead":{}}',
    b'{"v":1,"stored":[],"dead":[[3,2]]}', b'{"v":1,"stored":[[true,2]]}',
])
def test_a_bad_receipt_is_a_payload_error(payload: bytes) -> None:
    with pytest.raises(PayloadError):
        receipts.decode(payload)


def test_the_source_of_a_receipt_comes_from_its_topic() -> None:
    assert receipts.source_of("homeiot/receipts", "homeiot/receipts/meter1") == "meter1"
    for topic in ("homeiot/receipts", "homeiot/other/meter1", "homeiot/receipts/a/b"):
        with pytest.raises(TopicError):
            receipts.source_of("homeiot/receipts", topic)


@pytest.mark.parametrize(("payload", "seq"), [
    (b'{"v":2,"ts":"x","seq":7}', 7),
    (b'{"v":1,"seq":0,"power_w":"high"}', 0),
    (b'{"seq":7,"seq":8}', None),  # which one? none
    (b'{"seq":true}', None),
    (b'{"seq":-1}', None),
    (b'{"seq":7.0}', None),
    (b"[7]", None),
    (b"\xff", None),
    (b'{"seq":7,"pad":"' + b"x" * 5000 + b'"}', None),
])
def test_peek_seq(payload: bytes, seq: int | None) -> None:
    assert codec.peek_seq(payload) == seq


def test_a_rejection_names_source_and_seq_when_it_can() -> None:
    rules = Rules("home/power", "meter_readings", timedelta(minutes=5))
    now = datetime(2025, 12, 16, tzinfo=UTC)
    future = b'{"v":1,"ts":"2026-01-01T00:00:00.000Z","seq":12,"power_w":1.0}'
    outcome = ingest(rules, "home/power/meter1", future, now)
    assert isinstance(outcome, Rejection)
    assert (outcome.source, outcome.seq) == ("meter1", 12)
    assert "future" in outcome.reason
    not_json = ingest(rules, "home/power/meter1", b"nope", now)
    assert isinstance(not_json, Rejection)
    assert (not_json.source, not_json.seq) == ("meter1", None)
    elsewhere = ingest(rules, "other/meter1", future, now)
    assert isinstance(elsewhere, Rejection)
    assert (elsewhere.source, elsewhere.seq) == (None, None)
