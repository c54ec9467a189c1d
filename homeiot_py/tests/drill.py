"""The publisher drill: real Mosquitto, a real gateway and influxd, a publisher process, a broker
outage and a SIGKILL.

The publisher publishes ``rate`` readings/s for ``duration`` s; the broker is stopped for the
middle third, and the publisher is killed with SIGKILL once (at three quarters) and restarted.
An in-process gateway stores what arrives in InfluxDB and sends receipts, so the publisher's outbox
drains only as InfluxDB stores. ``lost`` counts the seqs the outbox numbered that are not rows in
InfluxDB; ``dup`` counts rows beyond one per seq. Used by ``make drill-publisher`` (60 s) and,
shorter, by the test suite.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import quote

import paho.mqtt.client as mqtt

from homeiot.adapters import mqtt as mqtt_adapter
from homeiot.adapters.influx import InfluxClient
from homeiot.config import InfluxSettings
from tests.conftest import USERS, mqtt_settings
from tests.services import (
    BASE_TOPIC,
    Influxd,
    Mosquitto,
    make_pki,
    start_influxd,
    start_mosquitto,
    vm_hwm_mb,
)


@dataclass(frozen=True)
class DrillResult:
    produced: int
    delivered_unique: int
    lost: int
    dup: int
    rss_mb: float
    waiting: int = 0

    def line(self) -> str:
        return (f"publisher_drill produced={self.produced} stored_unique={self.delivered_unique}"
                f" waiting={self.waiting} lost={self.lost} dup={self.dup} rss_mb={self.rss_mb:.1f}")


def publisher_env(broker: Mosquitto, outbox: Path, rate: float) -> dict[str, str]:
    password = quote(USERS["meter1"], safe="")
    return {**os.environ,
            "MQTT_BROKER_URL": f"mqtts://meter1:{password}@127.0.0.1:{broker.port}",
            "MQTT_TLS_CA_CERT": str(broker.pki.ca_cert), "MQTT_TOPIC": BASE_TOPIC,
            "SOURCE_DEFAULT": "meter1", "PUBLISHER_METER": "simulated",
            "PUBLISHER_INTERVAL_S": str(1 / rate), "PUBLISHER_OUTBOX": str(outbox),
            "PUBLISHER_BACKLOG_RATE": "500", "PUBLISHER_WINDOW": "200"}


class Subscriber:
    """The gateway identity on a persistent session, recording every seq of meter1."""

    def __init__(self, broker: Mosquitto, source: str = "meter1") -> None:
        self.seqs: list[int] = []
        self._lock = threading.Lock()
        settings = replace(mqtt_settings(broker, "gateway"), session_expiry_s=3600)
        self.client = mqtt_adapter.create_client(settings, client_id=f"drill-subscriber-{source}")
        self.client.on_message = self._on_message
        self.client.on_connect = lambda c, *a: c.subscribe(f"{BASE_TOPIC}/{source}", qos=1)
        mqtt_adapter.connect(self.client, settings, clean_start=False)
        mqtt_adapter.start(self.client)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        seq = json.loads(msg.payload)["seq"]
        with self._lock:
            self.seqs.append(seq)

    def snapshot(self) -> list[int]:
        with self._lock:
            return list(self.seqs)


def wait_for(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.1)


def outbox_seqs(outbox: Path, source: str = "meter1") -> set[int]:
    """The seqs of ``source`` still in the outbox."""
    con = sqlite3.connect(f"file:{outbox}?mode=ro", uri=True)
    try:
        return {r[0] for r in con.execute("SELECT seq FROM outbox WHERE source = ?", (source,))}
    finally:
        con.close()


def outbox_state(outbox: Path, source: str = "meter1") -> tuple[int, int]:
    """(rows waiting, next seq of ``source``), read from another process (WAL allows it)."""
    con = sqlite3.connect(f"file:{outbox}?mode=ro", uri=True)
    try:
        if con.execute("SELECT count(*) FROM sqlite_master WHERE name = 'outbox'").fetchone()[0] == 0:
            return 0, 0  # the publisher has not created it yet
        (waiting,) = con.execute("SELECT count(*) FROM outbox").fetchone()
        row = con.execute("SELECT next_seq FROM sequences WHERE source = ?", (source,)).fetchone()
    finally:
        con.close()
    return int(waiting), int(row[0]) if row else 0


def stored_seqs(influx: InfluxSettings, source: str = "meter1") -> list[int]:
    """Every stored seq of ``source``, one per row (a duplicate row would repeat a seq)."""
    with InfluxClient(influx) as client:
        return [int(r["seq"]) for r in client.rows(
            'SELECT "seq" FROM "meter_readings" WHERE "source" = $s', params={"s": source})]


def start_gateway(broker: Mosquitto, influxd: Influxd, root: Path, database: str) -> Any:
    """An in-process gateway (tests.gateway_support.RunningGateway) on a fresh database."""
    from tests.gateway_support import RunningGateway, gateway_settings  # noqa: PLC0415

    influxd.admin(f'CREATE DATABASE "{database}"')
    influx = InfluxSettings(url=influxd.url, database=database)
    return RunningGateway(gateway_settings(broker, influx, root, client_id=f"gw-{database}"))


def run_drill(root: Path, *, duration_s: float, rate: float) -> DrillResult:
    broker = start_mosquitto(root / "broker", make_pki(root / "pki"), USERS)
    influxd = start_influxd(root / "influxd")
    gateway = start_gateway(broker, influxd, root, "drill")
    outbox = root / "outbox.sqlite"
    env = {**publisher_env(broker, outbox, rate), "PUBLISHER_RECEIPT_TIMEOUT_S": "5"}
    log = (root / "publisher.log").open("ab")
    peak = 0.0

    def start() -> subprocess.Popen[bytes]:
        return subprocess.Popen([sys.executable, "-m", "homeiot.cli.publisher"], env=env, stdout=log,
                                stderr=subprocess.STDOUT)

    def run_for(proc: subprocess.Popen[bytes], seconds: float) -> None:
        nonlocal peak
        until = time.monotonic() + seconds
        while time.monotonic() < until:
            peak = max(peak, vm_hwm_mb(proc.pid))
            time.sleep(0.05)

    try:
        proc = start()
        run_for(proc, duration_s / 3)
        broker.process.stop()                  # the broker is down for the middle third
        run_for(proc, duration_s / 3)
        broker.process.start()
        run_for(proc, duration_s / 12)
        proc.send_signal(signal.SIGKILL)       # a power cut, as far as the process can tell
        proc.wait(10)
        proc = start()
        run_for(proc, duration_s / 4 - duration_s / 12)
        # Stop the meter's input by letting the outbox drain (receipts), then stop cleanly.
        # The meter never stops, so a few of the newest readings always await their receipt.
        deadline = time.monotonic() + 90
        while outbox_state(outbox)[0] > 5 and time.monotonic() < deadline:
            run_for(proc, 0.2)
        proc.send_signal(signal.SIGTERM)
        if proc.wait(15) != 0:
            raise RuntimeError("the publisher did not stop cleanly")
        waiting, produced = outbox_state(outbox)
        kept = outbox_seqs(outbox)  # read after the stop: not lost, still to be sent
        gateway.stop()
        seqs = stored_seqs(InfluxSettings(url=influxd.url, database="drill"))
    finally:
        gateway.stop()
        broker.process.stop()
        influxd.process.stop()
        log.close()
    unique = {s for s in seqs if 0 <= s < produced}
    lost = set(range(produced)) - unique - kept
    return DrillResult(produced, len(unique), len(lost), len(seqs) - len(set(seqs)), peak,
                       waiting)


def main() -> None:
    import tempfile  # noqa: PLC0415

    with tempfile.TemporaryDirectory(prefix="drill-publisher-") as tmp:
        result = run_drill(Path(tmp), duration_s=float(os.environ.get("DRILL_SECONDS", "60")),
                           rate=20)
    print(result.line())


if __name__ == "__main__":
    main()
