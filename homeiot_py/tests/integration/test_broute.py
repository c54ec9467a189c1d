"""The ``broute`` meter with momonga's real code against a fake Wi-SUN dongle on a pty."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest

from homeiot.adapters.broute import BrouteBackend
from homeiot.core.errors import MeterAuthError, MeterUnavailableError
from tests.fake_dongle import FakeDongle

pytestmark = pytest.mark.integration

RBID = "0" * 31 + "1"
PASSWORD = "ABCDEFGHIJKL"
# momonga's pacing, shortened for the fake dongle (the defaults suit a real radio).
TUNING = {"internal_xmit_interval": 0.05, "recv_timeout": 1, "xmit_retries": 2, "xmit_timeout": 3}


def fixed_time_edt(year: int, month: int, day: int, hour: int, minute: int, raw: int) -> bytes:
    return year.to_bytes(2, "big") + bytes([month, day, hour, minute, 0]) + raw.to_bytes(4, "big")


VALUES = {
    0xE7: (532).to_bytes(4, "big", signed=True),
    0xE8: (35).to_bytes(2, "big", signed=True) + (0x7FFE).to_bytes(2, "big"),  # single-phase
    0xE0: (12_345_678).to_bytes(4, "big"),
    0xE3: (0).to_bytes(4, "big"),
    0xE1: b"\x01",  # 0.1 kWh
    0xD3: (1).to_bytes(4, "big"),
    0xD7: b"\x08",
    0xEA: fixed_time_edt(2025, 12, 17, 0, 30, 12_345_670),
}


@pytest.fixture
def dongle() -> Iterator[FakeDongle]:
    fake = FakeDongle(RBID, PASSWORD, VALUES)
    yield fake
    fake.close()


def backend(dongle: FakeDongle, password: str = PASSWORD) -> BrouteBackend:
    return BrouteBackend("meter1", RBID, password, dongle.path, reconnect_min_s=0.5,
                         reconnect_max_s=2, tuning=TUNING)


def test_a_normal_session(dongle: FakeDongle) -> None:
    meter = backend(dongle)
    meter.open()
    try:
        reading = meter.read()
    finally:
        meter.close()
    assert reading.power_w == 532.0
    assert reading.current_r_a == 3.5
    assert reading.current_t_a is None  # 0x7FFE: no T phase on a single-phase meter
    assert reading.energy_normal_kwh == pytest.approx(1_234_567.8)
    assert reading.energy_reverse_kwh == 0.0
    assert reading.fixed_ts == datetime(2025, 12, 16, 15, 30, tzinfo=UTC)  # 00:30 JST
    assert reading.fixed_energy_normal_kwh == pytest.approx(1_234_567.0)
    # One request for the live values, then the half-hourly one.
    assert sorted(dongle.requests[-2]) == [0xE0, 0xE3, 0xE7, 0xE8]
    assert dongle.requests[-1] == [0xEA]
    assert PASSWORD not in repr(meter)


def test_no_data_codes_become_absent_fields(dongle: FakeDongle) -> None:
    meter = backend(dongle)
    meter.open()
    try:
        dongle.values[0xE8] = (0x7FFF).to_bytes(2, "big") + (0x8000).to_bytes(2, "big")
        dongle.values[0xE0] = (0xFFFFFFFF).to_bytes(4, "big")  # not a value momonga knows
        dongle.values[0xE3] = (0xFFFFFFFE).to_bytes(4, "big")
        reading = meter.read()
        assert reading.current_r_a is None
        assert reading.current_t_a is None
        assert reading.energy_normal_kwh is None
        assert reading.energy_reverse_kwh is None
        dongle.values[0xE7] = (0x7FFFFFFF).to_bytes(4, "big")  # overflow: no power, no reading
        with pytest.raises(MeterUnavailableError, match="no instantaneous power"):
            meter.read()
    finally:
        meter.close()


def test_the_counter_rollover_keeps_energy_growing(dongle: FakeDongle) -> None:
    meter = backend(dongle)
    meter.open()
    try:
        dongle.values[0xE0] = (99_999_990).to_bytes(4, "big")
        before = meter.read().energy_normal_kwh
        dongle.values[0xE0] = (5).to_bytes(4, "big")  # passed 10^8 and started again
        after = meter.read().energy_normal_kwh
    finally:
        meter.close()
    assert before == pytest.approx(9_999_999.0)
    assert after == pytest.approx(10_000_000.5)
    # After a restart the backend resumes from the last published energy (the outbox keeps it),
    # so the wrap keeps counting.
    restarted = BrouteBackend("meter1", RBID, PASSWORD, dongle.path, tuning=TUNING,
                              resume_kwh=(after, None))
    restarted.open()
    try:
        dongle.values[0xE0] = (7).to_bytes(4, "big")
        resumed = restarted.read().energy_normal_kwh
    finally:
        restarted.close()
    assert resumed == pytest.approx(10_000_000.7)


def test_a_refused_password_stops_at_once(dongle: FakeDongle) -> None:
    meter = backend(dongle, password="WRONGPASSWRD")
    with pytest.raises(MeterAuthError, match="BROUTE_PASSWORD") as info:
        meter.open()
    assert dongle.join_attempts == 1  # not retried: that could lock the B-route account
    assert "WRONGPASSWRD" not in str(info.value)


def test_session_expiry_and_reauthentication(dongle: FakeDongle) -> None:
    meter = backend(dongle)
    meter.open()
    try:
        assert meter.read().power_w == 532.0
        dongle.expire_session()  # EVENT 29, then the dongle re-authenticates: EVENT 25
        time.sleep(0.5)
        dongle.values[0xE7] = (600).to_bytes(4, "big", signed=True)
        assert meter.read().power_w == 600.0
    finally:
        meter.close()


def test_a_silent_dongle_is_reported_and_the_session_comes_back(dongle: FakeDongle) -> None:
    meter = backend(dongle)
    meter.open()
    try:
        dongle.silent = True
        started = time.monotonic()
        with pytest.raises(MeterUnavailableError):
            meter.read()
        assert time.monotonic() - started < 60
        dongle.silent = False
        deadline = time.monotonic() + 30
        while True:  # the backend reconnects with backoff on its own
            try:
                assert meter.read().power_w == 532.0
                break
            except MeterUnavailableError:
                assert time.monotonic() < deadline
                time.sleep(0.5)
    finally:
        meter.close()
