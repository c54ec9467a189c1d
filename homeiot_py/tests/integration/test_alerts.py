"""Every Grafana alert rule of files/grafana/alerting runs against a real InfluxDB, with data that
fires it and data that does not.

Grafana cannot run offline here, so its side of an evaluation is reproduced for the expression
types our rules use: query A runs on influxd, each series is reduced (``reduce``) and compared
(``threshold``); a query without series takes the rule's ``noDataState``. The rules' queries use
absolute ``now()`` windows, so nothing depends on Grafana's macro expansion.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from homeiot.adapters.influx import InfluxClient
from homeiot.config import InfluxSettings
from homeiot.core.lineprotocol import encode_reading
from homeiot.core.simulation import SimulatedMeter

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
