"""Produce -> queryable latency, measured inside the `app` container.

Polls the gateway's /api/v1/latest for SOURCE every 100 ms for SECONDS and records, for each new
`seq`, when it first became visible; latency = that moment - the reading's own `time` (stamped
by the Pi when the meter was read; the Pi and the server share this machine's clock). Prints one
JSON line: n, p50_s, p99_s, max_s, and the seqs seen. Run: python - SOURCE SECONDS < latency.py
"""

import json
import os
import sys
import time
import urllib.request
from datetime import datetime

source, seconds = sys.argv[1], float(sys.argv[2])
token = os.environ["API_TOKENS"].split(",")[0]
url = f"http://127.0.0.1:8000/api/v1/latest?source={source}"
seen: dict[int, float] = {}
deadline = time.time() + seconds
errors = 0
while time.time() < deadline:
    try:
        request = urllib.request.Request(url, headers={"Authorization": "Bearer " + token})
        body = json.load(urllib.request.urlopen(request, timeout=2))
        now = time.time()
        seq = body["seq"]
        if seq not in seen:
            seen[seq] = now - datetime.fromisoformat(body["time"]).timestamp()
    except Exception:  # noqa: BLE001 - counted and reported; the assertion is on n and p99
        errors += 1
    time.sleep(0.1)
first = min(seen) if seen else None
# The first seq seen may have been produced before polling began: not a latency sample.
samples = sorted(v for k, v in seen.items() if k != first)
if not samples:
    print(json.dumps({"n": 0, "errors": errors}))
    sys.exit(0)


def pct(p: float) -> float:
    return round(samples[min(len(samples) - 1, int(p * len(samples)))], 3)


print(json.dumps({"n": len(samples), "p50_s": pct(0.5), "p99_s": pct(0.99), "max_s": round(samples[-1], 3),
                  "errors": errors, "seq_first": first, "seq_last": max(seen)}))
