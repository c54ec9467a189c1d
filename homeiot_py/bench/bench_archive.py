"""Benchmark the archiver on one day of 1 Hz readings from 16 meters (1,382,400 points).

Reference measured in the same run: the raw export of that day — the same chunked InfluxQL query
fetched with curl to /dev/null. Then ``run_archive`` for that day (wall time and peak RSS), then
the same day again after the DuckDB history has grown to 90 days (reconciliation on, as in every
run: the day is yesterday, so the trailing 7-day window compares 6 archived days with InfluxDB).
After every run the rows of the day in the resulting Parquet partition and DuckDB table are
counted and the benchmark fails unless both equal the rows loaded. Prints one summary line;
asserts nothing about time.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import duckdb
from tests.services import start_influxd, vm_hwm_mb

from homeiot.adapters.influx import InfluxClient
from homeiot.config import InfluxSettings
from homeiot.core.days import day_window, yesterday
from homeiot.core.reading import epoch_ms

SOURCES = int(os.environ.get("BENCH_ARCHIVE_SOURCES", "16"))
SECONDS = 86_400
TZ = ZoneInfo("Asia/Tokyo")
#: Yesterday, so that reconciliation's trailing window (the 7 days through yesterday) covers the
#: archived history: in the 90-day runs it really compares 6 archived days with InfluxDB.
DAY = yesterday(datetime.now(UTC), TZ)
HISTORY_DAYS = 90


def load_day(influx: InfluxSettings, start_ms: int) -> int:
    """1 Hz readings for every source over the day, written in 10,000-line batches."""
    with InfluxClient(influx) as client:
        total = 0
        batch: list[str] = []
        for second in range(SECONDS):
            ts = start_ms + second * 1000
            for s in range(SOURCES):
                power = 200.0 + (second * 7 + s * 13) % 900
                batch.append(f"meter_readings,source=meter{s:02d} seq={second}i,power_w={power},"
                             f"current_r_a={power / 200},energy_normal_kwh="
                             f"{1000 + second / 3600} {ts}")
            if len(batch) >= 10_000:
                client.write(batch, batch_size=len(batch))
                total += len(batch)
                batch = []
        client.write(batch, batch_size=len(batch))
        return total + len(batch)


def raw_export_seconds(url: str, statement: str) -> float:
    started = time.perf_counter()
    # The very request run_archive makes: InfluxDB's CSV (Accept: application/csv), chunked.
    subprocess.run(["/usr/bin/curl", "-sfG", "-H", "Accept: application/csv", f"{url}/query",
                    "--data-urlencode", "db=bench",
                    "--data-urlencode", f"q={statement}", "--data-urlencode", "chunked=true",
                    "--data-urlencode", "chunk_size=10000", "--data-urlencode", "epoch=ms",
                    "-o", os.devnull], check=True)
    return time.perf_counter() - started


def _tree(pid: int) -> list[int]:
    """``pid`` and its descendants, from /proc (no scan of every process, unlike psutil)."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        children = []
    return [pid, *(p for child in children for p in _tree(int(child)))]


def timed_archive(env: dict[str, str]) -> tuple[float, float]:
    """Seconds and peak RSS (MB, the largest VmHWM of the process and its verifier) of
    ``run_archive --date DAY`` in its own process. VmHWM is the kernel's high-water mark, so a
    sample every 10 ms misses only what a process adds in its last 10 ms. The process tree comes
    from /proc/PID/task/PID/children: about 4 % of a core, where psutil's scan of every process
    on the machine took 17 % from the run it timed."""
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "homeiot_batch.run_archive", "--date",
                             DAY.isoformat()], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    peak = 0.0
    while proc.poll() is None:
        peak = max(peak, *(vm_hwm_mb(pid) for pid in _tree(proc.pid)))
        time.sleep(0.01)
    seconds = time.perf_counter() - started
    output = proc.stdout.read().decode() if proc.stdout else ""
    if proc.returncode != 0:
        raise RuntimeError(f"run_archive failed:\n{output}")
    return seconds, peak


def archived_rows(root: Path) -> tuple[int, int]:
    """Rows of DAY in the resulting Parquet partition (its files' footers) and DuckDB table (a
    fresh read-only connection): what was archived, not what was loaded."""
    import pyarrow.parquet as pq  # noqa: PLC0415

    partition = root / "parquet" / "raw_meter_readings" / f"dt={DAY.isoformat()}"
    in_parquet = sum(pq.ParquetFile(f).metadata.num_rows for f in partition.glob("*.parquet"))
    con = duckdb.connect(str(root / "duckdb" / "home_energy.duckdb"), read_only=True)
    row = con.execute("SELECT count(*) FROM raw_meter_readings WHERE dt = ?", [DAY]).fetchone()
    con.close()
    return int(in_parquet), int(row[0]) if row else 0


def checked_archive(env: dict[str, str], root: Path, loaded: int) -> tuple[float, float]:
    """:func:`timed_archive`, then fail unless Parquet and DuckDB hold every loaded row."""
    seconds, rss = timed_archive(env)
    in_parquet, in_duckdb = archived_rows(root)
    if not in_parquet == in_duckdb == loaded:
        raise SystemExit(f"archive_bench FAILED: loaded={loaded} parquet_rows={in_parquet} "
                         f"duckdb_rows={in_duckdb}")
    return seconds, rss


def grow_history(path: Path, rows_per_day: int) -> None:
    """Fill the live database with 89 more days of the same shape, as the archive would hold."""
    con = duckdb.connect(str(path))
    for offset in range(1, HISTORY_DAYS):
        day = DAY - timedelta(days=offset)
        con.execute(
            "INSERT INTO raw_meter_readings (ts, source, seq, power_w, current_r_a, "
            "energy_normal_kwh, dt) SELECT to_timestamp(epoch(?::TIMESTAMPTZ) + i // ?) , "
            "'meter' || lpad((i % ?)::VARCHAR, 2, '0'), i // ?, 200.0 + i % 900, 1.0, "
            "1000.0, ?::DATE FROM range(?) t(i)",
            [datetime.combine(day, datetime.min.time(), UTC), SOURCES, SOURCES, SOURCES, day,
             rows_per_day])
        con.execute("INSERT OR REPLACE INTO archive_days VALUES (?, ?, now())", [day, rows_per_day])
    con.execute("CHECKPOINT")
    con.close()


def main() -> None:
    start, end = day_window(DAY, TZ)
    with tempfile.TemporaryDirectory(prefix="bench-archive-") as tmp:
        root = Path(tmp)
        server = start_influxd(root / "influxd")
        try:
            server.admin('CREATE DATABASE "bench"')
            influx = InfluxSettings(url=server.url, database="bench", timeout_s=600)
            loaded_at = time.perf_counter()
            rows = load_day(influx, epoch_ms(start))
            print(f"loaded {rows} points in {time.perf_counter() - loaded_at:.0f} s",
                  file=sys.stderr)
            statement = (f'SELECT * FROM "meter_readings" WHERE time >= {epoch_ms(start)}ms '
                         f"AND time < {epoch_ms(end)}ms")
            env = {**os.environ, "INFLUXDB_URL": server.url, "INFLUXDB_DB": "bench",
                   "INFLUXDB_TIMEOUT_S": "600", "HOMEIOT_TIMEZONE": TZ.key,
                   "ARCHIVE_PARQUET_ROOT": str(root / "parquet"),
                   "ARCHIVE_DUCKDB_PATH": str(root / "duckdb" / "home_energy.duckdb")}
            # Best of three each, the reference and the archive taking turns, so that a load
            # that comes and goes on the machine meets both alike (the second and third runs
            # re-archive the same day).
            raws, runs = [], []
            for _ in range(3):
                raws.append(raw_export_seconds(server.url, statement))
                runs.append(checked_archive(env, root, rows))
            raw = min(raws)
            seconds, rss = min(r[0] for r in runs), max(r[1] for r in runs)
            print(f"raw exports {' '.join(f'{r:.2f}' for r in raws)} s; archive runs "
                  f"{' '.join(f'{r[0]:.2f}' for r in runs)} s", file=sys.stderr)
            grown_at = time.perf_counter()
            grow_history(root / "duckdb" / "home_energy.duckdb", rows)
            size_mb = (root / "duckdb" / "home_energy.duckdb").stat().st_size / 1e6
            print(f"history grown to {HISTORY_DAYS} days ({size_mb:.0f} MB) in "
                  f"{time.perf_counter() - grown_at:.0f} s", file=sys.stderr)
            runs90 = [checked_archive(env, root, rows) for _ in range(2)]
            seconds90, rss90 = min(r[0] for r in runs90), max(r[1] for r in runs90)
            print(f"90-day archive runs {' '.join(f'{r[0]:.2f}' for r in runs90)} s",
                  file=sys.stderr)
            archived = archived_rows(root)
        finally:
            server.process.stop()
    # rows= is what the archive holds at the end, read back from the Parquet footers and from
    # DuckDB (checked_archive fails unless both equal what was loaded after every run).
    print(f"archive_bench loaded={rows} rows={min(archived)} archived_parquet={archived[0]} "
          f"archived_duckdb={archived[1]} seconds={seconds:.1f} raw_export_seconds={raw:.1f} "
          f"ratio={seconds / raw:.2f} peak_rss_mb={max(rss, rss90):.0f} "
          f"history90_ratio={seconds90 / seconds:.2f}")


if __name__ == "__main__":
    main()
