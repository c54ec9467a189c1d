"""The publisher: its outbox (real SQLite), its process under systemd-style notify, and the drill
against a real Mosquitto (broker outage + SIGKILL, nothing lost)."""

from __future__ import annotations

import logging
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from homeiot.adapters.outbox import Outbox
from homeiot.config import InfluxSettings, load_publisher, read_env_file
from homeiot.core import codec
from homeiot.core.errors import ConfigError
from homeiot.core.reading import Reading, epoch_ms
from tests.conftest import USERS
from tests.drill import outbox_seqs, outbox_state, publisher_env, run_drill, stored_seqs, wait_for
from tests.gateway_support import Publisher as GatewayTestPublisher
from tests.gateway_support import RunningGateway, gateway_settings
from tests.services import Pki, start_mosquitto

pytestmark = pytest.mark.integration

T0 = datetime(2025, 12, 16, 15, tzinfo=UTC)


def readings(n: int, start: int = 0, source: str = "meter1") -> list[Reading]:
    return [Reading(source, T0 + timedelta(seconds=start + i), 0, 100.0 + i) for i in range(n)]


def test_outbox_numbers_seq_on_across_restarts(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite"
    box = Outbox(path)
    first = box.add(readings(3) + readings(2, source="meter2"))
    assert [r.seq for r in first] == [0, 1, 2, 0, 1]
    box.close()
    box = Outbox(path)
    assert len(box) == 5
    assert [r.seq for r in box.add(readings(2, 10))] == [3, 4]
    rows = box.after(0, box.max_id(), 100)
    assert [codec.decode(r.payload, r.source).seq for r in rows] == [0, 1, 2, 0, 1, 3, 4]
    assert box.delete([rows[0].id, rows[0].id, 10_000]) == 1
    assert len(box) == 6
    assert box.last_energy("meter1") == (None, None)
    box.add([Reading("meter1", T0, 0, 1.0, energy_normal_kwh=12.5, energy_reverse_kwh=0.5)])
    box.add([Reading("meter1", T0, 0, 1.0, energy_normal_kwh=13.0)])  # reverse unknown this time
    box.close()
    reopened = Outbox(path)
    assert reopened.last_energy("meter1") == (13.0, 0.5)  # kept across a restart
    reopened.close()


def test_outbox_drops_the_oldest_when_full_and_says_so(tmp_path: Path,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    box = Outbox(tmp_path / "outbox.sqlite", max_rows=1000, max_age_days=1)
    box.add(readings(1200))
    assert len(box) == 1000
    assert "dropped the 200 oldest" in caplog.text
    oldest = box.after(0, box.max_id(), 1)[0]
    assert oldest.seq == 200
    with caplog.at_level(logging.WARNING):
        dropped = box.prune_older_than(epoch_ms(T0 + timedelta(days=1, seconds=500)))
    assert dropped == 300  # seconds 200..499 were left after the cap; 500 s is the cutoff
    assert "older than 1 days" in caplog.text
    box.close()


#: The outbox schema of version 0, as the first publisher created it (no index).
_SCHEMA_V0 = """
CREATE TABLE outbox (id INTEGER PRIMARY KEY AUTOINCREMENT, source TEXT NOT NULL,
                     seq INTEGER NOT NULL, ts_ms INTEGER NOT NULL, payload BLOB NOT NULL);
CREATE TABLE sequences (source TEXT PRIMARY KEY, next_seq INTEGER NOT NULL);
CREATE TABLE last_energy (source TEXT PRIMARY KEY, normal_kwh REAL, reverse_kwh REAL);
"""


def test_an_outbox_of_schema_0_is_migrated_and_the_prune_uses_the_index(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "outbox.sqlite"
    con = sqlite3.connect(path)
    con.executescript(_SCHEMA_V0)
    con.executemany("INSERT INTO outbox (source, seq, ts_ms, payload) VALUES (?, ?, ?, ?)",
                    [("meter9", i, epoch_ms(T0) + i * 1000, codec.encode(r))
                     for i, r in enumerate(readings(50, source="meter9"))])
    con.execute("INSERT INTO sequences VALUES ('meter9', 50), ('meter1', 3)")
    con.commit()
    con.close()
    with caplog.at_level(logging.INFO, logger="homeiot.adapters.outbox"):
        box = Outbox(path, max_age_days=1)
    assert "migrating" in caplog.text
    assert "from schema version 0 to 1" in caplog.text
    assert len(box) == 50
    assert box.sources() == {"meter9"}  # meter1 has a sequence but no rows left
    assert [r.seq for r in box.add(readings(2))] == [3, 4]  # numbering goes on
    box.close()

    con = sqlite3.connect(path)
    try:
        assert con.execute("PRAGMA user_version").fetchone() == (1,)
        indexes = {r[0] for r in con.execute(
            "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'outbox'")}
        assert {"outbox_ts_ms", "outbox_source_seq"} <= indexes
        plan = " ".join(str(r) for r in con.execute(
            "EXPLAIN QUERY PLAN DELETE FROM outbox WHERE ts_ms < ?", (0,)))
        assert "outbox_ts_ms" in plan, plan  # not a scan of the whole table
    finally:
        con.close()

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="homeiot.adapters.outbox"):
        box = Outbox(path, max_age_days=1)
    assert "migrating" not in caplog.text  # once
    # meter9's first 20 and the 2 meter1 readings (at T0 and T0 + 1 s) are older than a day
    assert box.prune_older_than(epoch_ms(T0 + timedelta(days=1, seconds=20))) == 22
    assert len(box) == 30
    box.close()


def test_an_outbox_from_a_newer_publisher_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite"
    Outbox(path).close()
    con = sqlite3.connect(path)
    con.execute("PRAGMA user_version = 99")
    con.commit()
    con.close()
    with pytest.raises(ConfigError, match="schema version 99 is newer"):
        Outbox(path)


def test_env_file_and_configuration_errors(tmp_path: Path) -> None:
    env_file = tmp_path / "publisher.env"
    env_file.write_text('# the Pi\nMQTT_BROKER_URL="mqtts://u:p@h:8883"\n\nMQTT_TOPIC=home/power\n')
    assert read_env_file(env_file) == {"MQTT_BROKER_URL": "mqtts://u:p@h:8883",
                                       "MQTT_TOPIC": "home/power"}
    env_file.write_text("this is not an assignment\n")
    with pytest.raises(ConfigError, match=r"publisher.env:1 is not KEY=VALUE"):
        read_env_file(env_file)
    ca = tmp_path / "ca.crt"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    base = {"MQTT_BROKER_URL": "mqtts://u:p@h", "MQTT_TLS_CA_CERT": str(ca),
            "PUBLISHER_METER": "simulated"}
    assert load_publisher(base).client_id == "homeiot-publisher-meter1"
    broute = {**base, "PUBLISHER_METER": "broute", "BROUTE_ID": "0" * 32,
              "BROUTE_PASSWORD": "ABCDEFGHIJKL"}
    assert "ABCDEFGHIJKL" not in repr(load_publisher(broute))
    for env, variable in (({"PUBLISHER_METER": "broute"}, "BROUTE_ID"),
                          ({**broute, "BROUTE_PASSWORD": "short"}, "BROUTE_PASSWORD"),
                          ({"PUBLISHER_METER": "magic"}, "PUBLISHER_METER"),
                          ({"PUBLISHER_INTERVAL_S": "0"}, "PUBLISHER_INTERVAL_S"),
                          ({"PUBLISHER_WINDOW": "x"}, "PUBLISHER_WINDOW")):
        with pytest.raises(ConfigError) as info:
            load_publisher({**base, **env})
        assert info.value.variable == variable


def test_the_process_notifies_systemd_and_stops_cleanly(
        tmp_path_factory: pytest.TempPathFactory, pki: Pki, tmp_path: Path) -> None:
    broker = start_mosquitto(tmp_path_factory.mktemp("broker"), pki, USERS)
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify_path = tmp_path / "notify.sock"
    notify.bind(str(notify_path))
    notify.settimeout(20)
    env = {**publisher_env(broker, tmp_path / "outbox.sqlite", 10),
           "NOTIFY_SOCKET": str(notify_path), "WATCHDOG_USEC": "2000000"}
    proc = subprocess.Popen([sys.executable, "-m", "homeiot.cli.publisher"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        messages = {notify.recv(64).decode() for _ in range(3)}
        assert "READY=1" in messages
        assert "WATCHDOG=1" in messages
        time.sleep(1)
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=10)
        assert proc.returncode == 0
        assert "publisher stopped" in output
        assert USERS["meter1"] not in output  # the password never reaches the log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        notify.close()
        broker.process.stop()


def test_drill_broker_outage_and_sigkill_lose_nothing(tmp_path: Path) -> None:
    result = run_drill(tmp_path, duration_s=16, rate=20)
    print(result.line())
    assert result.produced >= 200
    assert result.lost == 0  # every seq is a row in InfluxDB or still in the outbox
    assert result.delivered_unique >= result.produced - result.waiting
    assert result.rss_mb < 60


def test_a_refused_b_route_password_stops_the_publisher_with_exit_3(
        tmp_path_factory: pytest.TempPathFactory, pki: Pki, tmp_path: Path) -> None:
    from tests.fake_dongle import FakeDongle  # noqa: PLC0415

    broker = start_mosquitto(tmp_path_factory.mktemp("broker"), pki, USERS)
    dongle = FakeDongle("0" * 31 + "1", "ABCDEFGHIJKL", {})
    env = {**publisher_env(broker, tmp_path / "outbox.sqlite", 1), "PUBLISHER_METER": "broute",
           "BROUTE_ID": "0" * 31 + "1", "BROUTE_PASSWORD": "WRONGPASSWRD",
           "BROUTE_DEVICE": dongle.path}
    try:
        result = subprocess.run([sys.executable, "-m", "homeiot.cli.publisher"], env=env,
                                capture_output=True, text=True, timeout=60, check=False)
    finally:
        dongle.close()
        broker.process.stop()
    assert result.returncode == 3, result.stdout + result.stderr
    assert "check BROUTE_ID and BROUTE_PASSWORD" in result.stdout
    assert "WRONGPASSWRD" not in result.stdout + result.stderr
    assert dongle.join_attempts == 1


def _start_publisher(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen([sys.executable, "-m", "homeiot.cli.publisher"], env=env, stdout=out,
                                stderr=subprocess.STDOUT)


def test_readings_the_acl_refuses_stay_in_the_outbox_until_it_is_fixed(
        tmp_path_factory: pytest.TempPathFactory, pki: Pki, tmp_path: Path,
        influx_db: InfluxSettings) -> None:
    """meter1 publishes as source meter9, which its ACL does not allow: Mosquitto answers each
    QoS 1 publish with a PUBACK "not authorized" (0x87). Nothing may be deleted; once the ACL is
    fixed and the broker reloaded, every reading is stored in InfluxDB (counted by seq), once."""
    broker = start_mosquitto(tmp_path_factory.mktemp("broker"), pki, USERS)
    gateway = RunningGateway(gateway_settings(broker, influx_db, tmp_path))
    outbox = tmp_path / "outbox.sqlite"
    env = {**publisher_env(broker, outbox, 10), "SOURCE_DEFAULT": "meter9"}
    log = tmp_path / "publisher.log"
    proc = _start_publisher(env, log)
    try:
        wait_for(outbox.exists, 30, "the outbox")
        wait_for(lambda: outbox_state(outbox, "meter9")[1] >= 20, 30, "20 readings")
        time.sleep(1.0)
        waiting, produced = outbox_state(outbox, "meter9")
        assert waiting == produced, f"{produced - waiting} refused reading(s) were deleted"
        assert stored_seqs(influx_db, "meter9") == []
        text = log.read_text()
        refusals = [line for line in text.splitlines() if "broker refused readings" in line]
        assert len(refusals) == 1, text  # once per change, not once per reading
        assert "ERROR" in refusals[0]
        assert "home/power/meter9" in refusals[0]
        assert "Not authorized (0x87)" in refusals[0]

        broker.write_acl({"meter1": ("meter1", "meter9")})
        broker.reload()
        wait_for(lambda: outbox_state(outbox, "meter9")[0] == 0, 60, "the outbox drained")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
        produced = outbox_state(outbox, "meter9")[1]
        stored = stored_seqs(influx_db, "meter9")
        assert len(stored) == len(set(stored))
        kept = outbox_seqs(outbox, "meter9")  # read after the last drain, not yet stored
        assert len(kept) < 5
        assert set(stored) | kept == set(range(produced))
        assert "accepts readings on topic home/power/meter9 again" in log.read_text()
        assert USERS["meter1"] not in log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        gateway.stop()
        broker.process.stop()


def test_only_a_receipt_empties_the_outbox_and_resends_never_duplicate_rows(
        tmp_path_factory: pytest.TempPathFactory, pki: Pki, tmp_path: Path,
        influx_db: InfluxSettings) -> None:
    """The gateway stores every reading but may not send receipts (its ACL lacks the receipt
    tree): the publisher keeps every reading and resends it after the receipt timeout; InfluxDB
    still holds exactly one row per seq. With the ACL fixed, receipts come and the outbox drains.
    Meanwhile no publisher can read another's receipts or write receipts at all."""
    broker = start_mosquitto(tmp_path_factory.mktemp("broker"), pki, USERS)
    broker.acl.write_text(broker.acl.read_text().replace(
        "topic write homeiot/receipts/#\n", ""))
    broker.reload()
    gateway = RunningGateway(gateway_settings(broker, influx_db, tmp_path))
    outbox = tmp_path / "outbox.sqlite"
    env = {**publisher_env(broker, outbox, 20), "PUBLISHER_RECEIPT_TIMEOUT_S": "0.5"}
    log = tmp_path / "publisher.log"
    proc = _start_publisher(env, log)
    try:
        wait_for(outbox.exists, 30, "the outbox")
        wait_for(lambda: outbox_state(outbox)[1] >= 40, 30, "40 readings")
        time.sleep(3.0)  # several receipt timeouts: everything resent at least twice
        waiting, produced = outbox_state(outbox)
        assert waiting == produced  # stored, but no receipt: nothing deleted
        seqs = stored_seqs(influx_db)
        assert len(seqs) == len(set(seqs))  # one row per seq, however often it was resent
        assert len(seqs) >= produced - 5
        resent = gateway.gateway.metrics.registry.get_sample_value("homeiot_messages_received_total")
        assert resent is not None
        assert resent > 2 * produced - 20  # proof that it did resend
        wait_for(lambda: "no receipt from the gateway for readings resent 3 times" in
                 log.read_text(), 20, "the alarm")

        broker.write_acl()  # the full ACL, receipts included
        broker.reload()
        wait_for(lambda: outbox_state(outbox)[0] < 10, 60, "the outbox drained")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
        assert "receipts from the gateway arrive again" in log.read_text()
        errors = [line for line in log.read_text().splitlines() if " ERROR " in line]
        assert len(errors) == 1, errors  # the alarm, once
        waiting, produced = outbox_state(outbox)
        seqs = stored_seqs(influx_db)
        assert len(seqs) == len(set(seqs))
        assert set(seqs) | outbox_seqs(outbox) == set(range(produced))  # nothing lost
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        gateway.stop()
        broker.process.stop()


def test_the_acl_keeps_receipts_to_their_source(
        tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> None:
    """Only the gateway writes receipts; only meter1 receives meter1's. (Mosquitto 2.0 grants
    every SUBSCRIBE and applies the read ACL on delivery, so delivery is what is checked.)"""
    broker = start_mosquitto(tmp_path_factory.mktemp("broker"), pki, USERS)
    clients = {user: GatewayTestPublisher(broker, user) for user in ("meter1", "meter2", "gateway")}
    got: dict[str, list[bytes]] = {"meter1": [], "meter2": []}
    try:
        for user in ("meter1", "meter2"):
            client = clients[user].client
            client.on_message = lambda c, u, msg, user=user: got[user].append(msg.payload)
            client.subscribe("homeiot/receipts/meter1", qos=1)
        time.sleep(0.5)
        codes: list[int] = []
        meter2 = clients["meter2"].client
        meter2.on_publish = lambda c, u, mid, reason, p: codes.append(reason.value)
        meter2.publish("homeiot/receipts/meter1", b"forged", qos=1).wait_for_publish(10)
        wait_for(lambda: bool(codes), 10, "the PUBACK")
        assert codes == [0x87]  # a publisher cannot write receipts
        clients["gateway"].client.publish("homeiot/receipts/meter1", b"real", qos=1
                                          ).wait_for_publish(10)
        wait_for(lambda: bool(got["meter1"]), 10, "meter1's receipt")
        time.sleep(0.5)
        assert got == {"meter1": [b"real"], "meter2": []}
    finally:
        for identity in clients.values():
            identity.close()
        broker.process.stop()
