"""The lab's live view (molecule/lab/live.py) against the real gateway API on loopback, reading a
real influxd: it shows what InfluxDB holds (readings today, last power, today's kWh), refuses to
call a wrong token a reading, and fails loudly when no reading comes in time."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
import uvicorn
from prometheus_client import CollectorRegistry

from homeiot.adapters.deadletters import DeadLetterStore
from homeiot.adapters.influx import InfluxClient
from homeiot.config import InfluxSettings
from homeiot.core.lineprotocol import encode_reading
from homeiot.core.reading import Reading
from homeiot.services.api import ApiContext, create_app
from tests.gateway_support import API_TOKEN
from tests.services import LOOPBACK, free_port

pytestmark = pytest.mark.integration

LIVE = Path(__file__).resolve().parents[3] / "molecule" / "lab" / "live.py"
TOKYO = ZoneInfo("Asia/Tokyo")


@pytest.fixture
def api(influx_db: InfluxSettings, tmp_path: Path) -> Iterator[tuple[str, InfluxClient]]:
    """The API on a free loopback port (uvicorn in a thread), with the real clock."""
    influx = InfluxClient(influx_db)
    store = DeadLetterStore(tmp_path / "dead.sqlite")
    app = create_app(ApiContext(
        influx=influx, dead_letters=store, registry=CollectorRegistry(), tokens=(API_TOKEN,),
        measurement="meter_readings", timezone=TOKYO, source_default="meter1",
        mqtt_connected=lambda: True))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host=LOOPBACK, port=port, log_config=None,
                                           access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "the API did not start"
        time.sleep(0.05)
    yield f"http://{LOOPBACK}:{port}", influx
    server.should_exit = True
    thread.join(10)
    store.close()
    influx.close()


def _token_file(tmp_path: Path, token: str) -> Path:
    path = tmp_path / "api_token"
    path.write_text(token + "\n")
    return path


def _live(url: str, token_file: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(LIVE), "--url", url, "--token-file", str(token_file),
                           "--source", "meter1", *args],
                          capture_output=True, text=True, check=False, timeout=60)


def _seed_today(influx: InfluxClient) -> None:
    """Three readings of meter1 in the last seconds: 0.25 kWh apart, the last at 321.5 W."""
    now = datetime.now(UTC)
    if now.astimezone(TOKYO).time() < datetime.min.time().replace(second=10):
        time.sleep(10)  # not across Tokyo's midnight
        now = datetime.now(UTC)
    influx.write([encode_reading(Reading("meter1", now - timedelta(seconds=3 - i), 7 + i,
                                         300.0 + 10.75 * i, energy_normal_kwh=1000.0 + 0.25 * i,
                                         energy_reverse_kwh=0.0))
                  for i in range(3)])


def test_shows_what_influxdb_holds(api: tuple[str, InfluxClient], tmp_path: Path) -> None:
    url, influx = api
    _seed_today(influx)

    result = _live(url, _token_file(tmp_path, API_TOKEN), "--seconds", "0")

    assert result.returncode == 0, result.stderr
    line = result.stdout.strip()
    assert "meter1" in line
    assert "readings today      3" in line
    assert "last  321.5 W" in line
    assert "today 0.500 kWh" in line
    assert API_TOKEN not in result.stdout + result.stderr


def test_waits_for_the_first_reading(api: tuple[str, InfluxClient], tmp_path: Path) -> None:
    url, influx = api
    threading.Timer(2.0, _seed_today, args=(influx,)).start()

    result = _live(url, _token_file(tmp_path, API_TOKEN), "--wait", "30", "--seconds", "0",
                   "--started", str(time.time() - 100))

    assert result.returncode == 0, result.stderr
    assert "lab: first reading from meter1 after" in result.stdout
    assert "after `make lab` started" in result.stdout
    assert "readings today      3" in result.stdout


def test_a_wrong_token_is_not_a_reading(api: tuple[str, InfluxClient], tmp_path: Path) -> None:
    url, influx = api
    _seed_today(influx)

    result = _live(url, _token_file(tmp_path, "w" * 32), "--seconds", "0")

    assert result.returncode == 0
    assert "no reading yet (GET /api/v1/latest: 401)" in result.stdout
    assert "w" * 32 not in result.stdout + result.stderr


def test_no_reading_in_time_fails_loudly(api: tuple[str, InfluxClient], tmp_path: Path) -> None:
    url, _ = api

    result = _live(url, _token_file(tmp_path, API_TOKEN), "--wait", "2")

    assert result.returncode == 1
    assert "no reading from meter1 within 2 s" in result.stderr
    assert "journalctl -u homeiot-publisher" in result.stderr


def test_no_api_and_no_token_file(tmp_path: Path) -> None:
    down = _live(f"http://{LOOPBACK}:{free_port()}", _token_file(tmp_path, API_TOKEN), "--seconds", "0")
    assert down.returncode == 0
    assert "no reading yet (GET /api/v1/latest: no answer)" in down.stdout

    missing = _live(f"http://{LOOPBACK}:{free_port()}", tmp_path / "absent", "--seconds", "0")
    assert missing.returncode == 2
    assert "cannot read the API token" in missing.stderr
