"""The lab's live view (``make lab``, ``make lab-status``): per source, the readings InfluxDB holds
for today, the last power and today's kWh so far, read from the gateway API on the control node's
loopback with the lab's API token (read from its file, never printed).

    live.py --url http://127.0.0.1:18000 --token-file .cache/homeiot-lab/secrets/api_token \
            --source meter1 [--wait 300] [--seconds 20] [--started EPOCH]

``--wait`` first waits until every source has a reading (exit 1 when none came in time);
``--seconds 0`` prints one snapshot. Standard library only: it runs with any Python 3.11.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

EVERY_S = 4.0


class Api:
    """GET requests to the gateway API with a bearer token."""

    def __init__(self, url: str, token: str) -> None:
        if not url.startswith("http://"):
            raise SystemExit(f"lab: the API URL must be http:// on loopback, not {url!r}")
        self._url = url.rstrip("/")
        self._token = token

    def get(self, path: str, **query: str) -> tuple[int, Any]:
        """(HTTP status, decoded JSON body); status 0 when the API did not answer."""
        url = f"{self._url}{path}?{urllib.parse.urlencode(query)}"
        request = urllib.request.Request(  # noqa: S310 - __init__ allows http:// only
            url, headers={"Authorization": f"Bearer {self._token}"})
        try:
            with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310
                return response.status, json.load(response)
        except urllib.error.HTTPError as error:
            return error.code, None
        except (urllib.error.URLError, OSError, ValueError):
            return 0, None


def snapshot(api: Api, source: str) -> str:
    """One line: readings stored today, the last power and its age, today's kWh so far."""
    status, latest = api.get("/api/v1/latest", source=source)
    if status != 200 or not isinstance(latest, dict):
        return f"{source:<10} no reading yet (GET /api/v1/latest: {status or 'no answer'})"
    age = datetime.now(UTC) - datetime.fromisoformat(str(latest["time"]))
    power = latest.get("power_w")
    _, completeness = api.get("/api/v1/completeness", source=source)
    _, energy = api.get("/api/v1/energy/daily", source=source)
    readings = _today(completeness, "readings")
    kwh = _today(energy, "energy_normal_kwh")
    return (f"{source:<10} readings today {readings if readings is not None else '?':>6}   "
            f"last {power if power is not None else '?':>6} W ({age.total_seconds():4.1f} s ago)   "
            f"today {f'{kwh:.3f}' if isinstance(kwh, int | float) else '?'} kWh")


def _today(report: Any, key: str) -> Any:
    """``key`` of the report's last day (today in the API's time zone), or None."""
    if isinstance(report, dict) and report.get("days"):
        return report["days"][-1].get(key)
    return None


def wait_for_readings(api: Api, sources: list[str], timeout_s: float, started: float | None) -> bool:
    """Wait until every source has a reading; print progress every 10 s."""
    begin = time.monotonic()
    next_note = begin + 10
    while True:
        missing = [s for s in sources if api.get("/api/v1/latest", source=s)[0] != 200]
        if not missing:
            since = f", {time.time() - started:.0f} s after `make lab` started" if started else ""
            print(f"lab: first reading from {', '.join(sources)} after "
                  f"{time.monotonic() - begin:.0f} s of waiting{since}", flush=True)
            return True
        now = time.monotonic()
        if now - begin > timeout_s:
            print(f"lab: no reading from {', '.join(missing)} within {timeout_s:.0f} s; look at the Pi "
                  "(make lab-shell HOST=pi, then journalctl -u homeiot-publisher) and the "
                  "gateway (make lab-shell HOST=server, then cd /opt/homeiot && docker compose logs app)",
                  file=sys.stderr, flush=True)
            return False
        if now >= next_note:
            print(f"  waiting for the first reading: {now - begin:.0f} s", flush=True)
            next_note = now + 10
        time.sleep(1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--token-file", required=True, type=Path)
    parser.add_argument("--source", action="append", required=True, dest="sources")
    parser.add_argument("--wait", type=float, default=0.0, help="seconds to wait for a first reading")
    parser.add_argument("--seconds", type=float, default=20.0, help="how long to show; 0: once")
    parser.add_argument("--started", type=float, default=None, help="epoch seconds `make lab` began")
    args = parser.parse_args(argv)
    try:
        token = args.token_file.read_text(encoding="utf-8").strip()
    except OSError as error:
        print(f"lab: cannot read the API token {args.token_file}: {error.strerror}", file=sys.stderr)
        return 2
    api = Api(args.url, token)
    if args.wait and not wait_for_readings(api, args.sources, args.wait, args.started):
        return 1
    end = time.monotonic() + args.seconds
    while True:
        stamp = datetime.now().astimezone().strftime("%H:%M:%S")
        for source in args.sources:
            print(f"  {stamp}  {snapshot(api, source)}", flush=True)
        if time.monotonic() + EVERY_S > end:
            return 0
        time.sleep(EVERY_S)


if __name__ == "__main__":
    sys.exit(main())
