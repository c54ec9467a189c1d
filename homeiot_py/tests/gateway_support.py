"""Helpers for gateway tests: settings for the real test services, a publisher, InfluxDB counts."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import quote
from zoneinfo import ZoneInfo

import httpx
import paho.mqtt.client as mqtt

from homeiot.adapters import mqtt as mqtt_adapter
from homeiot.adapters.deadletters import DeadLetterStore
from homeiot.adapters.influx import InfluxClient
from homeiot.config import GatewaySettings, InfluxSettings
from homeiot.core import codec
from homeiot.core.reading import Reading
from homeiot.services.gateway import Gateway
from tests.conftest import mqtt_settings
from tests.services import BASE_TOPIC, Mosquitto, free_port

API_TOKEN = "test-token-0123456789abcdef"
T0 = datetime(2025, 12, 16, 15, 0, tzinfo=UTC)


def gateway_settings(broker: Mosquitto, influx: InfluxSettings, tmp_path: Path, *,
                     client_id: str = "gw-test", share_group: str | None = None,
                     batch_size: int = 500, batch_age_s: float = 0.1) -> GatewaySettings:
    return GatewaySettings(
        mqtt=replace(mqtt_settings(broker, "gateway"), session_expiry_s=3600),
        influx=influx, client_id=client_id, share_group=share_group, batch_size=batch_size,
        batch_age_s=batch_age_s, dead_letter_db=tmp_path / f"{client_id}-dead.sqlite",
        api_tokens=(API_TOKEN,), timezone=ZoneInfo("Asia/Tokyo"))


def gateway_env(settings: GatewaySettings, api_port: int | None = None) -> dict[str, str]:
    """The environment that makes ``python -m homeiot.cli.gateway`` use ``settings``."""
    m = settings.mqtt
    url = f"mqtts://{quote(m.username, safe='')}:{quote(m.password, safe='')}@{m.host}:{m.port}"
    return {
        **os.environ,
        "MQTT_BROKER_URL": url, "MQTT_TLS_CA_CERT": str(m.ca_cert), "MQTT_TOPIC": m.topic,
        "MQTT_SESSION_EXPIRY_S": str(m.session_expiry_s),
        "GATEWAY_CLIENT_ID": settings.client_id,
        "GATEWAY_BATCH_SIZE": str(settings.batch_size),
        "GATEWAY_BATCH_AGE_S": str(settings.batch_age_s),
        "GATEWAY_DEAD_LETTER_DB": str(settings.dead_letter_db),
        "INFLUXDB_URL": settings.influx.url, "INFLUXDB_DB": settings.influx.database,
        "API_TOKENS": API_TOKEN, "API_HOST": "127.0.0.1",
        "API_PORT": str(api_port or free_port()),
    }


def start_gateway_process(settings: GatewaySettings, log: Path,
                          api_port: int | None = None) -> subprocess.Popen[bytes]:
    """``homeiot-gateway`` as its own process, its output appended to ``log``."""
    with log.open("ab") as out:
        return subprocess.Popen([sys.executable, "-m", "homeiot.cli.gateway"],
                                env=gateway_env(settings, api_port), stdout=out,
                                stderr=subprocess.STDOUT)


_CONNECTED = "connected: session_present"


def start_connected_gateway(settings: GatewaySettings, log: Path, *, interval_s: float = 0.1
                            ) -> subprocess.Popen[bytes]:
    """:func:`start_gateway_process`, returned once its log says it is connected (a log that
    earlier gateways wrote to as well is fine: their lines are counted out)."""
    earlier = log.read_text().count(_CONNECTED) if log.exists() else 0
    proc = start_gateway_process(settings, log)
    wait_until(lambda: log.read_text().count(_CONNECTED) > earlier, 60,
               "the gateway to connect", interval_s=interval_s)
    return proc


def readiness(port: int) -> httpx.Response | None:
    """The gateway's /readyz answer on ``port`` (asked with the API token, so it names its
    reasons), or None while nothing answers."""
    try:
        return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2,
                         headers={"Authorization": f"Bearer {API_TOKEN}"})
    except httpx.HTTPError:
        return None


class RunningGateway:
    """An in-process gateway with its own InfluxDB client and dead-letter store."""

    def __init__(self, settings: GatewaySettings, *, stall_retry_s: float = 30.0,
                 connect_timeout_s: float = 10.0) -> None:
        self.influx = InfluxClient(settings.influx)
        self.store = DeadLetterStore(settings.dead_letter_db)
        self.gateway = Gateway(settings, self.influx, self.store, stall_retry_s=stall_retry_s)
        self.closed = False
        self.gateway.start()
        try:
            wait_until(lambda: self.gateway.mqtt_connected, connect_timeout_s,
                       "the gateway to connect")
        except AssertionError:
            self.stop()
            raise
        time.sleep(0.3)  # let the SUBSCRIBE reach the broker before anyone publishes

    def stop(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.gateway.stop()
        self.store.close()
        self.influx.close()


def received_by_a_new_gateway(settings: GatewaySettings, *, settle_s: float = 1.5,
                              until: Callable[[], bool] | None = None) -> float | None:
    """How many messages a new gateway on ``settings``' session receives — what the broker
    delivers again — counted ``settle_s`` after ``until`` holds (if given)."""
    gw = RunningGateway(settings)
    try:
        if until is not None:
            wait_until(until, 30, "the new gateway's readings")
        time.sleep(settle_s)
        return gw.gateway.metrics.registry.get_sample_value("homeiot_messages_received_total")
    finally:
        gw.stop()


def reading(seq: int, source: str = "meter1", *, step_ms: int = 1000) -> Reading:
    return Reading(source, T0 + timedelta(milliseconds=seq * step_ms), seq, 100.0 + seq % 900,
                   current_r_a=1.5, energy_normal_kwh=1000.0 + seq / 1000)


class Publisher:
    """A publisher identity (meter1/meter2) that publishes QoS 1 and can wait for every PUBACK."""

    def __init__(self, broker: Mosquitto, user: str) -> None:
        settings = mqtt_settings(broker, user)
        self.client = mqtt_adapter.create_client(settings)
        self.client.max_inflight_messages_set(1000)
        self.client.max_queued_messages_set(0)
        mqtt_adapter.connect(self.client, settings, clean_start=True)
        mqtt_adapter.start(self.client)
        self.infos: list[mqtt.MQTTMessageInfo] = []

    def publish(self, source: str, payload: bytes) -> None:
        self.infos.append(self.client.publish(f"{BASE_TOPIC}/{source}", payload, qos=1))

    def publish_readings(self, readings: Iterable[Reading]) -> None:
        for r in readings:
            self.publish(r.source, codec.encode(r))

    def wait_all(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        for info in self.infos:
            info.wait_for_publish(max(0.1, deadline - time.monotonic()))
            assert info.is_published(), "broker did not acknowledge every publication"
        self.infos.clear()

    def close(self) -> None:
        mqtt_adapter.close(self.client)


def count_points(influx: InfluxSettings, measurement: str = "meter_readings") -> int:
    with InfluxClient(influx) as client:
        rows = list(client.rows(f'SELECT count("seq") FROM "{measurement}"'))
    return int(rows[0]["count"]) if rows else 0


def stored_seqs(influx: InfluxSettings, source: str = "meter1") -> list[int]:
    with InfluxClient(influx) as client:
        return sorted(r["seq"] for r in client.rows(
            'SELECT "seq" FROM "meter_readings" WHERE "source" = $s', params={"s": source}))


def wait_until(predicate: Callable[[], bool], timeout_s: float = 30.0, what: str = "",
               interval_s: float = 0.1) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what or predicate}")
