"""Every Grafana panel query of files/grafana/dashboards runs against a real InfluxDB.

Grafana cannot run offline here, so its side is reproduced: the macros Grafana expands in InfluxQL
($timeFilter, $__interval, a template variable) are expanded the same way for the panel's time
range (its relative override, or the dashboard's), and the query runs on influxd holding two
simulated meters' last three days. Each must succeed and return data.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from homeiot.adapters.influx import InfluxClient
from homeiot.config import InfluxSettings
from homeiot.core.lineprotocol import encode_reading
from homeiot.core.simulation import SimulatedMeter
from homeiot.core.slots import slot_reading

pytestmark = pytest.mark.integration

DASHBOARDS = Path(__file__).resolve().parents[3] / "files/grafana/dashboards"
SOURCES = ("meter1", "meter2")
TOKYO = ZoneInfo("Asia/Tokyo")
NOW = datetime.now(UTC).replace(microsecond=0)


def _dashboards() -> list[tuple[str, dict[str, Any]]]:
    return [(p.name, json.loads(p.read_text())) for p in sorted(DASHBOARDS.glob("*.json"))]


def _panel_queries() -> Iterator[Any]:
    for name, dashboard in _dashboards():
        for panel in dashboard["panels"]:
            for target in panel.get("targets", []):
                yield pytest.param(dashboard, panel, target["query"], id=f"{name}:{panel['title']}")


def _range(dashboard: dict[str, Any], panel: dict[str, Any]) -> tuple[datetime, datetime]:
    """The panel's time range as Grafana computes it: timeFrom overrides the dashboard's."""
    spec = panel.get("timeFrom") or dashboard["time"]["from"].removeprefix("now-")
    if spec == "now/d":  # today so far, in the viewer's zone (a household in Japan)
        return NOW.astimezone(TOKYO).replace(hour=0, minute=0, second=0).astimezone(UTC), NOW
    amount, unit = int(spec[:-1]), spec[-1]
    return NOW - timedelta(**{{"m": "minutes", "h": "hours", "d": "days"}[unit]: amount}), NOW


def expand(query: str, start: datetime, end: datetime, sources: tuple[str, ...]) -> str:
    """Grafana's InfluxQL macro expansion, for the macros our dashboards use."""
    window_ms = (end - start).total_seconds() * 1000
    interval_s = max(10, int(window_ms / 1000 / 1000))  # ~1000 points, at least the 10 s scrape
    expanded = (query
                .replace("$timeFilter", f"time >= {int(start.timestamp() * 1000)}ms and "
                                        f"time <= {int(end.timestamp() * 1000)}ms")
                .replace("$__interval", f"{interval_s}s")
                .replace("$source", "(" + "|".join(sources) + ")"))
    # A regex's end anchor "$/" stays; any "$name" left is a macro we do not expand.
    assert not re.search(r"\$[A-Za-z_{]", expanded), f"unexpanded macro in {expanded!r}"
    return expanded


@pytest.fixture(scope="module")
def seeded(influxd: Any) -> Iterator[InfluxSettings]:
    database = "t_dashboards"
    influxd.admin(f'DROP DATABASE "{database}"')
    influxd.admin(f'CREATE DATABASE "{database}"')
    settings = InfluxSettings(url=influxd.url, database=database)
    start = NOW - timedelta(days=3)
    steps = int((NOW - start) / timedelta(minutes=2))
    with InfluxClient(settings) as client:
        for source in SOURCES:
            meter = SimulatedMeter(source)
            client.write([encode_reading(meter.read(start + timedelta(minutes=2 * i)))
                          for i in range(1, steps + 1)])
            # The meter's half-hour readings, as a B-route meter delivers them (the completeness
            # panel counts them).
            first = start.replace(minute=0, second=0) + timedelta(hours=1)
            client.write([encode_reading(slot_reading(source, first + timedelta(minutes=30 * i),
                                                      1000.0 + i))
                          for i in range(int((NOW - first) / timedelta(minutes=30)))])
    yield settings
    influxd.admin(f'DROP DATABASE "{database}"')


def test_dashboards_exist_and_use_the_provisioned_datasource() -> None:
    dashboards = _dashboards()
    assert dashboards, f"no dashboards in {DASHBOARDS}"
    titles = {panel["title"] for _, d in dashboards for panel in d["panels"]}
    assert {"Power now", "Power", "Today's energy", "Energy per day", "30-minute profile"} <= titles
    for _, dashboard in dashboards:
        assert dashboard["uid"]
        for panel in dashboard["panels"]:
            assert panel["datasource"]["uid"] == "homeiot-influxdb", panel["title"]
            assert panel["targets"], panel["title"]


def test_template_variable_queries_return_every_source(seeded: InfluxSettings) -> None:
    with InfluxClient(seeded) as client:
        for _, dashboard in _dashboards():
            for variable in dashboard["templating"]["list"]:
                values = {row["value"] for row in client.rows(variable["query"])}
                assert values == set(SOURCES), variable["name"]


@pytest.mark.parametrize(("dashboard", "panel", "query"), list(_panel_queries()))
@pytest.mark.parametrize("sources", [("meter1",), SOURCES], ids=["one-meter", "all-meters"])
def test_panel_query_returns_data(seeded: InfluxSettings, dashboard: dict[str, Any],
                                  panel: dict[str, Any], query: str,
                                  sources: tuple[str, ...]) -> None:
    start, end = _range(dashboard, panel)
    statement = expand(query, start, end, sources)
    with InfluxClient(seeded) as client:
        rows = list(client.rows(statement))
    assert rows, f"{panel['title']}: no rows for {statement}"
    assert {row["source"] for row in rows} == set(sources)
    values = [v for row in rows for k, v in row.items()
              if k not in ("time", "source") and v is not None]
    assert values, f"{panel['title']}: only nulls"
    assert all(isinstance(v, float | int) and v >= 0 for v in values)
    if re.search(r"spread\(", query) and "time(" not in query:
        # Today's energy: 30 W at least, all day so far, for each meter.
        hours = (end - start).total_seconds() / 3600
        assert min(values) >= 0.03 * hours * 0.9 or hours < 0.1


def test_the_completeness_panel_counts_48_half_hours_on_a_complete_day(
        seeded: InfluxSettings) -> None:
    panel = next(p for _, d in _dashboards() for p in d["panels"]
                 if p["title"] == "Half hours per day (of 48)")
    yesterday = NOW.astimezone(TOKYO).replace(hour=0, minute=0, second=0) - timedelta(days=1)
    statement = expand(panel["targets"][0]["query"], yesterday.astimezone(UTC),
                       (yesterday + timedelta(days=1)).astimezone(UTC) - timedelta(seconds=1),
                       SOURCES)
    with InfluxClient(seeded) as client:
        rows = list(client.rows(statement))
    assert {row["source"]: row["count"] for row in rows} == dict.fromkeys(SOURCES, 48)
