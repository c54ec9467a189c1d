"""/readyz's InfluxDB ping gate: one real ping per interval, whatever the request rate."""

from __future__ import annotations

import threading
import time

import pytest

from homeiot.core.errors import RejectedError, TransientError
from homeiot.services.api import PingGate


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_answer_is_reused_within_the_interval_and_refreshed_after() -> None:
    clock = _Clock()
    answers: list[Exception | None] = [None, TransientError("influxd is down"), None]
    calls: list[float] = []

    def ping() -> None:
        calls.append(clock.now)
        answer = answers[len(calls) - 1]
        if answer is not None:
            raise answer

    gate = PingGate(ping, interval_s=5.0, monotonic=clock)
    assert gate.ok() is True
    clock.now += 4.9
    assert gate.ok() is True
    assert len(calls) == 1
    clock.now += 0.1
    assert gate.ok() is False
    assert len(calls) == 2
    clock.now += 1.0
    assert gate.ok() is False
    assert len(calls) == 2
    clock.now += 5.0
    assert gate.ok() is True
    assert len(calls) == 3
    assert gate.pings == 3


def test_a_refused_ping_counts_as_not_ready() -> None:
    def ping() -> None:
        raise RejectedError("401 from InfluxDB")

    assert PingGate(ping).ok() is False


def test_concurrent_requests_share_one_ping() -> None:
    started = threading.Event()

    def slow_ping() -> None:
        started.set()
        time.sleep(0.2)

    gate = PingGate(slow_ping, interval_s=60.0)
    results: list[bool] = []
    threads = [threading.Thread(target=lambda: results.append(gate.ok())) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert started.is_set()
    assert results == [True] * 20
    assert gate.pings == 1


def test_an_unexpected_ping_error_is_not_swallowed() -> None:
    def broken() -> None:
        raise ValueError("a bug")

    with pytest.raises(ValueError, match="a bug"):  # surfaces (a 500), never reads as "not ready"
        PingGate(broken).ok()


def test_while_a_ping_hangs_other_callers_get_the_last_answer_at_once() -> None:
    clock = _Clock()
    release = threading.Event()
    in_ping = threading.Event()
    calls: list[float] = []

    def ping() -> None:
        calls.append(clock.now)
        if len(calls) == 2:  # the second ping hangs (InfluxDB slow) until released
            in_ping.set()
            release.wait(10)

    gate = PingGate(ping, interval_s=5.0, monotonic=clock)
    assert gate.ok() is True
    clock.now += 6.0
    slow = threading.Thread(target=gate.ok)
    slow.start()
    assert in_ping.wait(5)
    answers: list[bool] = []
    asker = threading.Thread(target=lambda: answers.extend(gate.ok() for _ in range(10)))
    asker.start()
    asker.join(5)
    # Answered while the ping still hangs (a caller queueing behind it would still be waiting).
    assert not asker.is_alive()
    assert not release.is_set()
    assert answers == [True] * 10
    assert len(calls) == 2
    release.set()
    slow.join(5)
    assert not slow.is_alive()
