"""The gateway against real Mosquitto and influxd: delivery, replays, sessions, dead letters,
fault drills (SIGKILL, InfluxDB down, broker restart) and a shared-subscription pair."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from homeiot.adapters.deadletters import DeadLetter, DeadLetterStore
from homeiot.adapters.influx import InfluxClient
from homeiot.config import GatewaySettings, InfluxSettings
from homeiot.core import codec
from homeiot.core.reading import Reading
from tests.conftest import USERS
from tests.gateway_support import (
    T0,
    Publisher,
    RunningGateway,
    count_points,
    gateway_settings,
    reading,
    received_by_a_new_gateway,
    start_connected_gateway,
    start_gateway_process,
    stored_seqs,
    wait_until,
)
from tests.services import Mosquitto, Pki, start_influxd, start_mosquitto

pytestmark = pytest.mark.integration


@pytest.fixture
def broker(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[Mosquitto]:
    """A broker of this test's own, free to be restarted."""
    server = start_mosquitto(tmp_path_factory.mktemp("broker"), pki, USERS)
    yield server
    server.process.stop()


@pytest.fixture
def publisher(broker: Mosquitto) -> Iterator[Publisher]:
    pub = Publisher(broker, "meter1")
    yield pub
    pub.close()


def test_readings_are_stored_with_tags_fields_and_timestamps(
        broker: Mosquitto, influx_db: InfluxSettings, tmp_path: Path, publisher: Publisher) -> None:
    gw = RunningGateway(gateway_settings(broker, influx_db, tmp_path))
    meter2 = Publisher(broker, "meter2")
    try:
        publisher.publish_readings(reading(i) for i in range(100))
        meter2.publish_readings(reading(i, "meter2") for i in range(50))
        publisher.wait_all()
        meter2.wait_all()
        wait_until(lambda: count_points(influx_db) == 150, what="150 points")
    finally:
        meter2.close()
        gw.stop()
    assert stored_seqs(influx_db) == list(range(100))
    assert stored_seqs(influx_db, "meter2") == list(range(50))
    with InfluxClient(influx_db) as influx:
        row = next(influx.rows('SELECT * FROM "meter_readings" WHERE "seq" = 7 AND '
                               '"source" = \'meter1\''))
    expected = reading(7)
    assert row == {"time": 1765897200000 + 7000, "source": "meter1", "seq": 7,
                   "power_w": expected.power_w, "current_r_a": 1.5,
                   "energy_normal_kwh": expected.energy_normal_kwh}
    assert gw.gateway.metrics.registry.get_sample_value("homeiot_points_written_total") == 150


def test_a_replayed_reading_is_stored_once(
        broker: Mosquitto, influx_db: InfluxSettings, tmp_path: Path, publisher: Publisher) -> None:
    gw = RunningGateway(gateway_settings(broker, influx_db, tmp_path))
    try:
        publisher.publish_readings([reading(1), reading(1), reading(2)])
        publisher.wait_all()
        wait_until(lambda: gw.gateway.metrics.registry.get_sample_value(
            "homeiot_points_written_total") == 3, what="3 writes")
    finally:
        gw.stop()
    assert stored_seqs(influx_db) == [1, 2]


def test_messages_published_while_the_gateway_is_away_arrive(
        broker: Mosquitto, influx_db: InfluxSettings, tmp_path: Path, publisher: Publisher) -> None:
    settings = gateway_settings(broker, influx_db, tmp_path)
    RunningGateway(settings).stop()  # registers the persistent session and its subscription
    publisher.publish_readings(reading(i) for i in range(300))
    publisher.wait_all()
    gw = RunningGateway(settings)
    try:
        wait_until(lambda: count_points(influx_db) == 300, what="the backlog")
    finally:
        gw.stop()
    assert stored_seqs(influx_db) == list(range(300))


def test_invalid_payloads_become_dead_letters_and_can_be_replayed(
        broker: Mosquitto, influx_db: InfluxSettings, tmp_path: Path, publisher: Publisher) -> None:
    settings = gateway_settings(broker, influx_db, tmp_path)
    gw = RunningGateway(settings)
    future = (datetime.now(UTC) + timedelta(days=2)).strftime("%Y-%m-%dT%H:%M:%S.000Z")
    bad = [b"not json", b'{"v":1}', json.dumps({"v": 1, "ts": future, "seq": 1,
                                                 "power_w": 1.0}).encode(),
           b'{"v":1,"ts":"2025-12-16T15:00:00Z","seq":1,"power_w":1e9}']
    try:
        publisher.publish_readings([reading(1)])
        for payload in bad:
            publisher.publish("meter1", payload)
        publisher.publish_readings([reading(2)])
        publisher.wait_all()
        wait_until(lambda: gw.store.count() == 4, what="4 dead letters")
        wait_until(lambda: count_points(influx_db) == 2, what="the valid readings")
        assert gw.gateway.metrics.registry.get_sample_value("homeiot_dead_letters_total") == 4
    finally:
        gw.stop()
    store = DeadLetterStore(settings.dead_letter_db)
    letters = [s.letter for s in store.list()]
    assert [letter.payload for letter in letters] == bad
    assert "not valid UTF-8 JSON" in letters[0].error
    assert "missing required key" in letters[1].error
    assert "in the future" in letters[2].error
    assert "plausible range" in letters[3].error
    assert all(letter.topic == "home/power/meter1" for letter in letters)

    # Once the cause is gone (here: the future timestamp became the present), a replay stores it.
    env = {"GATEWAY_MAX_FUTURE_S": str(4 * 86400)}
    result = _cli(settings, ["replay-dead-letters"], env)
    assert "replayed 1, still invalid 3, refused by InfluxDB 0" in result.stdout, \
        result.stdout + result.stderr
    assert store.count() == 3
    assert count_points(influx_db) == 3
    store.close()


def test_replay_goes_on_past_a_letter_influxdb_refuses(
        broker: Mosquitto, influx_db: InfluxSettings, tmp_path: Path) -> None:
    settings = gateway_settings(broker, influx_db, tmp_path)
    # current_t_a exists as an integer in this shard, so a letter carrying it as a float is
    # refused (field type conflict, lines not named); the letters before and after are stored.
    with InfluxClient(influx_db) as client:
        client.write([f"meter_readings,source=other current_t_a=1i {int(T0.timestamp() * 1000)}"])
    conflicting = Reading("meter1", T0 + timedelta(seconds=5), 5, 10.0, current_t_a=2.5)
    store = DeadLetterStore(settings.dead_letter_db)
    payloads = [codec.encode(reading(i)) for i in range(5)] + [codec.encode(conflicting)] + \
        [codec.encode(reading(i)) for i in range(6, 10)] + [b"still not json"]
    store.add([DeadLetter("home/power/meter1", p, "InfluxDB was down", T0) for p in payloads])
    result = _cli(settings, ["replay-dead-letters"], {})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "replayed 9, still invalid 1, refused by InfluxDB 1" in result.stdout, result.stdout
    assert "InfluxDB refused it" in result.stderr
    assert "field type conflict" in result.stderr
    left = [s.letter for s in store.list()]
    assert [letter.payload for letter in left] == [codec.encode(conflicting), b"still not json"]
    assert "field type conflict" in left[0].error
    assert stored_seqs(influx_db) == [i for i in range(10) if i != 5]
    store.close()


def _cli(settings: GatewaySettings, args: list[str], extra: dict[str, str]
         ) -> subprocess.CompletedProcess[str]:
    import sys  # noqa: PLC0415

    from tests.gateway_support import gateway_env  # noqa: PLC0415
    return subprocess.run([sys.executable, "-m", "homeiot.cli.gateway", *args],
                          env={**gateway_env(settings), **extra}, capture_output=True, text=True,
                          timeout=60, check=False)


def test_bad_configuration_exits_2_naming_the_variable(
        broker: Mosquitto, influx_db: InfluxSettings, tmp_path: Path) -> None:
    settings = gateway_settings(broker, influx_db, tmp_path)
    result = _cli(settings, ["run"], {"GATEWAY_BATCH_SIZE": "lots"})
    assert result.returncode == 2
    assert "GATEWAY_BATCH_SIZE: must be an integer" in result.stdout
    result = _cli(settings, ["run"], {"API_TOKENS": "short"})
    assert result.returncode == 2
    assert "API_TOKENS" in result.stdout
    assert "gw-pass" not in result.stdout + result.stderr


bad_payloads = st.one_of(
    st.binary(max_size=64),
    st.text(max_size=40).map(str.encode),
    st.fixed_dictionaries({"v": st.integers(2, 9), "ts": st.just("2025-12-16T15:00:00Z"),
                           "seq": st.integers(0, 10), "power_w": st.floats(-10, 10)}),
    st.fixed_dictionaries({"v": st.just(1), "ts": st.text(max_size=30), "seq": st.integers(0),
                           "power_w": st.floats(allow_nan=False)}),
    st.fixed_dictionaries({"v": st.just(1), "ts": st.just("2025-12-16T15:00:00Z"),
                           "seq": st.integers(0), "power_w": st.floats(2e6, 1e300)}),
    st.fixed_dictionaries({"v": st.just(1), "ts": st.just("2025-12-16T15:00:00Z"),
                           "seq": st.integers(max_value=-1), "power_w": st.floats(-10, 10)}),
    st.fixed_dictionaries({"v": st.just(1), "ts": st.just("2025-12-16T15:00:00Z"), "seq": st.just(1),
                           "power_w": st.just(1.0)},
                          optional={"extra": st.integers()}).filter(lambda d: "extra" in d),
    st.dictionaries(st.sampled_from(["v", "ts", "seq"]), st.integers()),
).map(lambda p: p if isinstance(p, bytes) else json.dumps(p).encode())


def test_ten_thousand_bad_payloads_never_crash_it(
        broker: Mosquitto, influx_db: InfluxSettings, tmp_path: Path, publisher: Publisher) -> None:
    settings = gateway_settings(broker, influx_db, tmp_path, batch_size=2000)
    gw = RunningGateway(settings)
    published: list[bytes] = []

    @settings_for_feed
    @given(bad_payloads)
    def feed(payload: bytes) -> None:
        published.append(payload)
        publisher.publish("meter1", payload)
        if len(published) % 10 == 0:  # interleave a valid reading every ten bad ones
            publisher.publish_readings([reading(len(published) // 10)])
        if len(published) % 500 == 0:
            publisher.wait_all()

    try:
        feed()
        publisher.wait_all()
        valid = len(published) // 10
        # Identical payloads (Hypothesis repeats some) are one letter: the store keeps one per
        # message.
        wait_until(lambda: gw.store.count() == len(set(published)), 120, "every dead letter")
        wait_until(lambda: count_points(influx_db) == valid, 60, "every valid reading")
        assert gw.gateway.fatal_error is None
    finally:
        gw.stop()
    assert len(published) >= 10_000
    assert stored_seqs(influx_db) == list(range(1, valid + 1))
    store = DeadLetterStore(settings.dead_letter_db)
    assert all(s.letter.error for s in store.list(limit=1000))
    store.close()


settings_for_feed = settings(max_examples=10_000, deadline=None, database=None,
                             suppress_health_check=list(HealthCheck))


# --- fault drills ----------------------------------------------------------------------------


def _stream(publisher: Publisher, start: int, stop: int, rate_hz: float) -> None:
    for seq in range(start, stop):
        publisher.publish_readings([reading(seq, step_ms=10)])
        time.sleep(1 / rate_hz)


def test_drill_gateway_sigkill_mid_stream(
        broker: Mosquitto, influx_db: InfluxSettings, tmp_path: Path, publisher: Publisher) -> None:
    settings = gateway_settings(broker, influx_db, tmp_path, batch_size=200, batch_age_s=0.2)
    log = tmp_path / "gateway.log"
    proc = start_connected_gateway(settings, log)
    try:
        time.sleep(0.3)
        _stream(publisher, 0, 600, 300)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        _stream(publisher, 600, 1200, 300)  # published while no gateway runs
        publisher.wait_all()
        proc = start_gateway_process(settings, log)
        wait_until(lambda: count_points(influx_db) == 1200, 60, "all 1200 readings")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)
    assert stored_seqs(influx_db) == list(range(1200))  # each once: replays overwrite themselves


def test_when_the_stream_stops_its_last_acks_go_out_without_another_message(
        broker: Mosquitto, influx_db: InfluxSettings, tmp_path: Path, publisher: Publisher) -> None:
    """Acks ride on paho's thread before the next message; when none comes, the writer sends
    them: a gateway killed (no shutdown flush) after the stream went quiet leaves nothing for the
    broker to deliver again."""
    settings = gateway_settings(broker, influx_db, tmp_path, batch_size=5000, batch_age_s=0.2)
    proc = start_connected_gateway(settings, tmp_path / "gateway.log")
    try:
        time.sleep(0.5)  # subscribed
        publisher.publish_readings(reading(i) for i in range(30))
        publisher.wait_all()
        wait_until(lambda: count_points(influx_db) == 30, 20, "30 readings stored")
        time.sleep(1.0)  # the stream is quiet: the writer has handed the acks over
    finally:
        proc.kill()
        proc.wait(10)
    assert received_by_a_new_gateway(settings) == 0


def test_sigterm_stops_cleanly_within_ten_seconds(
        broker: Mosquitto, influx_db: InfluxSettings, tmp_path: Path, publisher: Publisher) -> None:
    settings = gateway_settings(broker, influx_db, tmp_path, batch_size=5000, batch_age_s=30)
    proc = start_connected_gateway(settings, tmp_path / "gateway.log")
    time.sleep(0.3)
    publisher.publish_readings(reading(i) for i in range(100))
    publisher.wait_all()
    time.sleep(0.5)  # received, but the 30 s batch age has not come
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == 0
    assert time.monotonic() - started < 10
    assert count_points(influx_db) == 100  # flushed on the way out
    # ... and acknowledged: a new gateway on the same session receives none of them again.
    assert received_by_a_new_gateway(settings) == 0


def test_drill_influxdb_down_for_30_seconds_under_load(
        broker: Mosquitto, tmp_path_factory: pytest.TempPathFactory, tmp_path: Path,
        publisher: Publisher) -> None:
    server = start_influxd(tmp_path_factory.mktemp("influxd-drill"))
    server.admin('CREATE DATABASE "drill"')
    influx = InfluxSettings(url=server.url, database="drill", timeout_s=2)
    gw = RunningGateway(gateway_settings(broker, influx, tmp_path, batch_size=100))
    try:
        _stream(publisher, 0, 300, 100)
        server.process.stop()
        _stream(publisher, 300, 3300, 100)  # 30 s of load while InfluxDB is down
        publisher.wait_all()
        assert not gw.gateway.influx_ok
        # Flow control: no more than Receive Maximum messages are held while InfluxDB is down.
        assert gw.gateway.pending <= gw.gateway.receive_maximum
        server.process.start()
        server.wait_ready()
        wait_until(lambda: count_points(influx) == 3300, 90, "all 3300 readings")
        assert stored_seqs(influx) == list(range(3300))
    finally:
        gw.stop()
        server.process.stop()


def test_drill_broker_restart(
        broker: Mosquitto, influx_db: InfluxSettings, tmp_path: Path) -> None:
    settings = gateway_settings(broker, influx_db, tmp_path)
    gw = RunningGateway(settings)
    try:
        publisher = Publisher(broker, "meter1")
        _stream(publisher, 0, 200, 200)
        publisher.wait_all()
        publisher.close()
        gw.gateway.stop()  # the gateway is away, the broker queues for its session ...
        publisher = Publisher(broker, "meter1")
        _stream(publisher, 200, 400, 400)
        publisher.wait_all()
        publisher.close()
        broker.process.restart()  # ... and keeps the queue across its own restart (persistence)
        gw.stop()
        gw = RunningGateway(settings)
        publisher = Publisher(broker, "meter1")
        _stream(publisher, 400, 500, 400)
        publisher.wait_all()
        publisher.close()
        wait_until(lambda: count_points(influx_db) == 500, 60, "all 500 readings")
    finally:
        gw.stop()
    assert stored_seqs(influx_db) == list(range(500))


def test_two_replicas_in_a_share_group_split_the_stream(
        broker: Mosquitto, influx_db: InfluxSettings, tmp_path: Path, publisher: Publisher) -> None:
    one = RunningGateway(gateway_settings(broker, influx_db, tmp_path, client_id="gw-a",
                                          share_group="gateways"))
    two = RunningGateway(gateway_settings(broker, influx_db, tmp_path, client_id="gw-b",
                                          share_group="gateways"))
    try:
        publisher.publish_readings(reading(i) for i in range(2000))
        publisher.wait_all()
        wait_until(lambda: count_points(influx_db) == 2000, 60, "2000 readings")
        time.sleep(0.5)
        counts = [g.gateway.metrics.registry.get_sample_value("homeiot_messages_received_total")
                  for g in (one, two)]
    finally:
        one.stop()
        two.stop()
    assert stored_seqs(influx_db) == list(range(2000))
    assert sum(c or 0 for c in counts) == 2000  # none delivered twice
    assert all(counts), f"both replicas took a share: {counts}"


def test_reading_helper_is_valid() -> None:
    assert codec.decode(codec.encode(reading(3)), "meter1").ts == T0 + timedelta(seconds=3)
    assert replace(reading(3), seq=4).seq == 4
