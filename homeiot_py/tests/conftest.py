"""Session fixtures: real Mosquitto and influxd, TLS material generated per session."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from homeiot.config import InfluxSettings, MqttSettings
from tests.services import (
    BASE_TOPIC,
    LOOPBACK,
    Influxd,
    Mosquitto,
    Pki,
    make_pki,
    start_influxd,
    start_mosquitto,
)

#: Test identities. Generated per run would be nicer, but these exist only inside the
#: temp dir of this test session and never leave loopback.
USERS = {"gateway": "gw-pass-Ä 1", "meter1": "m1:pass/w@rd", "meter2": "m2-pass"}


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="session")
def other_pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A second, unrelated CA: its certificate must not validate our broker."""
    return make_pki(tmp_path_factory.mktemp("other-pki"), prefix="other-")


@pytest.fixture(scope="session")
def mosquitto(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[Mosquitto]:
    broker = start_mosquitto(tmp_path_factory.mktemp("mosquitto"), pki, USERS)
    yield broker
    broker.process.stop()


@pytest.fixture(scope="session")
def influxd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Influxd]:
    server = start_influxd(tmp_path_factory.mktemp("influxd"))
    yield server
    server.process.stop()


@pytest.fixture
def influx_db(influxd: Influxd, request: pytest.FixtureRequest) -> Iterator[InfluxSettings]:
    """A fresh database in the session's influxd, dropped afterwards."""
    name = "t_" + "".join(c if c.isalnum() else "_" for c in request.node.name)[:60]
    influxd.admin(f'DROP DATABASE "{name}"')
    influxd.admin(f'CREATE DATABASE "{name}"')
    yield InfluxSettings(url=influxd.url, database=name)
    influxd.admin(f'DROP DATABASE "{name}"')


def mqtt_settings(broker: Mosquitto, user: str, *, host: str = LOOPBACK,
                  ca_cert: Path | None = None, password: str | None = None) -> MqttSettings:
    return MqttSettings(host=host, port=broker.port, username=user,
                        password=USERS[user] if password is None else password,
                        ca_cert=ca_cert or broker.pki.ca_cert, topic=BASE_TOPIC)
