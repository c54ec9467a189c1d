"""Receipts end to end, against a real broker, gateway, influxd and publisher process: a reading
InfluxDB refuses for good is receipted as a dead letter (the outbox lets it go, once); receipts are
per source; a refused receipt SUBSCRIBE or PUBLISH is loud and shows in /readyz."""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from homeiot.adapters import mqtt as mqtt_adapter
from homeiot.adapters.influx import InfluxClient
from homeiot.adapters.meters import SimulatedBackend
from homeiot.adapters.outbox import Outbox
from homeiot.config import InfluxSettings, load_publisher
from homeiot.core.reading import Reading
from homeiot.services import publisher as publisher_service
from tests.conftest import USERS, mqtt_settings
from tests.drill import outbox_seqs, outbox_state, publisher_env, stored_seqs, wait_for
from tests.gateway_support import (
    Publisher,
    RunningGateway,
    gateway_env,
    gateway_settings,
    readiness,
    reading,
    start_gateway_process,
    wait_until,
)
from tests.services import DYNSEC_ADMIN, Influxd, Mosquitto, Pki, free_port, start_mosquitto

pytestmark = pytest.mark.integration



class PublisherProcess:
    """``python -m homeiot.cli.publisher`` with the test broker's settings (simulated meter)."""

    def __init__(self, broker: Mosquitto, outbox: Path, log: Path, **env: str) -> None:
        self.outbox = outbox
        self.log = log
        environ = {**publisher_env(broker, outbox, 10), "PUBLISHER_RECEIPT_TIMEOUT_S": "1",
                   **env}
        with log.open("ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "homeiot.cli.publisher"],
                                         env=environ, stdout=out, stderr=subprocess.STDOUT)

    def text(self) -> str:
        return self.log.read_text()

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        assert self.proc.wait(20) == 0, self.text()[-3000:]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _cli(settings_env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "homeiot.cli.gateway", *args], env=settings_env,
                          capture_output=True, text=True, timeout=60, check=False)


def test_a_reading_influxdb_refuses_for_good_is_one_dead_letter_and_leaves_the_outbox(
        pki: Pki, tmp_path: Path, influxd: Influxd, influx_db: InfluxSettings) -> None:
    """The Pi's outbox holds a reading older than the database's retention policy (3 h, 1 h):
    InfluxDB
    answers "partial write: points beyond retention policy dropped=1" (400, lines not named),
    for good. It becomes exactly one dead letter, whose receipt lets the outbox delete it — no
    endless resend (with a 1 s receipt timeout, a resend would come within 1, 3, 7 s). Once the
    policy is widened, replay-dead-letters stores it."""
    influxd.admin(f'CREATE RETENTION POLICY "hour" ON "{influx_db.database}" DURATION 1h '
                  "REPLICATION 1 DEFAULT")
    broker = start_mosquitto(tmp_path / "broker", pki, USERS)
    settings = gateway_settings(broker, influx_db, tmp_path)
    gateway = RunningGateway(settings)
    outbox = tmp_path / "outbox.sqlite"
    box = Outbox(outbox)
    now = datetime.now(UTC).replace(microsecond=0)
    box.add([Reading("meter1", now - timedelta(hours=3), 0, 123.0)]  # seq 0: beyond the policy
            + [Reading("meter1", now - timedelta(minutes=10 - i), 0, 100.0 + i)
               for i in range(1, 5)])  # seqs 1-4: within it
    box.close()
    publisher = PublisherProcess(broker, outbox, tmp_path / "publisher.log")
    try:
        wait_for(lambda: 0 not in outbox_seqs(outbox), 30, "the refused reading to leave")
        assert gateway.store.count() == 1
        [letter] = gateway.store.list()
        assert "beyond retention policy" in letter.letter.error
        time.sleep(8)  # resends would have come at 1, 3 and 7 s
        assert gateway.store.count() == 1
        wait_for(lambda: outbox_state(outbox)[0] < 5 and not {1, 2, 3, 4} & outbox_seqs(outbox),
                 30, "the outbox to drain")
        publisher.stop()
    finally:
        publisher.kill()
        gateway.stop()
        broker.process.stop()
    text = publisher.text()
    assert "the gateway set aside reading(s) of meter1 as dead letters (seq 0)" in text
    assert "dead_lettered=1" in text  # the stop line
    produced = outbox_state(outbox)[1]
    stored = stored_seqs(influx_db)
    assert len(stored) == len(set(stored))
    assert 0 not in stored
    assert set(stored) | outbox_seqs(outbox) == set(range(1, produced))  # nothing else lost

    influxd.admin(f'ALTER RETENTION POLICY "hour" ON "{influx_db.database}" DURATION INF')
    result = _cli(gateway_env(settings), "replay-dead-letters")
    assert "replayed 1, still invalid 0, refused by InfluxDB 0" in result.stdout, \
        result.stdout + result.stderr
    assert 0 in stored_seqs(influx_db)


def test_rows_of_a_former_source_keep_their_name_and_only_its_receipts_delete_them(
        pki: Pki, tmp_path: Path, influx_db: InfluxSettings) -> None:
    """The Pi was meter9 and is now meter1 (SOURCE_DEFAULT changed) while its outbox still held
    meter9's seqs 0-9; meter1 numbers its own seqs from 0 too. meter9's rows go out on meter9's
    topic and are deleted only by meter9's receipts: while the ACL refuses meter9, they all stay
    (the refusal names home/power/meter9) even though meter1's receipts name seqs 0-9; once the
    ACL allows it, they are stored as meter9 — never as meter1."""
    broker = start_mosquitto(tmp_path / "broker", pki, USERS)
    gateway = RunningGateway(gateway_settings(broker, influx_db, tmp_path))
    outbox = tmp_path / "outbox.sqlite"
    box = Outbox(outbox)
    old = datetime.now(UTC).replace(microsecond=0) - timedelta(days=2)
    box.add([Reading("meter9", old + timedelta(seconds=i), 0, 900.0 + i) for i in range(10)])
    box.close()
    publisher = PublisherProcess(broker, outbox, tmp_path / "publisher.log")
    try:
        wait_for(lambda: len(stored_seqs(influx_db, "meter1")) >= 15, 30, "meter1's readings")
        assert outbox_seqs(outbox, "meter9") == set(range(10))  # not one deleted
        assert stored_seqs(influx_db, "meter9") == []
        with InfluxClient(influx_db) as client:
            old_as_meter1 = list(client.rows(
                'SELECT "seq" FROM "meter_readings" WHERE "source" = \'meter1\' '
                "AND time < now() - 1d"))
        assert old_as_meter1 == []  # meter9's readings were never stored under meter1's name
        text = publisher.text()
        assert "broker refused readings on topic home/power/meter9: Not authorized (0x87)" \
            in text

        broker.write_acl({"meter1": ("meter1", "meter9")})
        broker.reload()
        wait_for(lambda: not outbox_seqs(outbox, "meter9"), 90, "meter9's rows to drain")
        publisher.stop()
    finally:
        publisher.kill()
        gateway.stop()
        broker.process.stop()
    assert stored_seqs(influx_db, "meter9") == list(range(10))
    produced = outbox_state(outbox, "meter1")[1]
    meter1 = stored_seqs(influx_db, "meter1")
    assert len(meter1) == len(set(meter1))
    assert set(meter1) | outbox_seqs(outbox, "meter1") == set(range(produced))


def test_a_refused_receipt_subscription_is_an_error_naming_topic_and_reason(
        pki: Pki, tmp_path: Path, influx_db: InfluxSettings) -> None:
    """The broker refuses meter1's SUBSCRIBE to its receipts (SUBACK 0x87): one ERROR naming the
    topic and the reason; nothing is deleted; after the broker allows it, the outbox drains."""
    deny: dict[str, tuple[str, ...]] = {"meter1": ("homeiot/receipts/meter1",)}
    broker = start_mosquitto(tmp_path / "broker", pki, USERS, deny_subscribe=deny)
    gateway = RunningGateway(gateway_settings(broker, influx_db, tmp_path))
    outbox = tmp_path / "outbox.sqlite"
    publisher = PublisherProcess(broker, outbox, tmp_path / "publisher.log")
    try:
        wait_for(lambda: len(stored_seqs(influx_db)) >= 20, 30, "20 stored readings")
        waiting, produced = outbox_state(outbox)
        assert waiting == produced  # stored, but no receipt can come: nothing deleted
        refusals = [line for line in publisher.text().splitlines()
                    if "refused our subscription to receipts" in line]
        assert len(refusals) == 1, refusals
        assert " ERROR " in refusals[0]
        assert "homeiot/receipts/meter1: Not authorized (0x87)" in refusals[0]
    finally:
        publisher.kill()
        broker.process.stop()
    # The operator lifts the refusal; the broker restarts with the ACL file alone.
    (broker.directory / "mosquitto.conf").write_text("".join(
        line for line in (broker.directory / "mosquitto.conf").read_text().splitlines(True)
        if not line.startswith("plugin")))
    broker.process.start()
    publisher = PublisherProcess(broker, outbox, tmp_path / "publisher.log")
    try:
        wait_for(lambda: outbox_state(outbox)[0] < 5, 60, "the outbox to drain")
        publisher.stop()
    finally:
        publisher.kill()
        gateway.stop()
        broker.process.stop()
    produced = outbox_state(outbox)[1]
    assert set(stored_seqs(influx_db)) | outbox_seqs(outbox) == set(range(produced))


def test_the_gateway_reports_a_refused_receipt_and_a_refused_subscription_in_readyz(
        pki: Pki, tmp_path: Path, influx_db: InfluxSettings) -> None:
    """A gateway whose receipts the ACL refuses (PUBACK 0x87), then one whose SUBSCRIBE the
    broker refuses (SUBACK 0x87): an ERROR naming the topic and reason, and /readyz 503 saying
    it; the receipt problem clears once the ACL is fixed."""
    broker = start_mosquitto(tmp_path / "broker", pki, USERS)
    broker.acl.write_text(broker.acl.read_text().replace("topic write homeiot/receipts/#\n", ""))
    broker.reload()
    settings = gateway_settings(broker, influx_db, tmp_path)
    port = free_port()
    log = tmp_path / "gateway.log"
    proc = start_gateway_process(settings, log, api_port=port)
    publisher = Publisher(broker, "meter1")
    try:
        wait_until(lambda: (r := readiness(port)) is not None and r.status_code == 200, 30,
                   "the gateway to be ready")
        publisher.publish_readings(reading(i) for i in range(5))
        publisher.wait_all()
        wait_until(lambda: (r := readiness(port)) is not None and r.status_code == 503, 30,
                   "/readyz to say 503")
        answer = readiness(port)
        assert answer is not None
        reasons = answer.json()["reasons"]
        assert any("refused our receipt on homeiot/receipts/meter1: Not authorized (0x87)"
                   in reason for reason in reasons), reasons
        meter2 = Publisher(broker, "meter2")
        try:
            for i in range(5, 10):  # receipts for two sources, alternating: still one ERROR
                publisher.publish_readings([reading(i)])
                meter2.publish_readings([reading(i, "meter2")])
                publisher.wait_all()
                meter2.wait_all()
                time.sleep(0.2)
        finally:
            meter2.close()
        time.sleep(1)
        errors = [line for line in log.read_text().splitlines()
                  if "refused our receipt" in line]
        assert len(errors) == 1, errors  # once per change of reason, not per receipt or topic
        assert " ERROR " in errors[0]

        broker.write_acl()
        broker.reload()
        time.sleep(0.5)
        publisher.publish_readings([reading(10)])
        publisher.wait_all()
        wait_until(lambda: (r := readiness(port)) is not None and r.status_code == 200, 30,
                   "/readyz to recover")
        assert "the broker accepts our receipts again" in log.read_text()
    finally:
        publisher.close()
        proc.terminate()
        proc.wait(20)
        broker.process.stop()
    assert stored_seqs(influx_db) == list(range(11))

    denied = start_mosquitto(tmp_path / "denied", pki, USERS,
                             deny_subscribe={"gateway": ("home/power/#",)})
    settings = gateway_settings(denied, influx_db, tmp_path, client_id="gw-denied")
    gw = RunningGateway(settings)
    try:
        wait_until(lambda: gw.gateway.subscribe_problem is not None, 10, "the SUBACK")
        [reason] = [r for r in gw.gateway.problems() if "subscription" in r]
        assert "refused our subscription to home/power/+: Not authorized (0x87)" in reason
    finally:
        gw.stop()
        denied.process.stop()


def test_a_subscription_refusal_is_logged_once(
        pki: Pki, tmp_path: Path, influx_db: InfluxSettings,
        caplog: pytest.LogCaptureFixture) -> None:
    broker = start_mosquitto(tmp_path / "broker", pki, USERS,
                             deny_subscribe={"gateway": ("home/power/#",)})
    with caplog.at_level(logging.INFO, logger="homeiot.services.gateway"):
        gw = RunningGateway(gateway_settings(broker, influx_db, tmp_path))
        try:
            wait_until(lambda: gw.gateway.subscribe_problem is not None, 10, "the SUBACK")
            broker.process.stop()
            broker.process.start()  # a reconnect subscribes again: refused again, same reason
            wait_until(lambda: gw.gateway.mqtt_connected, 30, "the reconnect")
            time.sleep(1)
        finally:
            gw.stop()
            broker.process.stop()
    errors = [r for r in caplog.records if r.levelno == logging.ERROR
              and "refused our subscription" in r.getMessage()]
    assert len(errors) == 1


def _lift_subscribe_denial(broker: Mosquitto, user: str, topic_filter: str) -> None:
    """Remove the denial at run time, as an operator would (dynamic security's $CONTROL API)."""
    settings = replace(mqtt_settings(broker, "gateway", password=DYNSEC_ADMIN[1]),
                       username=DYNSEC_ADMIN[0])
    client = mqtt_adapter.create_client(settings)
    answers: list[bytes] = []
    client.on_message = lambda c, u, msg: answers.append(bytes(msg.payload))
    mqtt_adapter.connect(client, settings, clean_start=True)
    mqtt_adapter.start(client)
    try:
        client.subscribe("$CONTROL/dynamic-security/v1/response", qos=1)
        time.sleep(0.3)
        command = {"commands": [{"command": "removeRoleACL", "rolename": f"role-{user}",
                                 "acltype": "subscribePattern", "topic": topic_filter}]}
        client.publish("$CONTROL/dynamic-security/v1", json.dumps(command), qos=1)
        wait_until(lambda: bool(answers), 10, "the broker's answer")
        assert "error" not in json.loads(answers[0])["responses"][0], answers
    finally:
        mqtt_adapter.close(client)


def test_a_refused_receipt_subscription_is_retried_and_granted_without_a_reconnect(
        pki: Pki, tmp_path: Path, influx_db: InfluxSettings, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """The operator lifts the denial while the publisher stays connected: its periodic retry
    (here every 1 s instead of 60) is granted, logged at INFO, and the outbox drains."""
    monkeypatch.setattr(publisher_service, "_RESUBSCRIBE_EVERY_S", 1.0)
    deny: dict[str, tuple[str, ...]] = {"meter1": ("homeiot/receipts/meter1",)}
    broker = start_mosquitto(tmp_path / "broker", pki, USERS, deny_subscribe=deny)
    gateway = RunningGateway(gateway_settings(broker, influx_db, tmp_path))
    env = {**publisher_env(broker, tmp_path / "outbox.sqlite", 10),
           "PUBLISHER_RECEIPT_TIMEOUT_S": "1"}
    settings = load_publisher(env)
    made: list[publisher_service.Publisher] = []
    ready = threading.Event()

    def run() -> None:  # the outbox (SQLite) lives on the pump's thread, as in the process
        outbox = Outbox(settings.outbox)
        made.append(publisher_service.Publisher(
            settings, SimulatedBackend(settings.source, settings.seed, settings.timezone), outbox))
        ready.set()
        try:
            made[0].run()
        finally:
            outbox.close()

    runner = threading.Thread(target=run)
    try:
        with caplog.at_level(logging.INFO, logger="homeiot.services.publisher"):
            runner.start()
            assert ready.wait(10)
            wait_until(lambda: len(stored_seqs(influx_db)) >= 10, 30, "10 stored readings")
            time.sleep(2.5)  # two more refused retries: still one ERROR
            assert made[0].delivered == 0
            _lift_subscribe_denial(broker, "meter1", "homeiot/receipts/meter1")
            wait_until(lambda: made[0].delivered >= 10, 30, "receipts to delete readings")
    finally:
        if made:
            made[0].stop()
        runner.join(20)
        gateway.stop()
        broker.process.stop()
    errors = [r for r in caplog.records if r.levelno == logging.ERROR
              and "refused our subscription to receipts" in r.getMessage()]
    assert len(errors) == 1
    assert "the broker granted our subscription to receipts on homeiot/receipts/meter1" \
        in caplog.text
