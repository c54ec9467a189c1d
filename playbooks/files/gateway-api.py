"""Questions to the gateway's own API, asked from inside the app container.

    python - latest SOURCE              -> the newest reading's JSON, or null (none yet)
    python - wait SOURCE AFTER TIMEOUT  -> waits until a reading newer than AFTER (an ISO 8601
                                           time as the API returns it, or "null") is queryable;
                                           prints it with the seconds waited; exit 1 on timeout
    python - caught-up TIMEOUT          -> waits until the gateway is ready and has no message
                                           received but not yet stored (three checks in a row);
                                           exit 1 on timeout

Run by playbooks/replace-pi.yml as `docker compose exec -T app python - …` (stdin): the API
listens on the compose network only, and the container's API_TOKENS holds its tokens. Standard
library only.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from datetime import datetime
from typing import Any

BASE = "http://127.0.0.1:8000"


def _get(path: str) -> tuple[int, bytes]:
    token = os.environ["API_TOKENS"].split(",")[0]
    request = urllib.request.Request(BASE + path, headers={"Authorization": "Bearer " + token})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def newest(source: str) -> dict[str, Any] | None:
    status, body = _get("/api/v1/latest?" + urllib.parse.urlencode({"source": source}))
    if status == 404:  # no reading of this source yet
        return None
    if status != 200:
        raise OSError(f"/api/v1/latest answered {status}: {body[:200]!r}")
    reading: dict[str, Any] = json.loads(body)
    return reading


def wait_for_reading(source: str, after_text: str, timeout_s: float) -> int:
    after = None if after_text == "null" else datetime.fromisoformat(after_text)
    started = time.monotonic()
    last_error = ""
    while time.monotonic() - started < timeout_s:
        try:
            reading = newest(source)
        except (OSError, ValueError) as exc:  # the app restarting, a half-written answer
            last_error = f"; last API error: {exc}"
            reading = None
        if reading is not None and (after is None
                                    or datetime.fromisoformat(reading["time"]) > after):
            reading["waited_s"] = round(time.monotonic() - started, 1)
            print(json.dumps(reading))
            return 0
        time.sleep(2)
    print(f"no reading of source {source!r} newer than {after_text} within {timeout_s:g} s"
          f"{last_error}", file=sys.stderr)
    return 1


def wait_caught_up(timeout_s: float) -> int:
    started = time.monotonic()
    in_a_row = 0
    state = "no answer yet"
    while time.monotonic() - started < timeout_s:
        try:
            ready, readiness = _get("/readyz")
            _, metrics = _get("/metrics")
            found = re.search(rb"(?m)^homeiot_backlog_messages (\S+)$", metrics)
            backlog = float(found.group(1)) if found else None
            state = f"/readyz {ready} {readiness[:300]!r}, backlog {backlog}"
            in_a_row = in_a_row + 1 if ready == 200 and backlog == 0 else 0
        except (OSError, ValueError) as exc:
            state, in_a_row = f"API error: {exc}", 0
        if in_a_row >= 3:
            print(json.dumps({"caught_up": True, "waited_s": round(time.monotonic() - started, 1)}))
            return 0
        time.sleep(1)
    print(f"the gateway did not catch up within {timeout_s:g} s: {state}", file=sys.stderr)
    return 1


def main(argv: list[str]) -> int:
    match argv:
        case ["latest", source]:
            print(json.dumps(newest(source)))
            return 0
        case ["wait", source, after, timeout]:
            return wait_for_reading(source, after, float(timeout))
        case ["caught-up", timeout]:
            return wait_caught_up(float(timeout))
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
