"""Count a source's readings in InfluxDB by their per-source `seq`, inside the `app` container.

Every reading the Pi produced with seq < BELOW (the Pi's next seq when the check began) must be
in InfluxDB exactly once: lost = BELOW - distinct seqs found, dup = rows - distinct seqs.
Prints one JSON line. Run: python - SOURCE BELOW < seqcount.py
"""

import base64
import json
import os
import sys
import urllib.parse
import urllib.request

source, below = sys.argv[1], int(sys.argv[2])
measurement = os.environ.get("INFLUXDB_MEASUREMENT") or "meter_readings"
query = f"SELECT seq FROM \"{measurement}\" WHERE \"source\" = '{source}' AND seq < {below}"  # noqa: S608
params = urllib.parse.urlencode({"db": os.environ["INFLUXDB_DB"], "q": query, "epoch": "ms"})
request = urllib.request.Request(f"{os.environ['INFLUXDB_URL']}/query?{params}")
if os.environ.get("INFLUXDB_TOKEN"):
    request.add_header("Authorization", "Token " + os.environ["INFLUXDB_TOKEN"])
elif os.environ.get("INFLUXDB_USER"):
    basic = f"{os.environ['INFLUXDB_USER']}:{os.environ['INFLUXDB_PASSWORD']}".encode()
    request.add_header("Authorization", "Basic " + base64.b64encode(basic).decode())
body = json.load(urllib.request.urlopen(request, timeout=30))
series = body["results"][0].get("series", [])
seqs = [int(row[1]) for row in series[0]["values"]] if series else []
distinct = set(seqs)
missing = sorted(set(range(below)) - distinct)
print(json.dumps({"source": source, "produced": below, "rows": len(seqs), "distinct": len(distinct),
                  "lost": below - len(distinct & set(range(below))), "dup": len(seqs) - len(distinct),
                  "missing_first": missing[:10]}))
