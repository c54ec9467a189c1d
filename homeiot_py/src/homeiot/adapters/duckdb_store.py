"""The DuckDB archive: ``home_energy.duckdb`` with the table ``raw_meter_readings``.

The live file is never written in place. A run copies it to ``home_energy.next.duckdb``, replaces
the archived days there from their Parquet files, checkpoints and closes it, has a fresh process
verify it, and swaps it in with atomic renames, keeping the previous file as
``home_energy.prev.duckdb``. Readers holding the old file keep reading it; new connections see the
new one.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import duckdb

from homeiot.core.errors import HomeIotError

TABLE = "raw_meter_readings"
DDL = f"""
CREATE TABLE IF NOT EXISTS {TABLE} (
    ts                      TIMESTAMPTZ NOT NULL,
    source                  VARCHAR     NOT NULL,
    seq                     BIGINT,
    power_w                 DOUBLE,
    current_r_a             DOUBLE,
    current_t_a             DOUBLE,
    energy_normal_kwh       DOUBLE,
    energy_reverse_kwh      DOUBLE,
    fixed_ts                TIMESTAMPTZ,
    fixed_energy_normal_kwh DOUBLE,
    dt                      DATE        NOT NULL
);
CREATE TABLE IF NOT EXISTS archive_days (
    dt          DATE PRIMARY KEY,
    row_count   BIGINT      NOT NULL,
    archived_at TIMESTAMPTZ NOT NULL
);
"""
_COLUMNS = ("ts", "source", "seq", "power_w", "current_r_a", "current_t_a", "energy_normal_kwh",
            "energy_reverse_kwh", "fixed_ts", "fixed_energy_normal_kwh")
_NUMERIC = ("seq", "power_w", "current_r_a", "current_t_a", "energy_normal_kwh",
            "energy_reverse_kwh", "fixed_energy_normal_kwh")


#: DuckDB may otherwise take 80 % of RAM and every core; the archive shares a small home server.
DEFAULT_MEMORY_LIMIT = "128MB"
_THREADS = 2


def connect(path: Path | None = None, *, read_only: bool = False,
            memory_limit: str = DEFAULT_MEMORY_LIMIT) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection with the archive's resource limits (in-memory when ``path`` is None)."""
    return duckdb.connect(str(path) if path is not None else ":memory:", read_only=read_only,
                          config={"memory_limit": memory_limit, "threads": _THREADS})


class ArchiveError(HomeIotError):
    """The archive could not be built or verified; the live database is unchanged."""


@dataclass(frozen=True, slots=True)
class ArchivePaths:
    """The live database file, its ``next`` and ``prev`` siblings, and DuckDB's memory limit."""

    live: Path
    memory_limit: str = DEFAULT_MEMORY_LIMIT

    @property
    def next(self) -> Path:
        return self.live.with_name(self.live.stem + ".next" + self.live.suffix)

    @property
    def prev(self) -> Path:
        return self.live.with_name(self.live.stem + ".prev" + self.live.suffix)

    @staticmethod
    def wal(path: Path) -> Path:
        return path.with_name(path.name + ".wal")


def _stats_sql(source: str, where: str) -> str:
    """Per-day aggregates touching every column: counts, sums, min/max."""
    parts = ["count(*) AS rows", "count(DISTINCT source) AS sources", "min(source) AS min_source",
             "max(source) AS max_source", "epoch_ms(min(ts)) AS min_ts", "epoch_ms(max(ts)) AS max_ts",
             "count(fixed_ts) AS n_fixed_ts", "epoch_ms(max(fixed_ts)) AS max_fixed_ts"]
    for column in _NUMERIC:
        parts += [f"count({column}) AS n_{column}", f"sum({column})::DOUBLE AS sum_{column}"]
    return f"SELECT dt::VARCHAR AS dt, {', '.join(parts)} FROM {source} {where} GROUP BY dt"


def day_stats(con: duckdb.DuckDBPyConnection, days: Sequence[date]) -> dict[str, dict[str, Any]]:
    """Aggregates of ``days`` in the table, by ISO date."""
    placeholders = ", ".join("?" for _ in days)
    cursor = con.execute(_stats_sql(TABLE, f"WHERE dt IN ({placeholders})"), list(days))
    names = [d[0] for d in cursor.description or ()]
    return {row[0]: dict(zip(names, row, strict=True)) for row in cursor.fetchall()}


def parquet_stats(files: Mapping[date, Path], memory_limit: str = DEFAULT_MEMORY_LIMIT
                  ) -> dict[str, dict[str, Any]]:
    """The same aggregates computed from the Parquet source files."""
    con = connect(memory_limit=memory_limit)
    out: dict[str, dict[str, Any]] = {}
    try:
        for day, path in files.items():
            source = f"(SELECT *, DATE '{day.isoformat()}' AS dt FROM read_parquet(?))"
            cursor = con.execute(_stats_sql(source, ""), [str(path)])
            names = [d[0] for d in cursor.description or ()]
            for row in cursor.fetchall():
                out[row[0]] = dict(zip(names, row, strict=True))
    finally:
        con.close()
    return out


def day_counts(path: Path, memory_limit: str = DEFAULT_MEMORY_LIMIT) -> dict[str, int]:
    """Rows per day in a database file (read-only); empty when the file does not exist."""
    if not path.exists():
        return {}
    con = connect(path, read_only=True, memory_limit=memory_limit)
    try:
        rows = con.execute(f"SELECT dt::VARCHAR, count(*) FROM {TABLE} GROUP BY dt").fetchall()
    except duckdb.CatalogException:
        return {}
    finally:
        con.close()
    return {day: int(count) for day, count in rows}


def last_archived_day(path: Path, memory_limit: str = DEFAULT_MEMORY_LIMIT) -> date | None:
    """The newest day recorded in ``archive_days`` of the live file, if any."""
    if not path.exists():
        return None
    con = connect(path, read_only=True, memory_limit=memory_limit)
    try:
        row = con.execute("SELECT max(dt) FROM archive_days").fetchone()
    except duckdb.CatalogException:
        return None
    finally:
        con.close()
    return row[0] if row else None


def remove_leftovers(paths: ArchivePaths) -> None:
    """Delete a ``next`` file (and its WAL) that a killed run left behind."""
    for leftover in (paths.next, ArchivePaths.wal(paths.next)):
        leftover.unlink(missing_ok=True)


def build_next(paths: ArchivePaths, files: Mapping[date, Path]) -> None:
    """Copy live → next and replace ``files``' days in next from their Parquet files."""
    if ArchivePaths.wal(paths.live).exists():
        raise ArchiveError(
            f"{ArchivePaths.wal(paths.live)} exists: something wrote to the live database. Open it "
            "read-write once with DuckDB and close it (that checkpoints the WAL), then re-run.")
    remove_leftovers(paths)
    if paths.live.exists():
        shutil.copyfile(paths.live, paths.next)
    con = connect(paths.next, memory_limit=paths.memory_limit)
    try:
        con.execute(DDL)
        con.execute("BEGIN TRANSACTION")
        for day, path in sorted(files.items()):
            con.execute(f"DELETE FROM {TABLE} WHERE dt = ?", [day])
            con.execute(f"INSERT INTO {TABLE} SELECT {', '.join(_COLUMNS)}, ?::DATE AS dt "
                        "FROM read_parquet(?)", [day, str(path)])
            con.execute("INSERT OR REPLACE INTO archive_days SELECT ?::DATE, count(*), now() "
                        f"FROM {TABLE} WHERE dt = ?", [day, day])
        con.execute("COMMIT")
        con.execute("CHECKPOINT")
    except duckdb.Error as exc:
        raise ArchiveError(f"building {paths.next.name} failed: {exc}") from exc
    finally:
        con.close()
    with paths.next.open("rb+") as handle:
        os.fsync(handle.fileno())
    if ArchivePaths.wal(paths.next).exists():
        raise ArchiveError(f"{paths.next.name} still has a WAL after CHECKPOINT and close")


def verify_next(paths: ArchivePaths, files: Mapping[date, Path],
                live_counts: Mapping[str, int]) -> None:
    """Check next in a fresh process (read-only) against the Parquet source and the live file:
    every column of the archived days, and the row count of every other day."""
    days = sorted(files)
    result = subprocess.run(
        [sys.executable, "-m", "homeiot.adapters.duckdb_store", paths.memory_limit,
         str(paths.next), *[d.isoformat() for d in days]],
        capture_output=True, text=True, check=False, timeout=3600)
    if result.returncode != 0:
        raise ArchiveError(f"verifying {paths.next.name} failed: {result.stderr.strip()[-500:]}")
    report = json.loads(result.stdout)
    expected = parquet_stats(files, paths.memory_limit)
    for day in days:
        key = day.isoformat()
        got, want = report["days"].get(key), expected.get(key)
        if want is None:  # an empty day: nothing in the Parquet, nothing in the table
            if got is not None:
                raise ArchiveError(f"{key}: {got['rows']} rows in {paths.next.name}, 0 in Parquet")
            continue
        if got is None:
            raise ArchiveError(f"{key}: no rows in {paths.next.name}, {want['rows']} in Parquet")
        for name, value in want.items():
            if not _same(got[name], value):
                raise ArchiveError(f"{key}: {name} is {got[name]!r} in {paths.next.name} but "
                                   f"{value!r} in the Parquet source")
    for key, count in live_counts.items():
        if date.fromisoformat(key) in files:
            continue
        if report["counts"].get(key) != count:
            raise ArchiveError(f"{key}: {report['counts'].get(key)} rows in {paths.next.name}, "
                               f"{count} in the live database, though that day was not archived")


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        if a is None or b is None:
            return a is b
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-6)
    return bool(a == b)


def swap(paths: ArchivePaths) -> None:
    """next → live atomically; the old live file becomes prev. The live name always exists."""
    if ArchivePaths.wal(paths.next).exists():
        raise ArchiveError(f"refusing to swap: {paths.next.name} has a WAL")
    if paths.live.exists():
        staged_prev = paths.prev.with_name(paths.prev.name + ".tmp")
        staged_prev.unlink(missing_ok=True)
        os.link(paths.live, staged_prev)
        os.replace(staged_prev, paths.prev)
    os.replace(paths.next, paths.live)
    fd = os.open(paths.live.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _verify_main(argv: Sequence[str]) -> int:
    """``python -m homeiot.adapters.duckdb_store MEMORY_LIMIT FILE DAY...``: print the aggregates
    as JSON."""
    memory_limit, path, days = argv[0], Path(argv[1]), [date.fromisoformat(d) for d in argv[2:]]
    con = connect(path, read_only=True, memory_limit=memory_limit)
    try:
        stats = day_stats(con, days) if days else {}
        counts = {d: int(n) for d, n in con.execute(
            f"SELECT dt::VARCHAR, count(*) FROM {TABLE} GROUP BY dt").fetchall()}
    finally:
        con.close()
    json.dump({"days": stats, "counts": counts}, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(_verify_main(sys.argv[1:]))
