"""The InfluxDB answer → policy table."""

from __future__ import annotations

import pytest

from homeiot.core.writes import Policy, WriteAnswer, backoff, policy


@pytest.mark.parametrize(("answer", "expected"), [
    (WriteAnswer(204), Policy.WRITTEN),
    (WriteAnswer(400, "unable to parse", ("bad line",)), Policy.PARTIAL),
    (WriteAnswer(400, "partial write: field type conflict ... dropped=1"), Policy.ISOLATE),
    (WriteAnswer(422, "unprocessable"), Policy.ISOLATE),
    (WriteAnswer(413, "Request Entity Too Large"), Policy.SPLIT),
    (WriteAnswer(401, "authorization failed"), Policy.STALL),
    (WriteAnswer(403, "forbidden"), Policy.STALL),
    (WriteAnswer(404, "database not found"), Policy.STALL),  # never a reason to drop data
    (WriteAnswer(429, "too many requests"), Policy.RETRY),
    (WriteAnswer(500, "engine"), Policy.RETRY),
    (WriteAnswer(503, "unavailable"), Policy.RETRY),
    (WriteAnswer(None, "timed out"), Policy.RETRY),
    (WriteAnswer(302, "moved"), Policy.RETRY),
])
def test_each_answer_has_one_policy(answer: WriteAnswer, expected: Policy) -> None:
    assert policy(answer) is expected


def test_backoff_doubles_to_its_cap() -> None:
    delays = [backoff(None)]
    for _ in range(6):
        delays.append(backoff(delays[-1]))
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
