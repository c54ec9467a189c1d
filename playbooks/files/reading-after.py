"""The newest reading of one source through the gateway's own API, from inside the app container.

    python - SOURCE                    -> prints the newest reading's JSON, or null (none yet)
    python - SOURCE AFTER TIMEOUT_S    -> waits until a reading newer than AFTER (an ISO 8601
                                          timestamp as the API returns it, or "null") is queryable;
                                          prints it with the seconds waited; exits 1 on timeout

Run by playbooks/replace-pi.yml as `docker compose exec -T app python - …` (stdin): the API
listens on the compose network only, and the container's API_TOKENS holds its tokens. Standard
library only.
"""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from datetime import datetime
from typing import Any


def newest(source: str) -> dict[str, Any] | None:
    url = "http://127.0.0.1:8000/api/v1/latest?" + urllib.parse.urlencode({"source": source})
    token = os.environ["API_TOKENS"].split(",")[0]
    request = urllib.request.Request(url, headers={"Authorization": "Bearer " + token})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            body: dict[str, Any] = json.load(response)
            return body
    except urllib.error.HTTPError as exc:
        if exc.code == 404:  # no reading of this source yet
            return None
        raise


def main() -> int:
    source = sys.argv[1]
    if len(sys.argv) == 2:
        print(json.dumps(newest(source)))
        return 0
    after = None if sys.argv[2] == "null" else datetime.fromisoformat(sys.argv[2])
    deadline = time.monotonic() + float(sys.argv[3])
    started = time.monotonic()
    last_error = ""
    while time.monotonic() < deadline:
        try:
            reading = newest(source)
        except (OSError, ValueError) as exc:  # the app restarting, a half-written answer
            last_error = f"; last API error: {exc}"
            reading = None
        if reading is not None and (after is None or datetime.fromisoformat(reading["time"]) > after):
            reading["waited_s"] = round(time.monotonic() - started, 1)
            print(json.dumps(reading))
            return 0
        time.sleep(2)
    print(f"no reading of source {source!r} newer than {sys.argv[2]} within {sys.argv[3]} s"
          f"{last_error}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
