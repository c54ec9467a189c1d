"""The ``broute`` meter with momonga's real code against a fake Wi-SUN dongle on a pty."""

from __future__ import annotations

import logging
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime
from pathlib import Path

import pytest

from homeiot.adapters.broute import BrouteBackend
from homeiot.adapters.influx import InfluxClient
from homeiot.adapters.outbox import Outbox
from homeiot.config import InfluxSettings, load_publisher
from homeiot.core.errors import MeterAuthError, MeterLinkDeadError, MeterUnavailableError
from homeiot.core.lineprotocol import encode_reading
from homeiot.core.link import LinkPolicy, LinkTiming, Step
from homeiot.core.reading import Reading, epoch_ms
from homeiot.core.slots import METER_TZ, slot_reading, slot_times
from homeiot.services.publisher import Publisher
from tests.conftest import USERS
from tests.drill import Subscriber, outbox_state, publisher_env
from tests.fake_dongle import NO_VALUE, FakeDongle
from tests.services import Mosquitto, Pki, start_mosquitto, vm_hwm_mb

pytestmark = pytest.mark.integration

RBID = "0" * 31 + "1"
PASSWORD = "ABCDEFGHIJKL"
# momonga's pacing, shortened for the fake dongle (the defaults suit a real radio).
TUNING = {"internal_xmit_interval": 0.05}
# The production bounds scaled down for the fake dongle (a scan and a join take milliseconds here).
TIMING = LinkTiming(request_timeout_s=1.5, answer_timeout_s=0.5, request_retries=2,
                    scan_timeout_s=3, join_timeout_s=3, close_timeout_s=2, probe_timeout_s=0.5)
POLICY = LinkPolicy(max_misses=2, dead_after_s=90, rejoin_attempts=1, reset_attempts=3,
                    backoff_min_s=0.2, backoff_max_s=1)


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
def dongle(tmp_path: Path) -> Iterator[FakeDongle]:
    fake = FakeDongle(RBID, PASSWORD, VALUES, link=tmp_path / "ttyWISUN0")
    yield fake
    fake.close()


def backend(dongle: FakeDongle, password: str = PASSWORD, policy: LinkPolicy = POLICY,
            clock: Callable[[], datetime] = lambda: datetime.now(UTC),
            history_days: int = 2) -> BrouteBackend:
    return BrouteBackend("meter1", RBID, password, dongle.path, timing=TIMING, policy=policy,
                         tuning=TUNING, clock=clock, history_days=history_days)


def test_a_normal_session(dongle: FakeDongle) -> None:
    meter = backend(dongle)
    meter.open()
    try:
        reading = meter.read()
        slots = meter.pending()
    finally:
        meter.close()
    assert reading.power_w == 532.0
    assert reading.current_r_a == 3.5
    assert reading.current_t_a is None  # 0x7FFE: no T phase on a single-phase meter
    assert reading.energy_normal_kwh == pytest.approx(1_234_567.8)
    assert reading.energy_reverse_kwh == 0.0
    # The 30-minute energy is its own slot reading, keyed by its half hour (00:30 JST).
    assert reading.fixed_ts is None
    assert slots == [slot_reading("meter1", datetime(2025, 12, 16, 15, 30, tzinfo=UTC),
                                  1_234_567.0)]
    # One request for the live values, then the half-hourly one (this meter keeps no history:
    # 0xE5 was refused once, and the history is not asked for again).
    assert [0xE5] in dongle.requests
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


@dataclass
class Outage:
    """What a fault cost: readings before it, the time to notice it and to recover."""

    before: list[Reading]
    detected_s: float
    recovered_s: float
    steps: list[Step]


def ride_out(meter: BrouteBackend, fault: Callable[[], None], heal: Callable[[], None], *,
             heal_at: Step, limit_s: float = 60, interval_s: float = 0.1) -> Outage:
    """Read like the publisher does; inject ``fault``; ``heal`` it once the ladder reaches
    ``heal_at`` (so the test does not race the backoff); return once a reading arrives again.
    Every reading taken stays in ``before`` (the outbox's view)."""
    before = [meter.read() for _ in range(3)]
    fault()
    started = time.monotonic()
    detected = healed_at = None
    steps: list[Step] = []
    while True:
        now = time.monotonic()
        assert now - started < limit_s, f"no recovery in {limit_s} s; ladder at {steps}"
        if healed_at is None and meter.link.action.step is heal_at:
            heal()
            healed_at = now
        try:
            reading = meter.read()
        except MeterUnavailableError:
            step = meter.link.action.step
            if not steps or steps[-1] is not step:
                steps.append(step)
            if detected is None and step in (Step.REJOIN, Step.RESET):
                detected = time.monotonic() - started
            time.sleep(interval_s)
            continue
        if detected is None:  # a fault the ladder never saw (it healed first)
            detected = float("nan")
        assert reading.power_w == 532.0
        return Outage(before, detected, time.monotonic() - started, steps)


def report(name: str, outage: Outage, dongle: FakeDongle) -> None:
    print(f"broute_fault fault={name} detect_s={outage.detected_s:.2f} "
          f"recover_s={outage.recovered_s:.2f} steps={'>'.join(s.value for s in outage.steps)} "
          f"resets={dongle.resets} scans={dongle.scans}")


def test_a_silent_dongle_is_reset_and_comes_back(dongle: FakeDongle,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="homeiot.adapters.broute")
    meter = backend(dongle)
    meter.open()
    try:
        def mute() -> None:
            dongle.silent = True

        def unmute() -> None:
            dongle.silent = False

        outage = ride_out(meter, mute, unmute, heal_at=Step.RESET)
    finally:
        meter.close()
    report("dongle_silent", outage, dongle)
    assert len(outage.before) == 3  # taken before the fault, never lost
    # Detected by the liveness rule after exactly two unanswered requests (the time it took is a
    # figure, printed above and measured with the production bounds by make bench-broute).
    assert outage.steps[:2] == [Step.REREQUEST, Step.REJOIN]
    assert Step.RESET in outage.steps  # the rejoin's probe found the dongle silent
    assert dongle.resets >= 2  # the first open and at least one recovery reset
    messages = [r.getMessage() for r in caplog.records]
    assert sum("re-requesting" in m for m in messages) == 1  # each step logged once
    assert any("rejoin" in m and "no valid answer for 2 request(s)" in m for m in messages)
    assert any("did not answer SKINFO" in m for m in messages)
    assert any("link healthy again" in m for m in messages)


def test_fail_er05_to_skscan_is_reset_away(dongle: FakeDongle) -> None:
    meter = backend(dongle)
    dongle.scan_er05 = 2  # the first open and the next attempt
    meter.open()  # does not raise: the ladder takes it from here
    assert meter.link.action.step is Step.REJOIN
    deadline = time.monotonic() + 30
    while True:
        try:
            reading = meter.read()
            break
        except MeterUnavailableError:
            assert time.monotonic() < deadline
            time.sleep(0.1)
    meter.close()
    assert reading.power_w == 532.0
    assert dongle.scans == 3
    assert dongle.scan_er05 == 0


def test_er05_forever_ends_in_exit(dongle: FakeDongle) -> None:
    meter = backend(dongle, policy=LinkPolicy(max_misses=2, rejoin_attempts=1, reset_attempts=2,
                                              backoff_min_s=0.1, backoff_max_s=0.2))
    dongle.scan_er05 = 100
    meter.open()
    deadline = time.monotonic() + 30
    with pytest.raises(MeterLinkDeadError, match=r"ER05|InvalidArgument"):  # noqa: PT012
        while True:
            assert time.monotonic() < deadline
            try:
                meter.read()
            except MeterUnavailableError:
                time.sleep(0.05)
    assert dongle.scans == 4  # the first open, one rejoin, two resets — then no more


def test_a_session_that_expires_without_an_event_is_rejoined(dongle: FakeDongle) -> None:
    meter = backend(dongle)
    meter.open()
    try:
        outage = ride_out(meter, dongle.expire_silently, lambda: None, heal_at=Step.REJOIN)
    finally:
        meter.close()
    report("session_expired_silently", outage, dongle)
    assert outage.steps == [Step.REREQUEST, Step.REJOIN]
    assert dongle.resets == 1  # a rejoin was enough: no SKRESET


def test_a_meter_that_stops_answering_while_the_dongle_lives(dongle: FakeDongle) -> None:
    meter = backend(dongle)
    meter.open()

    def mute() -> None:
        dongle.meter_silent = True

    def unmute() -> None:
        dongle.meter_silent = False

    try:
        outage = ride_out(meter, mute, unmute, heal_at=Step.RESET)
    finally:
        meter.close()
    report("meter_silent", outage, dongle)
    assert outage.steps[:2] == [Step.REREQUEST, Step.REJOIN]


def test_the_serial_device_disappears_and_comes_back(dongle: FakeDongle) -> None:
    meter = backend(dongle)
    meter.open()
    try:
        outage = ride_out(meter, dongle.unplug, dongle.replug, heal_at=Step.RESET)
    finally:
        meter.close()
    report("device_gone", outage, dongle)
    assert outage.steps[0] is Step.RESET  # no re-request, no rejoin: the port must be reopened


def test_a_device_that_never_comes_back_ends_in_exit(dongle: FakeDongle) -> None:
    meter = backend(dongle, policy=LinkPolicy(reset_attempts=2, backoff_min_s=0.1,
                                              backoff_max_s=0.2))
    meter.open()
    meter.read()
    dongle.unplug()
    deadline = time.monotonic() + 20
    with pytest.raises(MeterLinkDeadError, match="does not exist"):  # noqa: PT012
        while True:
            assert time.monotonic() < deadline
            try:
                meter.read()
            except MeterUnavailableError:
                time.sleep(0.05)


def test_the_publisher_keeps_every_reading_and_exits_4_when_the_link_is_dead(
        tmp_path_factory: pytest.TempPathFactory, pki: Pki, tmp_path: Path,
        dongle: FakeDongle) -> None:
    """Through the real publisher process and a real Mosquitto: the dongle is pulled for good;
    the ladder climbs to its end, the process exits 4 (systemd restarts it), and every reading
    taken before is either delivered or still in the outbox."""
    now = datetime.now(METER_TZ)  # a recent half hour: the outbox drops what is 30 days old
    dongle.values[0xEA] = fixed_time_edt(now.year, now.month, now.day, now.hour,
                                         now.minute - now.minute % 30, 12_345_670)
    broker = start_mosquitto(tmp_path_factory.mktemp("broker"), pki, USERS)
    subscriber = Subscriber(broker)
    outbox = tmp_path / "outbox.sqlite"
    env = {**publisher_env(broker, outbox, 5), "PUBLISHER_METER": "broute", "BROUTE_ID": RBID,
           "BROUTE_PASSWORD": PASSWORD, "BROUTE_DEVICE": dongle.path,
           "BROUTE_REQUEST_TIMEOUT_S": "1.5", "BROUTE_ANSWER_TIMEOUT_S": "0.5",
           "BROUTE_SCAN_TIMEOUT_S": "5", "BROUTE_JOIN_TIMEOUT_S": "5",
           "BROUTE_RESET_ATTEMPTS": "2", "BROUTE_BACKOFF_MIN_S": "0.2",
           "BROUTE_BACKOFF_MAX_S": "0.5"}
    proc = subprocess.Popen([sys.executable, "-m", "homeiot.cli.publisher"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = 0.0
    try:
        deadline = time.monotonic() + 90
        while len(subscriber.snapshot()) < 5:
            peak = max(peak, vm_hwm_mb(proc.pid))
            assert proc.poll() is None, proc.communicate()[0]
            assert time.monotonic() < deadline, "no readings from the fake dongle"
            time.sleep(0.1)
        dongle.unplug()
        unplugged = time.monotonic()
        while proc.poll() is None and time.monotonic() - unplugged < 60:  # the ladder climbs
            peak = max(peak, vm_hwm_mb(proc.pid))
            time.sleep(0.02)
        output, _ = proc.communicate(timeout=60)
        exited_after = time.monotonic() - unplugged
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        subscriber.client.disconnect()
        subscriber.client.loop_stop()
        broker.process.stop()
    print(f"broute_publisher_exit exit={proc.returncode} after_s={exited_after:.2f} "
          f"rss_mb={peak:.1f}")
    assert proc.returncode == 4, output
    assert "giving up" in output
    assert "the serial device is gone" in output
    assert PASSWORD not in output
    _, next_seq = outbox_state(outbox)
    con = sqlite3.connect(f"file:{outbox}?mode=ro", uri=True)
    try:
        waiting = {seq for (seq,) in con.execute("SELECT seq FROM outbox WHERE source = 'meter1'")}
    finally:
        con.close()
    assert next_seq >= 5
    assert set(subscriber.snapshot()) | waiting == set(range(next_seq))  # nothing lost


# --- filling gaps from the meter's own history (0xE5 + 0xE2) -----------------------------------

RAW_PER_SLOT = 5  # 0.5 kWh a half hour, in the meter's 0.1 kWh unit
RAW_AT_EPOCH = 12_000_000


class Clock:
    """The wall clock of the backend and the meter, moved by the test."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def raw_at(at: datetime) -> int:
    """The meter's cumulative counter at a half hour: a steady 0.5 kWh per slot."""
    return RAW_AT_EPOCH + RAW_PER_SLOT * int(at.timestamp() - 1.7e9) // 1800


def seed(dongle: FakeDongle, now: datetime, days: int = 5) -> None:
    """The meter's memory up to ``now``: each day's 48 values, "no value" after now; 0xEA too."""
    today = now.astimezone(METER_TZ).date()
    dongle.history = {}
    for back in range(days):
        day = date.fromordinal(today.toordinal() - back)
        dongle.history[day] = [raw_at(at) if at <= now else NO_VALUE for at in slot_times(day)]
    last = max(at for at in slot_times(today) + slot_times(
        date.fromordinal(today.toordinal() - 1)) if at <= now)
    jst = last.astimezone(METER_TZ)
    dongle.values[0xEA] = fixed_time_edt(jst.year, jst.month, jst.day, jst.hour, jst.minute,
                                         raw_at(last))


def run_once(dongle: FakeDongle, clock: Clock, history_days: int = 2) -> list[Reading]:
    """A publisher run: start, one read, stop. Returns the slot readings it handed over."""
    meter = backend(dongle, clock=clock, history_days=history_days)
    meter.open()
    try:
        meter.read()
        return meter.pending()
    finally:
        meter.close()


def jst(year: int, month: int, day: int, hour: int, minute: int) -> datetime:
    return datetime(year, month, day, hour, minute, tzinfo=METER_TZ).astimezone(UTC)


def test_half_hours_missed_while_the_publisher_was_off_come_back(
        tmp_path: Path, influx_db: InfluxSettings) -> None:
    clock = Clock(jst(2025, 12, 17, 0, 47))
    dongle = FakeDongle(RBID, PASSWORD, VALUES, link=tmp_path / "tty", history={},
                        today=lambda: clock.now.astimezone(METER_TZ).date())
    try:
        seed(dongle, clock.now)
        first = run_once(dongle, clock)
        clock.now = jst(2025, 12, 17, 2, 5)  # off for 01:00 and 01:30; 02:00 is new
        seed(dongle, clock.now)
        second = run_once(dongle, clock)
    finally:
        dongle.close()
    yesterday = slot_times(date(2025, 12, 16))
    assert [r.ts for r in first] == [*yesterday, jst(2025, 12, 17, 0, 0), jst(2025, 12, 17, 0, 30)]
    today = [jst(2025, 12, 17, h, m) for h, m in ((0, 0), (0, 30), (1, 0), (1, 30), (2, 0))]
    assert {r.ts for r in second} == {*yesterday, *today}  # 48 of 48 yesterday, every one today
    for reading in first + second:
        assert reading.ts == reading.fixed_ts
        assert reading.fixed_energy_normal_kwh == pytest.approx(raw_at(reading.ts) / 10)
    # Published twice, stored once: a slot is the same series and timestamp every time.
    with InfluxClient(influx_db) as influx:
        influx.write([encode_reading(replace(r, seq=i)) for i, r in enumerate(first + second)])
        rows = list(influx.rows('SELECT "fixed_energy_normal_kwh" FROM "meter_readings"'))
    assert len(first + second) == 50 + 53
    assert len(rows) == 48 + 5
    assert sorted(row["time"] for row in rows) == sorted(epoch_ms(t) for t in yesterday + today)


def test_a_three_hour_publisher_outage_is_refilled(tmp_path: Path) -> None:
    """The figure for the issue's closing note: slots refilled after a 3-hour outage."""
    clock = Clock(jst(2025, 12, 17, 9, 10))
    dongle = FakeDongle(RBID, PASSWORD, VALUES, link=tmp_path / "tty", history={},
                        today=lambda: clock.now.astimezone(METER_TZ).date())
    try:
        seed(dongle, clock.now)
        before = {r.ts for r in run_once(dongle, clock)}
        clock.now = jst(2025, 12, 17, 12, 10)  # off from 09:10 to 12:10
        seed(dongle, clock.now)
        after = {r.ts for r in run_once(dongle, clock)}
    finally:
        dongle.close()
    missing = {at for at in slot_times(date(2025, 12, 17)) if at <= clock.now} - before
    refilled = missing & after
    print(f"broute_refill outage_h=3 slots_missing={len(missing)} slots_refilled={len(refilled)}")
    assert len(missing) == 6  # 09:30 … 12:00
    assert refilled == missing
    today = [at for at in slot_times(date(2025, 12, 17)) if at <= clock.now]
    assert (before | after) >= set(today)  # every half hour of the day so far: 25 of 25


def test_a_gap_across_midnight_and_several_days_after_a_dead_link(tmp_path: Path) -> None:
    clock = Clock(jst(2025, 12, 14, 23, 10))
    dongle = FakeDongle(RBID, PASSWORD, VALUES, link=tmp_path / "tty", history={},
                        today=lambda: clock.now.astimezone(METER_TZ).date())
    seed(dongle, clock.now)
    meter = backend(dongle, clock=clock, history_days=5)
    meter.open()
    try:
        meter.read()
        before = meter.pending()
        assert before[-1].ts == jst(2025, 12, 14, 23, 0)
        dongle.unplug()  # the link dies for two days and a bit
        with pytest.raises(MeterUnavailableError):
            meter.read()
        clock.now = jst(2025, 12, 17, 0, 40)
        seed(dongle, clock.now)
        dongle.replug()
        deadline = time.monotonic() + 30
        while True:
            try:
                meter.read()
                break
            except MeterUnavailableError:
                assert time.monotonic() < deadline
                time.sleep(0.1)
        after = meter.pending()
    finally:
        meter.close()
        dongle.close()
    missing = [at for at in slot_times(date(2025, 12, 14)) + slot_times(date(2025, 12, 15))
               + slot_times(date(2025, 12, 16)) + slot_times(date(2025, 12, 17))
               if jst(2025, 12, 14, 23, 0) < at <= clock.now]
    assert [r.ts for r in after] == missing  # 23:30, two full days, 00:00 and 00:30: no more
    assert len(missing) == 1 + 48 + 48 + 2
    assert sum(r == [0xE2] for r in dongle.requests) == 5 + 4  # start-up: 5 days; then 4


def test_a_meter_without_history_is_logged_once_and_keeps_working(
        dongle: FakeDongle, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="homeiot.adapters.broute")
    assert dongle.history is None
    meter = backend(dongle)
    meter.open()
    try:
        readings = [meter.read() for _ in range(3)]
        dongle.unplug()
        dongle.replug()
        deadline = time.monotonic() + 30
        while True:  # after a recovery the history would be due again: still not asked
            try:
                readings.append(meter.read())
                break
            except MeterUnavailableError:
                assert time.monotonic() < deadline
                time.sleep(0.1)
    finally:
        meter.close()
    assert all(r.power_w == 532.0 for r in readings)
    warnings = [r for r in caplog.records if "keeps no half-hour history" in r.getMessage()]
    assert len(warnings) == 1
    assert sum(r == [0xE5] for r in dongle.requests) == 1


class FlakyMeter:
    """A meter whose driver misbehaves in every way the meter loop must survive."""

    def __init__(self) -> None:
        self.calls = 0

    def open(self) -> None:
        """Nothing to open."""

    def close(self) -> None:
        """Nothing to close."""

    def read(self) -> Reading:
        self.calls += 1
        if self.calls % 3 == 1:
            raise RuntimeError("a driver surprise")
        if self.calls % 3 == 2:
            raise MeterUnavailableError("the B-route link is down; reset pending")
        return Reading("meter1", datetime.now(UTC), 0, 100.0 + self.calls)

    def pending(self) -> list[Reading]:
        if self.calls == 2:
            raise RuntimeError("a history surprise")
        at = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
        return [slot_reading("meter1", at, 10.0)] if self.calls == 3 else []


def test_meter_exceptions_never_stop_the_pump(mosquitto: Mosquitto, tmp_path: Path,
                                              caplog: pytest.LogCaptureFixture) -> None:
    settings = load_publisher(publisher_env(mosquitto, tmp_path / "outbox.sqlite", 50))
    made: list[Publisher] = []
    ready = threading.Event()

    def run() -> None:  # the outbox (SQLite) lives on the pump's thread, as in the process
        outbox = Outbox(settings.outbox)
        made.append(Publisher(settings, FlakyMeter(), outbox))
        ready.set()
        try:
            made[0].run()
        finally:
            outbox.close()

    runner = threading.Thread(target=run)
    runner.start()
    assert ready.wait(10)
    publisher = made[0]
    try:
        deadline = time.monotonic() + 30
        # No gateway here, so nothing is receipted (deleted): published to the broker is the
        # measure that the pump goes on.
        while publisher.published < 10:
            assert time.monotonic() < deadline, f"published {publisher.published}"
            assert runner.is_alive()
            time.sleep(0.05)
    finally:
        publisher.stop()
        runner.join(10)
    assert publisher.exit_code == 0
    messages = [r.getMessage() for r in caplog.records]
    assert sum("reset pending" in m for m in messages) >= 1
    assert any("half-hour slots failed" in m for m in messages)
    assert any("unexpectedly" in m for m in messages)


class _QuietMeter(FlakyMeter):
    def read(self) -> Reading:
        raise MeterUnavailableError("not used: the test hands readings to the pump itself")

    def pending(self) -> list[Reading]:
        return []


def test_a_slot_at_a_live_readings_millisecond_is_kept(mosquitto: Mosquitto, tmp_path: Path) -> None:
    """A live reading stamped exactly on a half hour and that half hour's slot reading are two
    readings (the slot carries the half hour's energy): both are committed. A second live sample
    in the same millisecond is still one reading."""
    settings = load_publisher(publisher_env(mosquitto, tmp_path / "outbox.sqlite", 50))
    outbox = Outbox(settings.outbox)
    try:
        publisher = Publisher(settings, _QuietMeter(), outbox)
        at = datetime(2026, 11, 28, 15, 30, tzinfo=UTC)
        live = Reading("meter1", at, 0, 321.0)
        for reading in (live, slot_reading("meter1", at, 10.5), live):
            publisher._readings.put(reading)
        publisher._commit()
        rows = outbox.after(0, 2**62, 10)
        assert len(rows) == 2
        assert [r.seq for r in rows] == [0, 1]
    finally:
        outbox.close()


def test_a_failed_join_after_a_restart_is_the_radio_not_the_password(dongle: FakeDongle,
                                                                     tmp_path: Path) -> None:
    """After an exit 4 (link dead) systemd starts a new process. Its first join failing must
    not be taken for refused credentials (exit 3, never restarted): the credentials joined
    before, which the backend remembers beside the outbox."""
    marker = tmp_path / "broute-joined"

    def make(password: str = PASSWORD) -> BrouteBackend:
        return BrouteBackend("meter1", RBID, password, dongle.path, timing=TIMING, policy=POLICY,
                             tuning=TUNING, joined_marker=marker)

    first = make()
    first.open()
    first.close()
    assert marker.stat().st_mode & 0o777 == 0o600
    assert RBID not in marker.read_text()
    assert PASSWORD not in marker.read_text()
    dongle.password = "RADIOTROUBLE"  # the meter now refuses every join: a radio fault here
    again = make()
    again.open()  # no MeterAuthError: the failure goes to the ladder
    again.close()
    # Credentials that never joined are still refused at once.
    with pytest.raises(MeterAuthError):
        make("NEWPASSWORD1").open()
