"""Each row of the InfluxDB answer → policy table (homeiot.core.writes), produced by a real
influxd and carried out by a real gateway: partial write, field type conflict, 401, 404, 413."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from homeiot.adapters.influx import InfluxClient
from homeiot.config import InfluxSettings
from homeiot.core import codec
from homeiot.core.reading import Reading
from tests.conftest import USERS
from tests.gateway_support import (
    T0,
    Publisher,
    RunningGateway,
    gateway_settings,
    reading,
    stored_seqs,
    wait_until,
)
from tests.services import Influxd, Mosquitto, Pki, start_influxd, start_mosquitto

pytestmark = pytest.mark.integration


@pytest.fixture
def broker(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[Mosquitto]:
    server = start_mosquitto(tmp_path_factory.mktemp("broker"), pki, USERS)
    yield server
    server.process.stop()


@pytest.fixture
def publisher(broker: Mosquitto) -> Iterator[Publisher]:
    pub = Publisher(broker, "meter1")
    yield pub
    pub.close()


def _acked_all(gw: RunningGateway) -> bool:
    return gw.gateway.pending == 0


def test_a_field_type_conflict_dead_letters_only_that_point(
        broker: Mosquitto, influx_db: InfluxSettings, tmp_path: Path, publisher: Publisher) -> None:
    # current_t_a exists as an integer in this shard: a float current_t_a is refused. InfluxDB
    # 1.6 says "partial write: field type conflict … dropped=1" without naming the line.
    with InfluxClient(influx_db) as client:
        client.write([f"meter_readings,source=other current_t_a=1i {int(T0.timestamp() * 1000)}"])
    gw = RunningGateway(gateway_settings(broker, influx_db, tmp_path, batch_age_s=0.5))
    try:
        readings = [reading(i) for i in range(20)]
        readings[7] = Reading("meter1", readings[7].ts, 7, 10.0, current_t_a=2.5)
        publisher.publish_readings(readings)
        publisher.wait_all()
        wait_until(lambda: gw.store.count() == 1, 30, "one dead letter")
        wait_until(lambda: _acked_all(gw), 10, "every message acknowledged")
        [letter] = gw.store.list()
        assert codec.decode(letter.letter.payload, "meter1").seq == 7
        assert "field type conflict" in letter.letter.error
    finally:
        gw.stop()
    assert stored_seqs(influx_db) == [i for i in range(20) if i != 7]


def test_an_unparsable_line_is_named_and_only_it_set_aside(
        broker: Mosquitto, influx_db: InfluxSettings, tmp_path: Path) -> None:
    """The 400 that names its line (PARTIAL): the adapter reports it, the rest is stored."""
    with InfluxClient(influx_db) as client:
        answer = client.write_answer(["meter_readings,source=a seq=1i 1000",
                                      "meter_readings,source=a seq=oops 2000"])
    assert answer.status == 400
    assert answer.refused == ("meter_readings,source=a seq=oops 2000",)
    with InfluxClient(influx_db) as client:
        rows = list(client.rows('SELECT "seq" FROM "meter_readings"'))
    assert [r["seq"] for r in rows] == [1]


def test_a_missing_database_stalls_acknowledges_nothing_and_resumes(
        broker: Mosquitto, influxd: Influxd, tmp_path: Path, publisher: Publisher,
        caplog: pytest.LogCaptureFixture) -> None:
    database = "t_missing_then_created"
    influxd.admin(f'DROP DATABASE "{database}"')
    influx = InfluxSettings(url=influxd.url, database=database)
    gw = RunningGateway(gateway_settings(broker, influx, tmp_path), stall_retry_s=0.5)
    try:
        with caplog.at_level(logging.INFO, logger="homeiot.services.gateway"):
            publisher.publish_readings(reading(i) for i in range(30))
            publisher.wait_all()
            wait_until(lambda: gw.gateway.influx_problem is not None, 20, "the stall")
            time.sleep(2.0)  # several slow retries
            assert gw.gateway.pending == 30  # nothing acknowledged, nothing dropped
            assert gw.store.count() == 0
            assert "404" in (gw.gateway.influx_problem or "")
            errors = [r for r in caplog.records if r.levelno == logging.ERROR
                      and "refuses to store" in r.getMessage()]
            assert len(errors) == 1  # once per change
            influxd.admin(f'CREATE DATABASE "{database}"')
            wait_until(lambda: _acked_all(gw), 30, "the stall to end")
        assert gw.gateway.influx_problem is None
        assert "InfluxDB stores again" in caplog.text
    finally:
        gw.stop()
        try:
            assert stored_seqs(influx) == list(range(30))
        finally:
            influxd.admin(f'DROP DATABASE "{database}"')


def test_refused_credentials_stall_until_the_user_exists(
        tmp_path_factory: pytest.TempPathFactory, broker: Mosquitto, tmp_path: Path,
        publisher: Publisher, caplog: pytest.LogCaptureFixture) -> None:
    server = start_influxd(tmp_path_factory.mktemp("influxd-auth"), auth_enabled=True)
    admin = ("admin", "admin-pass-0123")
    password = "gw#?/@:% pass"
    try:
        server.admin(f"CREATE USER admin WITH PASSWORD '{admin[1]}' WITH ALL PRIVILEGES")
        server.admin('CREATE DATABASE "homeiot"', auth=admin)
        influx = InfluxSettings(url=server.url, database="homeiot", auth="password",
                                username="gw", password=password)
        gw = RunningGateway(gateway_settings(broker, influx, tmp_path), stall_retry_s=0.5)
        try:
            with caplog.at_level(logging.INFO):
                publisher.publish_readings(reading(i) for i in range(10))
                publisher.wait_all()
                wait_until(lambda: gw.gateway.influx_problem is not None, 20, "the stall")
                time.sleep(1.5)
                assert "401" in (gw.gateway.influx_problem or "")
                assert gw.gateway.pending == 10
                server.admin(f"CREATE USER gw WITH PASSWORD '{password}'", auth=admin)
                server.admin('GRANT ALL ON "homeiot" TO gw', auth=admin)
                wait_until(lambda: _acked_all(gw), 30, "the stall to end")
        finally:
            gw.stop()
        assert password not in caplog.text
        with InfluxClient(replace(influx, username="admin", password=admin[1])) as client:
            rows = list(client.rows('SELECT "seq" FROM "meter_readings"'))
        assert sorted(r["seq"] for r in rows) == list(range(10))
    finally:
        server.process.stop()


def test_a_batch_too_large_is_split(
        tmp_path_factory: pytest.TempPathFactory, broker: Mosquitto, tmp_path: Path,
        publisher: Publisher) -> None:
    server = start_influxd(tmp_path_factory.mktemp("influxd-small"), max_body_size=2000)
    try:
        server.admin('CREATE DATABASE "homeiot"')
        influx = InfluxSettings(url=server.url, database="homeiot")
        gw = RunningGateway(gateway_settings(broker, influx, tmp_path, batch_age_s=1.0))
        try:
            publisher.publish_readings(reading(i) for i in range(100))  # ~15 kB of lines
            publisher.wait_all()
            wait_until(lambda: _acked_all(gw) and stored_seqs(influx) == list(range(100)), 30,
                       "every reading stored")
            assert gw.store.count() == 0
        finally:
            gw.stop()
    finally:
        server.process.stop()
