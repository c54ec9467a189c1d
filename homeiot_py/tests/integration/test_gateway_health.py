"""Health that tells the truth: a dead writer stops the process (exit 1, nothing acknowledged),
/readyz says 503 and why, and the per-source metrics."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from homeiot.adapters.deadletters import DeadLetterStore
from homeiot.config import GatewaySettings, InfluxSettings
from tests.conftest import USERS
from tests.gateway_support import (
    Publisher,
    RunningGateway,
    gateway_env,
    gateway_settings,
    readiness,
    reading,
    start_gateway_process,
    stored_seqs,
    wait_until,
)
from tests.services import Influxd, Mosquitto, Pki, free_port, require_binary, start_mosquitto

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


class MountNamespace:
    """A private mount namespace (held by a ``sleep``) in which ``directory`` is a bind mount of
    itself, so it can be made read-only and writable again there — a real read-only file system
    for the processes started in it, and nothing changes outside. As root ``unshare -m``; as
    any other user ``unshare -rm`` (an unprivileged user namespace), which some kernels refuse:
    the test is then skipped, naming why."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        unshare, self._nsenter = require_binary("unshare"), require_binary("nsenter")
        user = [] if os.getuid() == 0 else ["-r"]
        self._enter = ["-m"] if os.getuid() == 0 else ["-U", "-m", "--preserve-credentials"]
        self.holder = subprocess.Popen(
            [unshare, *user, "-m", "--propagation", "private", "sh", "-c",
             'mount --bind "$0" "$0" && echo ready && exec sleep 3600', str(directory)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert self.holder.stdout is not None
        if self.holder.stdout.readline().strip() != b"ready":
            self.holder.wait(10)
            assert self.holder.stderr is not None
            why = self.holder.stderr.read().decode().strip()
            self.close()
            pytest.skip(f"no private mount namespace here: {why}")

    def prefix(self) -> list[str]:
        """The command prefix that runs a program inside the namespace."""
        return [self._nsenter, "-t", str(self.holder.pid), *self._enter]

    def remount(self, mode: str) -> None:
        subprocess.run([*self.prefix(), "mount", "-o", f"remount,bind,{mode}",
                        str(self.directory)], check=True, capture_output=True, timeout=30)

    def close(self) -> None:
        if self.holder.poll() is None:
            self.holder.kill()
        self.holder.wait()
        for pipe in (self.holder.stdout, self.holder.stderr):
            if pipe is not None:
                pipe.close()


def _gateway_in(namespace: MountNamespace, settings: GatewaySettings, log: Path,
                port: int) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen([*namespace.prefix(), sys.executable, "-m", "homeiot.cli.gateway"],
                                env=gateway_env(settings, port), stdout=out,
                                stderr=subprocess.STDOUT)


def test_drill_the_dead_letter_disk_made_read_only(
        broker: Mosquitto, influx_db: InfluxSettings, tmp_path: Path) -> None:
    """The dead-letter store's disk goes read-only (a real read-only mount, in a mount namespace
    of the test's own): the gateway says so at ERROR and in /readyz (503), keeps storing valid
    readings, acknowledges nothing it cannot set aside and exits 1 when such a message comes;
    once the disk is writable and the gateway restarted, everything arrives — counted by seq in
    InfluxDB — and the letter is stored once."""
    namespace = MountNamespace(tmp_path / "letters")
    settings = replace(gateway_settings(broker, influx_db, tmp_path),
                       dead_letter_db=namespace.directory / "dead.db")
    port = free_port()
    log = tmp_path / "gateway.log"
    publisher = Publisher(broker, "meter1")
    proc = None
    try:
        # A first run creates the store and stores 0..99; a clean stop closes the store's files.
        proc = _gateway_in(namespace, settings, log, port)
        wait_until(lambda: (r := readiness(port)) is not None and r.status_code == 200, 30,
                   "the gateway to be ready")
        publisher.publish_readings(reading(i) for i in range(100))
        publisher.wait_all()
        wait_until(lambda: len(stored_seqs(influx_db)) == 100, 30, "readings 0..99")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0

        namespace.remount("ro")
        with pytest.raises(subprocess.CalledProcessError):  # it is read-only for real
            subprocess.run([*namespace.prefix(), "touch", str(namespace.directory / "x")],
                           check=True, capture_output=True, timeout=30)
        proc = _gateway_in(namespace, settings, log, port)
        wait_until(lambda: (r := readiness(port)) is not None and r.status_code == 503, 30,
                   "/readyz to say 503")
        answer = readiness(port)
        assert answer is not None
        body = answer.json()
        assert any("read-only file system" in reason for reason in body["reasons"]), body
        publisher.publish_readings(reading(i) for i in range(100, 200))  # valid: they flow
        publisher.wait_all()
        wait_until(lambda: len(stored_seqs(influx_db)) == 200, 30, "readings 100..199")
        publisher.publish("meter1", b"not a reading: it must be set aside")
        publisher.publish_readings(reading(i) for i in range(200, 300))
        publisher.wait_all()
        assert proc.wait(60) == 1
        text = log.read_text()
        assert any("ERROR" in line and "is on a read-only file system" in line
                   for line in text.splitlines())
        assert "the writer thread died: StorageError" in text

        namespace.remount("rw")
        proc = _gateway_in(namespace, settings, log, port)
        wait_until(lambda: len(stored_seqs(influx_db)) == 300, 60, "readings 0..299")
        store = DeadLetterStore(settings.dead_letter_db)
        try:
            wait_until(lambda: store.count() == 1, 30, "the redelivered dead letter")
        finally:
            store.close()
        seqs = stored_seqs(influx_db)
        assert seqs == list(range(300))  # lost=0, dup=0, by seq in InfluxDB
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        publisher.close()
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        namespace.close()
