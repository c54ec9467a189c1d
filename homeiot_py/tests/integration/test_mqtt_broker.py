"""The MQTT adapter against a real Mosquitto with TLS, passwords ($7$ from our own hash) and ACLs."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from homeiot.adapters.mqtt import close, connect, create_client, start
from homeiot.core.errors import MqttAuthError, MqttTlsError
from tests.conftest import USERS, mqtt_settings
from tests.services import (
    BASE_TOPIC,
    LOOPBACK,
    UNLISTED_LOOPBACK,
    Mosquitto,
    Pki,
    mosquitto_client_env,
    require_binary,
)

pytestmark = pytest.mark.integration


def connected(broker: Mosquitto, user: str, **kwargs: Any) -> mqtt.Client:
    settings = mqtt_settings(broker, user, **kwargs)
    client = create_client(settings)
    connect(client, settings, clean_start=True)
    start(client)
    return client


@pytest.fixture
def gateway_messages(mosquitto: Mosquitto) -> Iterator[list[mqtt.MQTTMessage]]:
    """A gateway-identity subscriber on ``{base}/#`` collecting every message it receives."""
    received: list[mqtt.MQTTMessage] = []
    client = connected(mosquitto, "gateway")
    subscribed = threading.Event()
    client.on_message = lambda c, u, msg: received.append(msg)
    client.on_subscribe = lambda c, u, mid, codes, props: subscribed.set()
    client.subscribe(f"{BASE_TOPIC}/#", qos=1)
    assert subscribed.wait(5)
    yield received
    close(client)


def wait_for(predicate: Any, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return bool(predicate())


def test_tls_with_the_right_ca_connects_and_delivers(
        mosquitto: Mosquitto, gateway_messages: list[mqtt.MQTTMessage]) -> None:
    publisher = connected(mosquitto, "meter1")
    publisher.publish(f"{BASE_TOPIC}/meter1", b"hello", qos=1).wait_for_publish(5)
    close(publisher)
    assert wait_for(lambda: any(m.payload == b"hello" for m in gateway_messages))


def test_a_wrong_ca_is_refused(mosquitto: Mosquitto, other_pki: Pki) -> None:
    settings = mqtt_settings(mosquitto, "meter1", ca_cert=other_pki.ca_cert)
    client = create_client(settings)
    with pytest.raises(MqttTlsError, match="certificate"):
        connect(client, settings, clean_start=True)
    close(client)


def test_a_host_name_not_in_the_san_is_refused(mosquitto: Mosquitto) -> None:
    # The broker listens on 127.0.0.2 as well; its certificate names only 127.0.0.1 and localhost.
    settings = replace(mqtt_settings(mosquitto, "meter1", host=UNLISTED_LOOPBACK),
                       port=mosquitto.unlisted_port)
    client = create_client(settings)
    with pytest.raises(MqttTlsError, match="SAN"):
        connect(client, settings, clean_start=True)
    close(client)


def test_localhost_is_in_the_san(mosquitto: Mosquitto) -> None:
    close(connected(mosquitto, "meter1", host="localhost"))


def test_a_wrong_password_is_refused(mosquitto: Mosquitto) -> None:
    with pytest.raises(MqttAuthError):
        connected(mosquitto, "meter1", password="wrong")


def test_an_anonymous_client_is_refused(mosquitto: Mosquitto) -> None:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.tls_set(ca_certs=str(mosquitto.pki.ca_cert))
    client.connect(LOOPBACK, mosquitto.port)
    with pytest.raises(MqttAuthError):
        start(client)  # closes the client when refused


def test_acl_stops_a_publisher_writing_another_source(
        mosquitto: Mosquitto, gateway_messages: list[mqtt.MQTTMessage]) -> None:
    publisher = connected(mosquitto, "meter1")
    # Mosquitto acknowledges a denied QoS 1 publish (v5: reason "not authorized") but drops it.
    publisher.publish(f"{BASE_TOPIC}/meter2", b"forged", qos=1).wait_for_publish(5)
    publisher.publish(f"{BASE_TOPIC}/meter1", b"marker", qos=1).wait_for_publish(5)
    close(publisher)
    assert wait_for(lambda: any(m.payload == b"marker" for m in gateway_messages))
    assert not any(m.payload == b"forged" for m in gateway_messages)


def test_acl_stops_a_publisher_reading(mosquitto: Mosquitto) -> None:
    reader = connected(mosquitto, "meter1")
    received: list[mqtt.MQTTMessage] = []
    granted: list[list[Any]] = []
    reader.on_message = lambda c, u, msg: received.append(msg)
    reader.on_subscribe = lambda c, u, mid, codes, props: granted.append(codes)
    reader.subscribe(f"{BASE_TOPIC}/#", qos=1)
    writer = connected(mosquitto, "meter1")
    assert wait_for(lambda: bool(granted))
    writer.publish(f"{BASE_TOPIC}/meter1", b"own", qos=1).wait_for_publish(5)
    time.sleep(0.5)
    close(reader)
    close(writer)
    # Mosquitto 2.0 grants a wildcard subscription and applies the read ACL per message, so the
    # proof is that nothing arrives — not even the reader's own publication.
    assert received == []


# --- the same rules, seen by Mosquitto's own C clients ------------------------------------------

def _tls_args(broker: Mosquitto) -> list[str]:
    return ["-h", LOOPBACK, "-p", str(broker.port), "--cafile", str(broker.pki.ca_cert),
            "-V", "mqttv5", "-q", "1"]


def _sub(tmp_path: Path, broker: Mosquitto, user: str, topic: str) -> subprocess.Popen[str]:
    binary = require_binary("mosquitto_sub")
    return subprocess.Popen([binary, *_tls_args(broker), "-t", topic, "-C", "1", "-W", "5"],
                            env=mosquitto_client_env(tmp_path, "mosquitto_sub", user, USERS[user]),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _pub(tmp_path: Path, broker: Mosquitto, user: str, password: str, topic: str, message: str,
         *, cafile: Path | None = None) -> subprocess.CompletedProcess[str]:
    binary = require_binary("mosquitto_pub")
    args = _tls_args(broker)
    if cafile is not None:
        args[args.index("--cafile") + 1] = str(cafile)
    return subprocess.run([binary, *args, "-t", topic, "-m", message],
                          env=mosquitto_client_env(tmp_path, "mosquitto_pub", user, password),
                          capture_output=True, text=True, timeout=15, check=False)


def test_mosquitto_clients_see_the_same_rules(tmp_path: Path, mosquitto: Mosquitto) -> None:
    sub = _sub(tmp_path, mosquitto, "gateway", f"{BASE_TOPIC}/#")
    time.sleep(0.7)  # let the subscription settle before publishing
    forged = _pub(tmp_path, mosquitto, "meter2", USERS["meter2"], f"{BASE_TOPIC}/meter1", "forged")
    assert forged.returncode in (0, 1)  # acknowledged-and-dropped or refused: never delivered
    wrong = _pub(tmp_path, mosquitto, "meter2", "nope", f"{BASE_TOPIC}/meter2", "x")
    assert wrong.returncode != 0
    assert "not authori" in wrong.stderr.lower() or "bad user" in wrong.stderr.lower()
    good = _pub(tmp_path, mosquitto, "meter2", USERS["meter2"], f"{BASE_TOPIC}/meter2", "good")
    assert good.returncode == 0, good.stderr
    out, err = sub.communicate(timeout=10)
    assert out.strip() == "good", err


def test_mosquitto_sub_as_publisher_receives_nothing(tmp_path: Path, mosquitto: Mosquitto) -> None:
    sub = _sub(tmp_path, mosquitto, "meter1", f"{BASE_TOPIC}/#")
    time.sleep(0.7)
    own = _pub(tmp_path, mosquitto, "meter1", USERS["meter1"], f"{BASE_TOPIC}/meter1", "x")
    assert own.returncode == 0, own.stderr
    out, _ = sub.communicate(timeout=10)
    assert out == ""
    assert sub.returncode != 0  # -W timed out without a message


def test_mosquitto_clients_refuse_a_wrong_ca_and_anonymous(
        tmp_path: Path, mosquitto: Mosquitto, other_pki: Pki) -> None:
    wrong_ca = _pub(tmp_path, mosquitto, "meter1", USERS["meter1"], f"{BASE_TOPIC}/meter1", "x",
                    cafile=other_pki.ca_cert)
    assert wrong_ca.returncode != 0
    assert "tls error" in wrong_ca.stderr.lower()
    binary = require_binary("mosquitto_pub")
    anonymous = subprocess.run(
        [binary, *_tls_args(mosquitto), "-t", f"{BASE_TOPIC}/meter1", "-m", "x"],
        env={**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "empty")},
        capture_output=True, text=True, timeout=15, check=False)
    assert anonymous.returncode != 0
    assert "not authori" in anonymous.stderr.lower()
