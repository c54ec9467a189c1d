"""Health that tells the truth: a dead writer stops the process (exit 1, nothing acknowledged),
/readyz says 503 and why, and the per-source metrics."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from homeiot.config import InfluxSettings
from tests.conftest import USERS
from tests.gateway_support import (
    Publisher,
    RunningGateway,
    gateway_settings,
    readiness,
    reading,
    start_gateway_process,
    wait_until,
)
from tests.services import Influxd, Mosquitto, Pki, free_port, start_mosquitto

pytestmark = pytest.mark.integration


@pytest.fixture
def broker(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[Mosquitto]:
    server = start_mosquitto(tmp_path_factory.mktemp("broker"), pki, USERS)
    yield server
    server.process.stop()


def test_a_locked_dead_letter_store_stops_the_gateway_loudly_and_nothing_is_lost(
        broker: Mosquitto, influx_db: InfluxSettings, tmp_path: Path) -> None:
    settings = gateway_settings(broker, influx_db, tmp_path)
    port = free_port()
    log = tmp_path / "gateway.log"
    proc = start_gateway_process(settings, log, api_port=port)
    holder = None
    publisher = Publisher(broker, "meter1")
    try:
        wait_until(lambda: (r := readiness(port)) is not None and r.status_code == 200, 30,
                   "the gateway to be ready")
        # Another process (replay-dead-letters, say) holds the store's write lock for good.
        holder = sqlite3.connect(settings.dead_letter_db, isolation_level=None)
        holder.execute("BEGIN EXCLUSIVE")
        publisher.publish("meter1", b"this is not a reading")
        publisher.wait_all()
        assert proc.wait(60) == 1
        text = log.read_text()
        assert "CRITICAL" in text
        assert "the writer thread died: StorageError: cannot store 1 dead letter(s)" in text
        assert "database is locked" in text
    finally:
        if holder is not None:
            holder.execute("ROLLBACK")
            holder.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # Nothing was acknowledged: a new gateway gets the message again and sets it aside.
    gw = RunningGateway(settings)
    try:
        wait_until(lambda: gw.store.count() == 1, 30, "the redelivered dead letter")
    finally:
        gw.stop()
        publisher.close()


def test_readyz_says_why_while_influxdb_refuses(
        broker: Mosquitto, influxd: Influxd, tmp_path: Path) -> None:
    influx = InfluxSettings(url=influxd.url, database="t_never_created")
    settings = gateway_settings(broker, influx, tmp_path)
    port = free_port()
    log = tmp_path / "gateway.log"
    proc = start_gateway_process(settings, log, api_port=port)
    publisher = Publisher(broker, "meter1")
    try:
        wait_until(lambda: (r := readiness(port)) is not None and r.status_code == 200, 30,
                   "the gateway to be ready")
        publisher.publish_readings([reading(1)])
        publisher.wait_all()
        wait_until(lambda: (r := readiness(port)) is not None and r.status_code == 503, 30,
                   "/readyz to say 503")
        answer = readiness(port)
        assert answer is not None
        body = answer.json()
        assert body["ready"] is False
        assert body["influxdb"] is True  # it answers its ping; it refuses to store
        assert any("404" in reason and "database not found" in reason
                   for reason in body["reasons"]), body
    finally:
        publisher.close()
        proc.terminate()
        proc.wait(20)


def test_per_source_metrics(broker: Mosquitto, influx_db: InfluxSettings, tmp_path: Path) -> None:
    gw = RunningGateway(gateway_settings(broker, influx_db, tmp_path))
    publisher = Publisher(broker, "meter1")
    try:
        publisher.publish_readings(reading(i) for i in (0, 1, 2, 5, 6))  # 3 and 4 skipped
        publisher.publish("meter1", b"bad")
        publisher.wait_all()
        registry = gw.gateway.metrics.registry

        def sample(name: str) -> float | None:
            return registry.get_sample_value(name, {"source": "meter1"})

        wait_until(lambda: sample("homeiot_source_points_written_total") == 5, 30, "5 stored")
        wait_until(lambda: sample("homeiot_source_dead_letters_total") == 1, 30, "1 letter")
        assert sample("homeiot_source_seq_gaps_total") == 2
        wait_until(lambda: sample("homeiot_source_unacked_messages") == 0, 10, "the gauge")
        assert sample("homeiot_last_reading_age_seconds") is not None
        assert registry.get_sample_value("homeiot_batch_latency_seconds_count") is not None
    finally:
        publisher.close()
        gw.stop()
