"""The issue's drills, end to end: a publisher process, a real broker, a real gateway and influxd,
counted by seq from the rows InfluxDB holds (plus what is still in the outbox: kept, not lost).
0 lost, 0 duplicate rows in each."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from homeiot.config import GatewaySettings, InfluxSettings
from tests.conftest import USERS
from tests.drill import outbox_seqs, outbox_state, publisher_env, stored_seqs, wait_for
from tests.gateway_support import RunningGateway, gateway_settings
from tests.services import Mosquitto, Pki, start_mosquitto

pytestmark = pytest.mark.integration


@pytest.fixture
def broker(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[Mosquitto]:
    server = start_mosquitto(tmp_path_factory.mktemp("broker"), pki, USERS)
    yield server
    server.process.stop()


class PublisherProcess:
    def __init__(self, broker: Mosquitto, root: Path) -> None:
        self.outbox = root / "outbox.sqlite"
        self.log = root / "publisher.log"
        env = {**publisher_env(broker, self.outbox, 20), "PUBLISHER_RECEIPT_TIMEOUT_S": "1"}
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "homeiot.cli.publisher"], env=env,
                                         stdout=out, stderr=subprocess.STDOUT)
        wait_for(self.outbox.exists, 30, "the outbox")

    def drain_and_stop(self, timeout_s: float = 90) -> None:
        wait_for(lambda: outbox_state(self.outbox)[0] < 5, timeout_s, "the outbox to drain")
        self.proc.send_signal(signal.SIGTERM)
        assert self.proc.wait(20) == 0

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _count(influx: InfluxSettings, publisher: PublisherProcess) -> tuple[int, int, int]:
    """(produced, lost, duplicate rows), by seq."""
    produced = outbox_state(publisher.outbox)[1]
    rows = stored_seqs(influx)
    lost = set(range(produced)) - set(rows) - outbox_seqs(publisher.outbox)
    return produced, len(lost), len(rows) - len(set(rows))


def _away(settings: GatewaySettings) -> None:
    """Register the gateway's persistent session, then leave."""
    RunningGateway(settings).stop()


def test_drill_broker_sigkilled_with_its_persistence_deleted_while_the_gateway_is_away(
        broker: Mosquitto, influx_db: InfluxSettings, tmp_path: Path) -> None:
    settings = gateway_settings(broker, influx_db, tmp_path)
    _away(settings)
    publisher = PublisherProcess(broker, tmp_path)
    try:
        time.sleep(4)  # readings queue in the broker for the gateway's session
        broker.process.stop(signal.SIGKILL)  # before its autosave? it no longer matters:
        for path in (broker.directory / "data").glob("mosquitto.db*"):
            path.unlink()  # the queue is gone
        broker.process.start()
        time.sleep(2)
        gateway = RunningGateway(settings)
        try:
            publisher.drain_and_stop()
        finally:
            gateway.stop()
    finally:
        publisher.kill()
    produced, lost, dup = _count(influx_db, publisher)
    print(f"drill broker_sigkill_no_persistence produced={produced} lost={lost} dup={dup}")
    assert produced >= 80
    assert (lost, dup) == (0, 0)


def test_drill_gateway_away_past_its_session_expiry(
        broker: Mosquitto, influx_db: InfluxSettings, tmp_path: Path) -> None:
    settings = gateway_settings(broker, influx_db, tmp_path)
    settings = replace(settings, mqtt=replace(settings.mqtt, session_expiry_s=2))
    _away(settings)
    publisher = PublisherProcess(broker, tmp_path)
    try:
        time.sleep(6)  # the session expires after 2 s: the broker then drops what it had queued
        assert "No matching subscribers (0x10)" in publisher.log.read_text()
        gateway = RunningGateway(settings)
        try:
            publisher.drain_and_stop()
        finally:
            gateway.stop()
    finally:
        publisher.kill()
    produced, lost, dup = _count(influx_db, publisher)
    print(f"drill gateway_past_session_expiry produced={produced} lost={lost} dup={dup}")
    assert produced >= 100
    assert (lost, dup) == (0, 0)
