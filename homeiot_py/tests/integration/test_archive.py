"""The archiver against real influxd, pyarrow and DuckDB: the seed's flow and everything around it."""

from __future__ import annotations

import fcntl
import os
import re
import subprocess
import sys
import threading
from dataclasses import replace
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import duckdb
import pyarrow.dataset as ds
import pytest

from homeiot.adapters import duckdb_store
from homeiot.adapters.duckdb_store import ArchivePaths
from homeiot.adapters.influx import InfluxClient
from homeiot.config import ArchiveSettings, InfluxSettings
from homeiot.core.days import yesterday
from homeiot.core.lineprotocol import encode_reading
from homeiot.core.reading import Reading
from homeiot.core.slots import slot_reading
from homeiot.services.archiver import KILL_AT_ENV, KILL_POINTS, archive_days, first_influx_day
from tests.services import CuttingRelay

pytestmark = pytest.mark.integration

TOKYO = ZoneInfo("Asia/Tokyo")
DAY = date(2025, 12, 16)


@pytest.fixture
def settings(influx_db: InfluxSettings, tmp_path: Path) -> ArchiveSettings:
    return ArchiveSettings(influx=influx_db, parquet_root=tmp_path / "parquet",
                           duckdb_path=tmp_path / "duckdb" / "home_energy.duckdb", timezone=TOKYO)


def env_for(settings: ArchiveSettings, **extra: str) -> dict[str, str]:
    return {**os.environ, "INFLUXDB_URL": settings.influx.url,
            "INFLUXDB_DB": settings.influx.database,
            "ARCHIVE_PARQUET_ROOT": str(settings.parquet_root),
            "ARCHIVE_DUCKDB_PATH": str(settings.duckdb_path),
            "HOMEIOT_TIMEZONE": settings.timezone.key, **extra}


def run(module: str, settings: ArchiveSettings, *args: str, **extra: str
        ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", module, *args], env=env_for(settings, **extra),
                          capture_output=True, text=True, timeout=300, check=False)


def write_day(settings: ArchiveSettings, day: date, *, every_min: int = 30, source: str = "meter1",
              power: float = 100.0) -> int:
    """Readings every ``every_min`` minutes over the local day; returns how many."""
    tz = settings.timezone
    start = datetime.combine(day, time(0), tz).astimezone(UTC)
    end = datetime.combine(day + timedelta(days=1), time(0), tz).astimezone(UTC)
    lines, ts, seq = [], start, 0
    while ts < end:
        lines.append(encode_reading(Reading(source, ts, seq, power + seq, energy_normal_kwh=seq * 0.1,
                                            fixed_ts=ts, fixed_energy_normal_kwh=seq * 0.1)))
        ts += timedelta(minutes=every_min)
        seq += 1
    with InfluxClient(settings.influx) as influx:
        influx.write(lines)
    return len(lines)


def count(path: Path, where: str = "") -> int:
    con = duckdb.connect(str(path), read_only=True)
    try:
        row = con.execute(f"SELECT count(*) FROM raw_meter_readings {where}").fetchone()
    finally:
        con.close()
    assert row is not None
    return int(row[0])


def archive_state(settings: ArchiveSettings) -> dict[date, tuple[int, float]]:
    """Per day (rows, sum of power_w) in the Parquet partitions; asserts DuckDB's table and its
    ``archive_days`` say the same, so Parquet and DuckDB agree."""
    glob = str(settings.parquet_root / "raw_meter_readings" / "*" / "*.parquet")
    con = duckdb.connect()
    from_parquet = {d: (int(n), float(p or 0)) for d, n, p in con.execute(
        "SELECT dt, count(*), sum(power_w) FROM read_parquet(?, hive_partitioning = true) "
        "GROUP BY dt", [glob]).fetchall()} if list(settings.parquet_root.glob(
            "raw_meter_readings/*/*.parquet")) else {}
    con.close()
    for part in settings.parquet_root.glob("raw_meter_readings/dt=*/part-0.parquet"):
        from_parquet.setdefault(date.fromisoformat(part.parent.name[3:]), (0, 0.0))  # empty days
    con = duckdb.connect(str(settings.duckdb_path), read_only=True)
    from_duckdb = {d: (int(n), float(p or 0)) for d, n, p in con.execute(
        "SELECT d.dt, d.row_count, coalesce(s.p, 0) FROM archive_days d LEFT JOIN (SELECT dt, "
        "sum(power_w) p, count(*) n FROM raw_meter_readings GROUP BY dt) s ON s.dt = d.dt "
        "WHERE coalesce(s.n, 0) = d.row_count").fetchall()}
    recorded = int((con.execute("SELECT count(*) FROM archive_days").fetchone() or (0,))[0])
    con.close()
    assert len(from_duckdb) == recorded, "archive_days disagrees with the table"
    assert from_parquet == from_duckdb
    return from_duckdb


def influx_day(settings: ArchiveSettings, day: date) -> tuple[int, float]:
    """(points, sum of power_w) of a local day in InfluxDB."""
    from homeiot.core.days import day_window  # noqa: PLC0415

    start, end = day_window(day, settings.timezone)
    with InfluxClient(settings.influx) as influx:
        rows = list(influx.rows(
            f"SELECT count(power_w), sum(power_w) FROM meter_readings WHERE time >= "
            f"{int(start.timestamp() * 1000)}ms AND time < {int(end.timestamp() * 1000)}ms"))
    return (int(rows[0]["count"]), float(rows[0]["sum"])) if rows else (0, 0.0)


def test_the_seeds_flow_verbatim(settings: ArchiveSettings) -> None:
    """dev_seed then run_archive, as in the seed's runbook, for yesterday in Asia/Tokyo."""
    day = yesterday(datetime.now(UTC), TOKYO)
    start = datetime.combine(day, time(0), TOKYO).astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    seeded = run("homeiot_batch.dev_seed", settings, "--start-utc", start,
                 "--interval-minutes", "30", "--count", "48")
    assert seeded.returncode == 0, seeded.stdout + seeded.stderr
    archived = run("homeiot_batch.run_archive", settings)
    assert archived.returncode == 0, archived.stdout + archived.stderr
    partition = settings.parquet_root / "raw_meter_readings" / f"dt={day.isoformat()}"
    assert [p.name for p in partition.iterdir()] == ["part-0.parquet"]
    assert count(settings.duckdb_path) == 48
    assert count(settings.duckdb_path, f"WHERE dt = DATE '{day}' AND source = 'meter1'") == 48
    # The Parquet reads back with hive partitioning in pyarrow and in DuckDB.
    table = ds.dataset(settings.parquet_root / "raw_meter_readings", format="parquet",
                       partitioning="hive").to_table()
    assert table.num_rows == 48
    assert {str(v) for v in table.column("dt").unique().to_pylist()} == {day.isoformat()}
    glob = str(settings.parquet_root / "raw_meter_readings" / "*" / "*.parquet")
    con = duckdb.connect()
    row = con.execute("SELECT count(*), min(dt), count(DISTINCT seq) FROM "
                      "read_parquet(?, hive_partitioning = true)", [glob]).fetchone()
    con.close()
    assert row == (48, day, 48)
    # The table's types are the documented ones.
    con = duckdb.connect(str(settings.duckdb_path), read_only=True)
    types = dict(con.execute("SELECT column_name, data_type FROM information_schema.columns "
                             "WHERE table_name = 'raw_meter_readings'").fetchall())
    con.close()
    assert types["ts"] == "TIMESTAMP WITH TIME ZONE"
    assert types["dt"] == "DATE"
    assert types["seq"] == "BIGINT"
    assert types["power_w"] == "DOUBLE"
    # Nothing left behind: no WAL, no next, no staging file.
    names = sorted(p.name for p in settings.duckdb_path.parent.iterdir())
    assert names == ["home_energy.duckdb", "home_energy.duckdb.lock"]
    assert list((settings.parquet_root / ".staging").iterdir()) == []


def test_rerunning_a_day_replaces_it(settings: ArchiveSettings) -> None:
    write_day(settings, DAY)
    archive_days(settings, [DAY])
    parquet_file = settings.parquet_root / "raw_meter_readings" / f"dt={DAY}" / "part-0.parquet"
    first_inode = parquet_file.stat().st_ino
    write_day(settings, DAY, every_min=15, source="meter2")  # more data for that day arrives
    archive_days(settings, [DAY])
    assert parquet_file.stat().st_ino != first_inode
    assert count(settings.duckdb_path) == 48 + 96  # no duplicates of the first run's rows
    paths = ArchivePaths(settings.duckdb_path)
    assert count(paths.prev) == 48  # the previous state
    archive_days(settings, [DAY])
    assert count(settings.duckdb_path) == 48 + 96
    assert count(paths.prev) == 48 + 96


@pytest.mark.parametrize("step", KILL_POINTS)
def test_a_run_killed_at_any_step_leaves_a_consistent_state(settings: ArchiveSettings,
                                                            step: str) -> None:
    write_day(settings, DAY)
    archive_days(settings, [DAY])
    before = settings.duckdb_path.read_bytes()
    next_day = DAY + timedelta(days=1)
    write_day(settings, next_day, every_min=15)
    write_day(settings, DAY, every_min=15, source="meter2")  # DAY is re-archived with more rows
    killed = run("homeiot_batch.run_archive", settings, "--from", str(DAY), "--to",
                 str(next_day), **{KILL_AT_ENV: step})
    assert killed.returncode == -9, killed.stdout + killed.stderr
    assert settings.duckdb_path.read_bytes() == before  # live untouched
    assert count(settings.duckdb_path) == 48
    assert not ArchivePaths.wal(settings.duckdb_path).exists()
    if step != "parquet_published":  # before the commit point: Parquet is untouched as well
        assert archive_state(settings) == {DAY: (48, sum(100.0 + i for i in range(48)))}
    again = run("homeiot_batch.run_archive", settings, "--date", str(next_day))
    assert again.returncode == 0, again.stdout + again.stderr
    if step == "parquet_published":  # after the commit point: the next run completes it
        assert "completing an interrupted run" in again.stdout
        assert count(settings.duckdb_path, f"WHERE dt = DATE '{DAY}'") == 48 + 96
    state = archive_state(settings)
    assert state[next_day][0] == 96
    assert state[DAY][0] == (48 + 96 if step == "parquet_published" else 48)
    assert not ArchivePaths(settings.duckdb_path).next.exists()
    assert list((settings.parquet_root / ".staging").iterdir()) == []


def test_a_reader_keeps_working_during_the_swap(settings: ArchiveSettings) -> None:
    write_day(settings, DAY)
    archive_days(settings, [DAY])
    # The same settings as the archiver's: one process may not open a file twice differently.
    reader = duckdb_store.connect(settings.duckdb_path, read_only=True)
    assert reader.execute("SELECT count(*) FROM raw_meter_readings").fetchone() == (48,)
    write_day(settings, DAY + timedelta(days=1))
    done = threading.Event()
    errors: list[BaseException] = []

    def keep_reading() -> None:
        while not done.is_set():
            try:
                assert reader.execute("SELECT count(*), sum(power_w) FROM raw_meter_readings"
                                      ).fetchone() is not None
            except BaseException as exc:  # noqa: BLE001 - collected and asserted below
                errors.append(exc)
                return

    thread = threading.Thread(target=keep_reading)
    thread.start()
    try:
        archive_days(settings, [DAY + timedelta(days=1)])
    finally:
        done.set()
        thread.join()
    assert errors == []
    assert reader.execute("SELECT count(*) FROM raw_meter_readings").fetchone() == (48,)
    reader.close()
    assert count(settings.duckdb_path) == 96  # a new connection sees the new data


def test_catch_up_archives_every_missed_day_including_an_empty_one(
        settings: ArchiveSettings) -> None:
    through = yesterday(datetime.now(UTC), TOKYO)
    first = through - timedelta(days=6)
    write_day(settings, first)
    archive_days(settings, [first])
    for offset in (1, 2, 4, 5, 6):  # the server was off for a week; offset 3 has no data at all
        write_day(settings, first + timedelta(days=offset))
    result = run("homeiot_batch.run_archive", settings)
    assert result.returncode == 0, result.stdout + result.stderr
    con = duckdb.connect(str(settings.duckdb_path), read_only=True)
    days = dict(con.execute("SELECT dt, row_count FROM archive_days").fetchall())
    con.close()
    assert sorted(days) == [first + timedelta(days=i) for i in range(7)]
    assert days[first + timedelta(days=3)] == 0
    empty = settings.parquet_root / "raw_meter_readings" / f"dt={first + timedelta(days=3)}"
    assert (empty / "part-0.parquet").exists()  # an empty day is archived too, as zero rows
    assert count(settings.duckdb_path) == 6 * 48
    again = run("homeiot_batch.run_archive", settings)
    assert again.returncode == 0
    assert "nothing to do" in again.stdout


def test_max_days_bounds_a_run_and_the_next_run_goes_on(settings: ArchiveSettings) -> None:
    through = yesterday(datetime.now(UTC), TOKYO)
    archive_days(settings, [through - timedelta(days=5)])
    result = run("homeiot_batch.run_archive", settings, "--max-days", "2")
    assert result.returncode == 0, result.stderr
    assert "days=2" in result.stdout
    result = run("homeiot_batch.run_archive", settings)
    assert "days=3" in result.stdout


@pytest.mark.parametrize(("day", "hours"), [(date(2025, 3, 30), 23), (date(2025, 10, 26), 25),
                                            (date(2025, 6, 1), 24)])
def test_dst_days_are_archived_whole(influx_db: InfluxSettings, tmp_path: Path, day: date,
                                     hours: int) -> None:
    settings = ArchiveSettings(influx=influx_db, parquet_root=tmp_path / "parquet",
                               duckdb_path=tmp_path / "home_energy.duckdb",
                               timezone=ZoneInfo("Europe/Berlin"))
    for offset in (-1, 0, 1):
        write_day(settings, day + timedelta(days=offset))
    archive_days(settings, [day])
    assert count(settings.duckdb_path) == hours * 2
    con = duckdb.connect(str(settings.duckdb_path), read_only=True)
    con.execute("SET TimeZone = 'Europe/Berlin'")
    first, last = con.execute("SELECT min(ts)::VARCHAR, max(ts)::VARCHAR FROM raw_meter_readings"
                              ).fetchone() or ("", "")
    con.close()
    assert first.startswith(f"{day} 00:00:00")
    assert last.startswith(f"{day} 23:30:00")


def test_a_second_concurrent_run_exits_at_once(settings: ArchiveSettings) -> None:
    lock = settings.duckdb_path.with_name("home_energy.duckdb.lock")
    lock.parent.mkdir(parents=True)
    with lock.open("ab") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        result = run("homeiot_batch.run_archive", settings, "--date", str(DAY))
    assert result.returncode == 75
    assert "another archive run holds" in result.stdout


def test_failures_leave_the_live_database_as_it_was(settings: ArchiveSettings, tmp_path: Path
                                                    ) -> None:
    write_day(settings, DAY)
    archive_days(settings, [DAY])
    before = settings.duckdb_path.read_bytes()
    down = replace(settings, influx=replace(settings.influx, url="http://127.0.0.1:9"))
    result = run("homeiot_batch.run_archive", down, "--date", str(DAY + timedelta(days=1)))
    assert result.returncode == 3
    assert "InfluxDB" in result.stdout
    # A wrong database name must not archive "empty" days.
    wrong_db = replace(settings, influx=replace(settings.influx, database="typo"))
    result = run("homeiot_batch.run_archive", wrong_db, "--date", str(DAY + timedelta(days=1)))
    assert result.returncode == 1
    assert "database not found" in result.stdout
    wal = ArchivePaths.wal(settings.duckdb_path)
    wal.write_bytes(b"foreign")
    result = run("homeiot_batch.run_archive", settings, "--date", str(DAY))
    assert result.returncode == 1
    assert "home_energy.duckdb.wal exists" in result.stdout
    wal.unlink()
    assert settings.duckdb_path.read_bytes() == before


def test_an_export_that_breaks_off_changes_nothing(settings: ArchiveSettings) -> None:
    """InfluxDB's CSV answer is cut mid-day (a relay in front of the real influxd): the run fails
    as unavailable (exit code 3), and the archive — Parquet and DuckDB — is as it was."""
    from homeiot.core.errors import InfluxUnavailableError  # noqa: PLC0415

    write_day(settings, DAY)
    archive_days(settings, [DAY])
    before = settings.duckdb_path.read_bytes()
    partition = settings.parquet_root / "raw_meter_readings" / f"dt={DAY}" / "part-0.parquet"
    published = partition.read_bytes()
    write_day(settings, DAY, every_min=1)  # more readings: a re-archive would replace the day
    port = int(settings.influx.url.rsplit(":", 1)[1])
    relay = CuttingRelay(port, 1 << 30, 20_000)  # the database check, then the CSV: cut
    try:
        cut = replace(settings, influx=replace(settings.influx,
                                               url=f"http://127.0.0.1:{relay.port}"))
        with pytest.raises(InfluxUnavailableError, match="during a query"):
            archive_days(cut, [DAY])
        assert relay.cut == 1
    finally:
        relay.close()
    assert settings.duckdb_path.read_bytes() == before
    assert partition.read_bytes() == published
    assert not list((settings.parquet_root / ".staging").iterdir())
    assert not ArchivePaths(settings.duckdb_path).next.exists()
    archive_days(settings, [DAY])  # the control: through the real influxd, the day grows
    assert archive_state(settings)[DAY][0] == 24 * 60


@pytest.mark.parametrize(("args", "message"), [
    (["--date", "2025-02-30"], "is not a date"),
    (["--to", "2025-01-01"], "--to needs --from"),
    (["--from", "2025-01-05", "--to", "2025-01-01"], "start is after end"),
    (["--date", "2199-01-01"], "is not over yet"),
    (["--max-days", "0"], "at least 1"),
])
def test_bad_arguments_exit_2_with_a_reason(settings: ArchiveSettings, args: list[str],
                                            message: str) -> None:
    result = run("homeiot_batch.run_archive", settings, *args)
    assert result.returncode == 2
    assert message in result.stdout + result.stderr


@pytest.mark.parametrize(("variable", "value"), [("ARCHIVE_DUCKDB_PATH", "/tmp/x.db"),
                                                ("ARCHIVE_DUCKDB_MEMORY_LIMIT", "lots")])
def test_bad_configuration_names_the_variable(settings: ArchiveSettings, variable: str,
                                              value: str) -> None:
    result = run("homeiot_batch.run_archive", settings, **{variable: value})
    assert result.returncode == 2
    assert f"{variable}: " in result.stdout


def test_verification_catches_a_next_file_that_differs_from_its_source(
        settings: ArchiveSettings) -> None:
    from homeiot.adapters.duckdb_store import ArchiveError  # noqa: PLC0415

    write_day(settings, DAY)
    write_day(settings, DAY + timedelta(days=1))
    archive_days(settings, [DAY])
    paths = ArchivePaths(settings.duckdb_path)
    files = {DAY + timedelta(days=1): settings.parquet_root / "raw_meter_readings"
             / f"dt={DAY + timedelta(days=1)}" / "part-0.parquet"}
    archive_days(settings, list(files))  # writes that day's Parquet
    live_counts = duckdb_store.day_counts(paths.live)
    for tamper, message in (
        ("UPDATE raw_meter_readings SET power_w = power_w + 1 WHERE seq = 3 AND dt = ?",
         "sum_power_w"),
        ("DELETE FROM raw_meter_readings WHERE seq = 3 AND dt = ?", "rows"),
        ("DELETE FROM raw_meter_readings WHERE dt <> ?", "though that day was not archived"),
    ):
        duckdb_store.build_next(paths, files, dict.fromkeys(files, 48))
        con = duckdb.connect(str(paths.next))
        con.execute(tamper, [DAY + timedelta(days=1)])
        con.execute("CHECKPOINT")
        con.close()
        with pytest.raises(ArchiveError, match=message):
            duckdb_store.verify_next(paths, files, live_counts)


def delete_from_influx(settings: ArchiveSettings, day: date, *, keep: int = 0) -> None:
    """Delete a day's readings from InfluxDB except its first ``keep`` half hours (retention,
    a rebuilt database …)."""
    from homeiot.core.days import day_window  # noqa: PLC0415

    start, end = day_window(day, settings.timezone)
    start += timedelta(minutes=30 * keep)
    with InfluxClient(settings.influx) as influx:
        influx.execute(f"DELETE FROM meter_readings WHERE time >= {int(start.timestamp())}s "
                       f"AND time < {int(end.timestamp())}s")


def test_a_day_is_never_shrunk_unless_allowed_and_never_emptied(settings: ArchiveSettings
                                                                 ) -> None:
    write_day(settings, DAY)
    archive_days(settings, [DAY])
    live = settings.duckdb_path.read_bytes()
    part = settings.parquet_root / "raw_meter_readings" / f"dt={DAY}" / "part-0.parquet"
    inode = part.stat().st_ino
    delete_from_influx(settings, DAY, keep=20)
    refused = run("homeiot_batch.run_archive", settings, "--date", str(DAY))
    assert refused.returncode == 4, refused.stdout + refused.stderr
    assert f"{DAY}: the archive holds 48 rows, InfluxDB now gives 20" in refused.stdout
    assert "--allow-shrink" in refused.stdout
    assert settings.duckdb_path.read_bytes() == live
    assert part.stat().st_ino == inode
    assert archive_state(settings) == {DAY: (48, sum(100.0 + i for i in range(48)))}
    assert list((settings.parquet_root / ".staging").iterdir()) == []
    # A backfill over a range refuses the same way, whatever else it holds.
    refused = run("homeiot_batch.run_archive", settings, "--from", str(DAY - timedelta(days=1)),
                  "--to", str(DAY))
    assert refused.returncode == 4
    assert settings.duckdb_path.read_bytes() == live
    allowed = run("homeiot_batch.run_archive", settings, "--date", str(DAY), "--allow-shrink")
    assert allowed.returncode == 0, allowed.stdout + allowed.stderr
    assert archive_state(settings) == {DAY: (20, sum(100.0 + i for i in range(20)))}
    # An empty export never replaces a day that has rows, even with --allow-shrink.
    delete_from_influx(settings, DAY)
    live = settings.duckdb_path.read_bytes()
    emptied = run("homeiot_batch.run_archive", settings, "--date", str(DAY), "--allow-shrink")
    assert emptied.returncode == 4
    assert "an empty export never replaces an archived day" in emptied.stdout
    assert settings.duckdb_path.read_bytes() == live
    assert archive_state(settings) == {DAY: (20, sum(100.0 + i for i in range(20)))}


def test_build_next_refuses_to_shrink_a_day_itself(settings: ArchiveSettings) -> None:
    """The guard inside the DuckDB build, behind the archiver's own check."""
    write_day(settings, DAY)
    archive_days(settings, [DAY])
    half = settings.parquet_root / "half.parquet"
    con = duckdb.connect()
    con.execute("COPY (SELECT * EXCLUDE (dt) FROM read_parquet(?, hive_partitioning = true) "
                "WHERE seq < 10) TO '" + str(half) + "' (FORMAT parquet)",
                [str(settings.parquet_root / "raw_meter_readings" / "*" / "*.parquet")])
    con.close()
    paths = ArchivePaths(settings.duckdb_path)
    with pytest.raises(duckdb_store.ShrinkRefusedError, match="holds 48 rows"):
        duckdb_store.build_next(paths, {DAY: half}, {DAY: 10})
    with pytest.raises(duckdb_store.ArchiveError, match="10 rows inserted"):
        duckdb_store.build_next(paths, {DAY: half}, {DAY: 11}, allow_shrink=True)
    duckdb_store.build_next(paths, {DAY: half}, {DAY: 10}, allow_shrink=True)
    assert count(paths.next) == 10


def test_a_database_held_by_another_process_is_named(settings: ArchiveSettings) -> None:
    write_day(settings, DAY)
    archive_days(settings, [DAY])
    holder = subprocess.Popen(
        [sys.executable, "-c", "import duckdb, sys; c = duckdb.connect(sys.argv[1]); "
         "print('open', flush=True); sys.stdin.read()", str(settings.duckdb_path)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "open"
        result = run("homeiot_batch.run_archive", settings, "--date", str(DAY))
    finally:
        holder.communicate("", timeout=30)
    assert result.returncode == 75, result.stdout + result.stderr
    assert f"{settings.duckdb_path} is held by another process" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr
    assert run("homeiot_batch.run_archive", settings, "--date", str(DAY)).returncode == 0


def test_a_verification_timeout_is_an_archive_error(settings: ArchiveSettings) -> None:
    write_day(settings, DAY)
    archive_days(settings, [DAY])
    paths = ArchivePaths(settings.duckdb_path)
    files = {DAY: settings.parquet_root / "raw_meter_readings" / f"dt={DAY}" / "part-0.parquet"}
    duckdb_store.build_next(paths, files, {DAY: 48})
    with pytest.raises(duckdb_store.VerifyTimeoutError, match="ARCHIVE_VERIFY_TIMEOUT_S"):
        duckdb_store.verify_next(paths, files, {}, timeout_s=0.01)
    duckdb_store.verify_next(paths, files, {})


def test_late_readings_are_reconciled_by_the_next_run(settings: ArchiveSettings) -> None:
    """Yesterday's run archived what had arrived; the Pi's outbox delivers the rest later."""
    through = yesterday(datetime.now(UTC), TOKYO)
    write_day(settings, through)
    first = run("homeiot_batch.run_archive", settings)
    assert first.returncode == 0, first.stdout + first.stderr
    assert archive_state(settings)[through][0] == 48
    late = write_day(settings, through, every_min=15, source="meter2")  # arrives after 00:10
    second = run("homeiot_batch.run_archive", settings)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "reconciled=1" in second.stdout
    state = archive_state(settings)
    assert state[through] == influx_day(settings, through)
    assert state[through][0] == 48 + late
    # Nothing new: nothing to do.
    third = run("homeiot_batch.run_archive", settings)
    assert "nothing to do" in third.stdout, third.stdout
    # An older day in the window is reconciled too; one outside it (or with the window off) not.
    older = through - timedelta(days=3)
    write_day(settings, older)
    assert run("homeiot_batch.run_archive", settings, "--date", str(older)).returncode == 0
    write_day(settings, older, every_min=60, source="meter3")
    off = run("homeiot_batch.run_archive", settings, "--reconcile-days", "0")
    assert "nothing to do" in off.stdout
    narrow = run("homeiot_batch.run_archive", settings, ARCHIVE_RECONCILE_DAYS="3")
    assert "nothing to do" in narrow.stdout
    wide = run("homeiot_batch.run_archive", settings)
    assert "reconciled=1" in wide.stdout
    assert archive_state(settings)[older] == influx_day(settings, older)
    assert influx_day(settings, older) == (72, sum(100.0 + i for i in range(48))
                                           + sum(100.0 + i for i in range(24)))
    # InfluxDB holding fewer readings (retention) keeps the archive, with a warning.
    delete_from_influx(settings, older, keep=4)
    kept = run("homeiot_batch.run_archive", settings)
    assert kept.returncode == 0, kept.stdout + kept.stderr
    assert "holds fewer readings than the archive" in kept.stdout
    assert archive_state(settings)[older][0] == 72


def test_a_day_given_explicitly_is_archived_with_the_window(settings: ArchiveSettings) -> None:
    through = yesterday(datetime.now(UTC), TOKYO)
    write_day(settings, through)
    assert run("homeiot_batch.run_archive", settings).returncode == 0
    write_day(settings, through, every_min=60, source="meter2")
    write_day(settings, DAY)
    both = run("homeiot_batch.run_archive", settings, "--date", str(DAY))
    assert both.returncode == 0, both.stdout + both.stderr
    assert "days=2" in both.stdout
    assert archive_state(settings) == {through: influx_day(settings, through),
                                       DAY: influx_day(settings, DAY)}


def test_the_archive_is_written_in_a_storage_version_duckdb_1_reads(settings: ArchiveSettings
                                                                    ) -> None:
    write_day(settings, DAY)
    archive_days(settings, [DAY])
    assert duckdb_store.storage_version(settings.duckdb_path) == duckdb_store.STORAGE_VERSION == 64
    # A live file written with DuckDB 2's default (not readable by 1.x) is rewritten.
    old = settings.duckdb_path.with_name("old.duckdb")
    con = duckdb.connect(str(old))
    con.execute("ATTACH ? AS a (READ_ONLY)", [str(settings.duckdb_path)])
    con.execute("CREATE TABLE raw_meter_readings AS FROM a.raw_meter_readings")
    con.execute("CREATE TABLE archive_days AS FROM a.archive_days")
    con.execute("DETACH a")
    con.execute("CHECKPOINT")
    con.close()
    assert duckdb_store.storage_version(old) != 64  # 2.0.1 writes 999 in the header
    os.replace(old, settings.duckdb_path)
    write_day(settings, DAY + timedelta(days=1))
    archive_days(settings, [DAY + timedelta(days=1)])
    assert duckdb_store.storage_version(settings.duckdb_path) == 64
    assert archive_state(settings) == {d: influx_day(settings, d)
                                       for d in (DAY, DAY + timedelta(days=1))}


def test_restore_after_losing_the_database(settings: ArchiveSettings) -> None:
    """The user's recovery from a lost InfluxDB volume: drop it, restore, compare with the
    archive day by day."""
    days = [DAY - timedelta(days=1), DAY, DAY + timedelta(days=1)]
    write_day(settings, days[0])
    write_day(settings, days[1], every_min=15, source="meter2")
    write_day(settings, days[1])
    write_day(settings, days[2], every_min=10)
    archive_days(settings, days)
    archived = archive_state(settings)
    with InfluxClient(settings.influx) as influx:
        influx.execute(f'DROP DATABASE "{settings.influx.database}"')
        influx.execute(f'CREATE DATABASE "{settings.influx.database}"')
    assert [influx_day(settings, d) for d in days] == [(0, 0.0)] * 3
    restored = run("homeiot_batch.run_archive", settings, "restore", "--from", str(days[0]),
                   "--to", str(days[2]))
    assert restored.returncode == 0, restored.stdout + restored.stderr
    assert f"rows={48 + 96 + 48 + 144}" in restored.stdout
    assert {d: influx_day(settings, d) for d in days} == archived
    again = run("homeiot_batch.run_archive", settings, "restore", "--from", str(days[0]),
                "--to", str(days[2]))
    assert again.returncode == 0
    assert {d: influx_day(settings, d) for d in days} == archived  # idempotent
    # Re-archiving the restored days finds exactly what was archived.
    assert run("homeiot_batch.run_archive", settings, "--from", str(days[0]), "--to",
               str(days[2])).returncode == 0
    assert archive_state(settings) == archived


def duckdb_1_cli() -> Path | None:
    """The DuckDB 1.x CLI ``make setup`` installs (``HOMEIOT_DUCKDB_CLI`` overrides)."""
    configured = os.environ.get("HOMEIOT_DUCKDB_CLI")
    path = Path(configured) if configured else (
        Path(__file__).resolve().parents[3] / ".cache" / "duckdb-cli-1.5.6" / "duckdb_cli"
        / "duckdb")
    if path.exists():
        return path
    if os.environ.get("CI") == "true":
        pytest.fail(f"{path} is missing: make setup installs it (setup-tools)")
    return None


def test_the_seeds_duckdb_command_works_with_a_duckdb_1_cli(settings: ArchiveSettings,
                                                           tmp_path: Path) -> None:
    cli = duckdb_1_cli()
    if cli is None:
        pytest.skip("no DuckDB 1.x CLI: run make setup")
    version = subprocess.run([str(cli), "--version"], capture_output=True, text=True, check=True)
    assert version.stdout.startswith("v1."), version.stdout
    deployment = tmp_path / "deploy"
    data = replace(settings, parquet_root=deployment / "data" / "parquet",
                   duckdb_path=deployment / "data" / "duckdb" / "home_energy.duckdb")
    write_day(data, DAY)
    assert run("homeiot_batch.run_archive", data, "--date", str(DAY)).returncode == 0
    seed = 'duckdb data/duckdb/home_energy.duckdb "SELECT COUNT(*) FROM raw_meter_readings;"'
    env = {**os.environ, "PATH": f"{cli.parent}:{os.environ['PATH']}"}
    result = subprocess.run(seed, shell=True, cwd=deployment, env=env, capture_output=True,  # noqa: S602
                            text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"│\s+48\s+│", result.stdout), result.stdout
    # The control: the same command on a file in DuckDB 2's default format fails, as it did.
    con = duckdb.connect(str(deployment / "data" / "duckdb" / "v2.duckdb"))
    con.execute("CREATE TABLE raw_meter_readings AS SELECT 1 AS a")
    con.close()
    control = subprocess.run(seed.replace("home_energy", "v2"), shell=True, cwd=deployment,  # noqa: S602
                             env=env, capture_output=True, text=True, timeout=60, check=False)
    assert control.returncode != 0
    assert "newer version of DuckDB" in control.stdout + control.stderr
    # The archiver goes on after the user's CLI opened the file.
    write_day(data, DAY + timedelta(days=1))
    assert run("homeiot_batch.run_archive", data, "--date", str(DAY + timedelta(days=1))
               ).returncode == 0
    assert archive_state(data)[DAY + timedelta(days=1)][0] == 48


def test_the_runbook_example_lists_the_partition_it_seeded(settings: ArchiveSettings) -> None:
    """docs/archive.md: on a new archive, the first run starts at the oldest reading's day, so
    the seed's dev_seed (2025-12-16T15:00Z = 2025-12-17 00:00 JST) then run_archive fills
    dt=2025-12-17."""
    seeded = run("homeiot_batch.dev_seed", settings, "--start-utc", "2025-12-16T15:00:00Z",
                 "--interval-minutes", "30", "--count", "48")
    assert seeded.returncode == 0, seeded.stdout + seeded.stderr
    archived = run("homeiot_batch.run_archive", settings)
    assert archived.returncode == 0, archived.stdout + archived.stderr
    partition = settings.parquet_root / "raw_meter_readings" / "dt=2025-12-17"
    assert [p.name for p in partition.iterdir()] == ["part-0.parquet"]
    assert archive_state(settings)[date(2025, 12, 17)] == influx_day(settings, date(2025, 12, 17))
    assert count(settings.duckdb_path) == 48
    assert "days=31 first=2025-12-17" in archived.stdout  # ARCHIVE_MAX_DAYS; the timer goes on


def test_progress_bars_on_a_terminal(settings: ArchiveSettings) -> None:
    import pty  # noqa: PLC0415

    write_day(settings, DAY)
    for args in (["--date", str(DAY)], ["restore", "--from", str(DAY)]):
        leader, follower = pty.openpty()
        try:
            proc = subprocess.run([sys.executable, "-m", "homeiot_batch.run_archive", *args],
                                  env=env_for(settings), stderr=follower, stdout=subprocess.PIPE,
                                  timeout=120, check=False)
            os.close(follower)
            shown = b""
            while True:
                try:
                    chunk = os.read(leader, 4096)
                except OSError:
                    break
                if not chunk:
                    break
                shown += chunk
        finally:
            os.close(leader)
        assert proc.returncode == 0, proc.stdout
        assert f"1/1 {DAY}".encode() in shown, shown


def test_a_build_thread_that_fails_stops_the_run_loudly(settings: ArchiveSettings) -> None:
    """DuckDB ingests on its own thread during the export; its first error reaches the caller
    (no hang on the bounded queue), and nothing is committed."""
    import pyarrow as pa  # noqa: PLC0415

    from homeiot.services.archiver import _BuildThread  # noqa: PLC0415

    write_day(settings, DAY)
    archive_days(settings, [DAY])
    before = settings.duckdb_path.read_bytes()
    paths = ArchivePaths(settings.duckdb_path)
    builder = duckdb_store.NextBuilder(paths)
    build = _BuildThread()
    wrong = pa.record_batch({"unexpected": pa.array([1, 2, 3])})
    build.call(builder.begin_day, DAY)
    build.call(builder.add, DAY, wrong)

    def feed_more_than_the_queue_holds() -> None:  # must not block once the thread failed
        for _ in range(100):
            build.call(builder.add, DAY, wrong)
        build.close()

    with pytest.raises(duckdb_store.ArchiveError, match=r"Binder Error.*\bts\b"):
        feed_more_than_the_queue_holds()
    build.close(raise_error=False)
    builder.abort()
    duckdb_store.remove_leftovers(paths)
    assert settings.duckdb_path.read_bytes() == before
    assert archive_state(settings)[DAY][0] == 48


def test_the_first_run_starts_at_a_day_of_half_hour_slots_only(settings: ArchiveSettings) -> None:
    """A fresh Pi reads yesterday's half hours back from the meter's history: slot readings,
    which carry no power_w. The first archive must start at that day, not at the first live one."""
    day = date(2025, 12, 15)
    start = datetime.combine(day, time(0), settings.timezone).astimezone(UTC)
    with InfluxClient(settings.influx) as influx:
        influx.write([encode_reading(slot_reading("meter1", start + timedelta(minutes=30 * i),
                                                  10.0 + i)) for i in range(48)])
        influx.write([encode_reading(Reading("meter1", start + timedelta(days=1, hours=1), 0, 100.0))])
    assert first_influx_day(settings) == day
