"""Every Grafana alert rule of files/grafana/alerting runs against a real InfluxDB, with data that
fires it and data that does not.

Grafana cannot run offline here, so its side of an evaluation is reproduced for the expression
types our rules use: query A runs on influxd, each series is reduced (``reduce``) and compared
(``threshold``); a query without series takes the rule's ``noDataState``. The rules' queries use
absolute ``now()`` windows, so nothing depends on Grafana's macro expansion.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509

from homeiot.adapters.influx import InfluxClient
from homeiot.config import InfluxSettings
from homeiot.core.lineprotocol import encode_reading
from homeiot.core.simulation import SimulatedMeter
from tests.gateway_support import Publisher, RunningGateway, gateway_settings, wait_until
from tests.services import Influxd, Mosquitto

pytestmark = pytest.mark.integration

ALERTING = Path(__file__).resolve().parents[3] / "files/grafana/alerting"


def _rules() -> dict[str, dict[str, Any]]:
    rules: dict[str, dict[str, Any]] = {}
    for path in sorted(ALERTING.glob("*.yml")):
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                rules[rule["uid"]] = rule
    return rules


RULES = _rules()
_REDUCERS: dict[str, Callable[[list[float]], float]] = {
    "last": lambda v: v[-1], "max": max, "min": min, "mean": lambda v: sum(v) / len(v)}
_EVALUATORS: dict[str, Callable[[float, list[float]], bool]] = {
    "lt": lambda x, p: x < p[0], "gt": lambda x, p: x > p[0]}


def evaluate(client: InfluxClient, rule: dict[str, Any]) -> dict[str, bool] | str:
    """Grafana's evaluation of ``rule``: {series labels: firing} per series, or the rule's
    noDataState when the query returns no series."""
    steps = {step["refId"]: step for step in rule["data"]}
    query = steps["A"]["model"]["query"]
    reduce = next(s["model"] for s in rule["data"] if s["model"].get("type") == "reduce")
    threshold = next(s["model"] for s in rule["data"] if s["model"].get("type") == "threshold")
    assert rule["condition"] == threshold["refId"]
    assert reduce["expression"] == "A"
    assert threshold["expression"] == reduce["refId"]
    evaluator = threshold["conditions"][0]["evaluator"]
    series: dict[str, list[float]] = {}
    for row in client.rows(query):
        labels = ",".join(f"{k}={v}" for k, v in sorted(row.items())
                          if k != "time" and not isinstance(v, int | float) and v is not None)
        values = [v for k, v in row.items() if k != "time" and isinstance(v, int | float)]
        if values:
            series.setdefault(labels, []).append(float(values[0]))
    if not series:
        return str(rule["noDataState"])
    return {labels: _EVALUATORS[evaluator["type"]](_REDUCERS[reduce["reducer"]](values),
                                                   evaluator["params"])
            for labels, values in series.items()}


@pytest.fixture
def client(influx_db: InfluxSettings) -> Iterator[InfluxClient]:
    with InfluxClient(influx_db) as c:
        yield c


def _now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def _status(component: str, at: datetime, **fields: float) -> str:
    values = ",".join(f"{k}={v}" for k, v in fields.items())
    return f"homeiot_status,component={component} {values} {int(at.timestamp() * 1000)}"


def test_every_rule_is_provisioned_for_the_homeiot_datasource() -> None:
    assert set(RULES) == {"homeiot-source-silent", "homeiot-archive-stale",
                          "homeiot-broker-cert-expiry", "homeiot-dead-letters"}
    for rule in RULES.values():
        query_steps = [s for s in rule["data"] if s["datasourceUid"] != "__expr__"]
        assert [s["datasourceUid"] for s in query_steps] == ["homeiot-influxdb"], rule["uid"]
        assert rule["noDataState"] in {"OK", "Alerting", "NoData"}
        assert rule["annotations"]["summary"]


def test_a_silent_source_fires_and_a_live_one_does_not(client: InfluxClient) -> None:
    now = _now()
    lines = []
    for source, stopped_min in (("live", 0), ("silent", 20), ("recent", 9)):
        meter = SimulatedMeter(source)
        # Two hours of readings every 30 s, ending `stopped_min` minutes ago.
        end = now - timedelta(minutes=stopped_min)
        lines += [encode_reading(meter.read(end - timedelta(seconds=30 * i))) for i in range(239, -1, -1)]
    client.write(lines)
    assert evaluate(client, RULES["homeiot-source-silent"]) == {
        "source=live": False, "source=recent": False, "source=silent": True}


def test_no_meter_at_all_is_not_a_silent_meter(client: InfluxClient) -> None:
    assert evaluate(client, RULES["homeiot-source-silent"]) == "OK"


def test_the_archive_alert_fires_without_a_run_in_36_hours(client: InfluxClient) -> None:
    rule = RULES["homeiot-archive-stale"]
    assert evaluate(client, rule) == "Alerting"  # never ran
    client.write([_status("archive", _now() - timedelta(hours=40), ok=1, days=1)])
    assert evaluate(client, rule) == "Alerting"  # the last run is too old
    client.write([_status("archive", _now() - timedelta(hours=20), ok=1, days=1)])
    assert evaluate(client, rule) == {"": False}


def test_the_certificate_alert_fires_within_30_days(client: InfluxClient) -> None:
    rule = RULES["homeiot-broker-cert-expiry"]
    assert evaluate(client, rule) == "OK"
    now = _now()
    client.write([_status("gateway", now - timedelta(minutes=5), broker_cert_days_left=400.0,
                          dead_letters=0)])
    assert evaluate(client, rule) == {"": False}
    client.write([_status("gateway", now - timedelta(minutes=1), broker_cert_days_left=29.5,
                          dead_letters=0)])
    assert evaluate(client, rule) == {"": True}


def test_the_dead_letter_alert_fires_on_an_increase_only(client: InfluxClient) -> None:
    rule = RULES["homeiot-dead-letters"]
    now = _now()
    client.write([_status("gateway", now - timedelta(minutes=m), dead_letters=3,
                          broker_cert_days_left=400.0) for m in (50, 30, 10)])
    assert evaluate(client, rule) == {"": False}  # letters held, none new
    client.write([_status("gateway", now - timedelta(minutes=2), dead_letters=5,
                          broker_cert_days_left=400.0)])
    assert evaluate(client, rule) == {"": True}


def test_replayed_dead_letters_do_not_fire(client: InfluxClient) -> None:
    now = _now()
    client.write([_status("gateway", now - timedelta(minutes=m), dead_letters=n,
                          broker_cert_days_left=400.0) for m, n in ((40, 7), (20, 0))])
    assert evaluate(client, RULES["homeiot-dead-letters"]) == {"": False}


# --- the signals come from the real components -------------------------------------------------


def test_a_successful_archive_run_clears_the_archive_alert(influx_db: InfluxSettings,
                                                           tmp_path: Path) -> None:
    """The archiver itself stores its success: after a real run the rule no longer fires."""
    env = {**os.environ, "INFLUXDB_URL": influx_db.url, "INFLUXDB_DB": influx_db.database,
           "ARCHIVE_PARQUET_ROOT": str(tmp_path / "parquet"),
           "ARCHIVE_DUCKDB_PATH": str(tmp_path / "duckdb" / "home_energy.duckdb")}
    rule = RULES["homeiot-archive-stale"]
    with InfluxClient(influx_db) as client:
        assert evaluate(client, rule) == "Alerting"
        yesterday = _now() - timedelta(days=1)
        meter = SimulatedMeter("meter1")
        client.write([encode_reading(meter.read(yesterday + timedelta(minutes=30 * i)))
                      for i in range(4)])
        done = subprocess.run([sys.executable, "-m", "homeiot_batch.run_archive"], env=env,
                              capture_output=True, text=True, timeout=300, check=False)
        assert done.returncode == 0, done.stderr
        assert evaluate(client, rule) == {"": False}
        rows = list(client.rows('SELECT "ok", "days", "rows" FROM "homeiot_status" '
                                "WHERE \"component\" = 'archive'"))
        assert len(rows) == 1
        assert rows[0]["ok"] == 1
        assert rows[0]["days"] >= 1
        assert rows[0]["rows"] >= 1


def test_a_failed_archive_run_leaves_the_alert_firing(influx_db: InfluxSettings,
                                                      tmp_path: Path) -> None:
    env = {**os.environ, "INFLUXDB_URL": influx_db.url, "INFLUXDB_DB": influx_db.database,
           "ARCHIVE_PARQUET_ROOT": str(tmp_path / "parquet"),
           "ARCHIVE_DUCKDB_PATH": str(tmp_path / "duckdb" / "home_energy.duckdb")}
    done = subprocess.run([sys.executable, "-m", "homeiot_batch.run_archive", "--date", "not-a-day"],
                          env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode != 0
    with InfluxClient(influx_db) as client:
        assert evaluate(client, RULES["homeiot-archive-stale"]) == "Alerting"


def test_the_gateway_stores_its_dead_letters_and_the_brokers_certificate(
        mosquitto: Mosquitto, influx_db: InfluxSettings, tmp_path: Path) -> None:
    """A real gateway connected over TLS stores the days left on the certificate the broker
    presented (the test PKI's) and the dead letters it holds; a new dead letter fires the rule."""
    running = RunningGateway(gateway_settings(mosquitto, influx_db, tmp_path))
    try:
        expires = x509.load_pem_x509_certificate(
            mosquitto.pki.server_cert.read_bytes()).not_valid_after_utc
        running.gateway.write_status()
        with InfluxClient(influx_db) as client:
            # The writer also stores a sample as it starts (before the TLS connection): the last.
            rows = list(client.rows('SELECT "dead_letters", "broker_cert_days_left" FROM '
                                    "\"homeiot_status\" WHERE \"component\" = 'gateway' "
                                    "ORDER BY time DESC LIMIT 1"))
            assert rows[0]["dead_letters"] == 0
            expected = (expires - datetime.now(UTC)).total_seconds() / 86_400
            assert abs(rows[0]["broker_cert_days_left"] - expected) < 0.1
            assert evaluate(client, RULES["homeiot-broker-cert-expiry"]) == {
                "": expected < 30}
            # A message InfluxDB can never take becomes a dead letter; the next sample shows it.
            publisher = Publisher(mosquitto, "meter1")
            try:
                publisher.publish("meter1", b'{"v": 1, "not": "a reading"}')
                publisher.wait_all()
            finally:
                publisher.close()
            wait_until(lambda: running.store.count() == 1, 10, "the dead letter")
            time.sleep(0.01)  # a later millisecond than the first sample
            running.gateway.write_status()
            assert evaluate(client, RULES["homeiot-dead-letters"]) == {"": True}
    finally:
        running.stop()


def test_a_status_the_gateway_cannot_store_is_a_warning_not_a_stop(
        mosquitto: Mosquitto, influxd: Influxd, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    missing = InfluxSettings(url=influxd.url, database="no_such_database_for_status")
    running = RunningGateway(gateway_settings(mosquitto, missing, tmp_path))
    try:
        running.gateway.write_status()
        running.gateway.write_status()
        warnings = [r for r in caplog.records if "cannot store the gateway's status" in r.getMessage()]
        assert len(warnings) == 1  # once per change, not every minute
        assert running.gateway.fatal_error is None
        assert not running.gateway.stopped
    finally:
        running.stop()


def test_a_dead_letter_store_that_cannot_be_read_is_a_warning_in_the_status(
        mosquitto: Mosquitto, influx_db: InfluxSettings, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    """The status is a monitor: a dead-letter store it cannot count is logged, not fatal (a
    store that cannot take a dead letter still stops the writer, where it matters)."""
    running = RunningGateway(gateway_settings(mosquitto, influx_db, tmp_path))
    try:
        running.store.close()  # a broken store: every query now fails in sqlite3
        running.gateway.write_status()
        assert any("cannot count the dead letters" in r.getMessage() for r in caplog.records)
        assert running.gateway.fatal_error is None
    finally:
        running.gateway.stop()
        running.influx.close()
