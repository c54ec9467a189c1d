"""Every connection failure is logged once per change, at ERROR, with a reason an operator can act
on — in the publisher and in the gateway — and never with the password. Against the real broker."""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from urllib.parse import quote

import pytest

from homeiot.adapters import mqtt as mqtt_adapter
from homeiot.config import InfluxSettings
from tests.conftest import USERS, mqtt_settings
from tests.drill import outbox_state, publisher_env, wait_for
from tests.gateway_support import RunningGateway, gateway_settings
from tests.services import UNLISTED_LOOPBACK, Pki, free_port, start_mosquitto

pytestmark = pytest.mark.integration

#: A password with every character that breaks naive URL handling, and spaces.
ODD_PASSWORD = "p#ss?w/rd@h:st% 1 x"


def _run_publisher(env: dict[str, str], log: Path, seconds: float) -> str:
    with log.open("ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "homeiot.cli.publisher"], env=env, stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        time.sleep(seconds)
    finally:
        proc.terminate()
        proc.wait(20)
    return log.read_text()


def _errors(text: str, needle: str) -> list[str]:
    return [line for line in text.splitlines() if " ERROR " in line and needle in line]


@pytest.fixture
def broker_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("broker")


def test_wrong_ca_name_not_in_san_and_refused_port(
        broker_dir: Path, pki: Pki, other_pki: Pki, tmp_path: Path) -> None:
    broker = start_mosquitto(broker_dir, pki, USERS)
    try:
        base = publisher_env(broker, tmp_path / "outbox.sqlite", 10)
        cases = {
            "wrong-ca": ({"MQTT_TLS_CA_CERT": str(other_pki.ca_cert)},
                         "TLS: the broker's certificate was refused (self-signed certificate in "
                         "certificate chain); check that MQTT_TLS_CA_CERT is the CA that signed it"),
            "not-in-san": ({"MQTT_BROKER_URL": base["MQTT_BROKER_URL"].replace(
                f"127.0.0.1:{broker.port}", f"{UNLISTED_LOOPBACK}:{broker.unlisted_port}")},
                "TLS: '127.0.0.2' is not in the broker certificate's SAN (IP address mismatch"),
            "refused": ({"MQTT_BROKER_URL": base["MQTT_BROKER_URL"].replace(
                str(broker.port), str(free_port()))},
                "was refused: no broker listens there"),
        }
        for name, (extra, expected) in cases.items():
            outbox = tmp_path / f"{name}.sqlite"
            env = {**base, **extra, "PUBLISHER_OUTBOX": str(outbox)}
            text = _run_publisher(env, tmp_path / f"{name}.log", 4.0)
            lines = _errors(text, "publisher: cannot connect to the broker")
            assert len(lines) == 1, (name, text)  # several retries, one line
            assert expected in lines[0], (name, lines[0])
            assert USERS["meter1"] not in text
            assert outbox_state(outbox)[0] >= 20  # it kept collecting
    finally:
        broker.process.stop()


def test_refused_credentials_keep_collecting_and_recover_when_the_password_is_fixed(
        broker_dir: Path, pki: Pki, tmp_path: Path) -> None:
    broker = start_mosquitto(broker_dir, pki, USERS)
    outbox = tmp_path / "outbox.sqlite"
    env = {**publisher_env(broker, outbox, 10),
           "MQTT_BROKER_URL": f"mqtts://meter1:{quote(ODD_PASSWORD, safe='')}@127.0.0.1:"
                              f"{broker.port}"}
    log = tmp_path / "publisher.log"
    with log.open("ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "homeiot.cli.publisher"], env=env, stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: "refused our credentials" in log.read_text(), 30, "the refusal")
        time.sleep(3.0)  # retries
        lines = _errors(log.read_text(), "cannot connect to the broker")
        assert len(lines) == 1
        assert "the broker refused our credentials (Not authorized)" in lines[0]  # Mosquitto 2.0
        assert outbox_state(outbox)[0] >= 30  # nothing deleted, still collecting
        broker.set_password("meter1", ODD_PASSWORD)  # rotated on the server
        broker.reload()
        wait_for(lambda: "connected to the broker again" in log.read_text(), 30, "recovery")
    finally:
        proc.terminate()
        proc.wait(20)
        broker.process.stop()
    text = log.read_text()
    assert ODD_PASSWORD not in text
    assert quote(ODD_PASSWORD, safe="") not in text


def test_the_gateway_reports_a_wrong_ca_once_and_in_readyz(
        broker_dir: Path, pki: Pki, other_pki: Pki, tmp_path: Path, influx_db: InfluxSettings,
        caplog: pytest.LogCaptureFixture) -> None:
    broker = start_mosquitto(broker_dir, pki, USERS)
    settings = gateway_settings(broker, influx_db, tmp_path)
    settings = replace(settings, mqtt=replace(settings.mqtt, ca_cert=other_pki.ca_cert))
    try:
        with caplog.at_level(logging.INFO):
            with pytest.raises(AssertionError, match="the gateway to connect"):
                RunningGateway(settings, connect_timeout_s=4.0)
            lines = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR
                     and "cannot connect to the broker" in r.getMessage()]
        assert len(lines) == 1, lines
        assert "TLS: the broker's certificate was refused" in lines[0]
        assert USERS["gateway"] not in caplog.text
    finally:
        broker.process.stop()


def test_diagnose_names_each_failure(pki: Pki, other_pki: Pki, broker_dir: Path) -> None:
    broker = start_mosquitto(broker_dir, pki, USERS)
    try:
        good = mqtt_settings(broker, "meter1")
        assert "work, but" in mqtt_adapter.diagnose(good)
        assert "SAN" in mqtt_adapter.diagnose(replace(good, host="localhost.localdomain")) or \
            "cannot resolve" in mqtt_adapter.diagnose(replace(good, host="localhost.localdomain"))
        assert "refused (" in mqtt_adapter.diagnose(replace(good, ca_cert=other_pki.ca_cert))
    finally:
        broker.process.stop()
