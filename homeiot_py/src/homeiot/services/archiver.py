"""The daily archive (the seed's "Batch 実行手順"): InfluxDB → Parquet → DuckDB.

For each local day: stream the day's readings out of InfluxDB with chunked InfluxQL, write them as
Parquet row groups to a staging file, fsync, and rename it into
``raw_meter_readings/dt=YYYY-MM-DD/``. Then build ``home_energy.next.duckdb`` from the live file,
replace those days from their Parquet, CHECKPOINT, close, verify in a fresh process, and swap it in
atomically (the old file becomes ``home_energy.prev.duckdb``). A day is replaced completely or not
at all; the live database is never written in place. An exclusive lock keeps runs apart.
"""

from __future__ import annotations

import fcntl
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import IO

import pyarrow as pa
import pyarrow.csv as pa_csv

from homeiot.adapters import duckdb_store, parquet
from homeiot.adapters.duckdb_store import ArchivePaths
from homeiot.adapters.influx import InfluxClient
from homeiot.config import ArchiveSettings
from homeiot.core.days import day_window
from homeiot.core.errors import HomeIotError, InfluxQueryError
from homeiot.core.reading import epoch_ms

logger = logging.getLogger(__name__)

#: Testing hook: kill the run (SIGKILL) at a named step, to prove every step is crash-safe.
KILL_AT_ENV = "HOMEIOT_ARCHIVE_KILL_AT"
KILL_POINTS = ("parquet_staged", "next_built", "before_swap")


class ArchiveLockedError(HomeIotError):
    """Another archive run holds the lock."""


@dataclass(frozen=True, slots=True)
class DayResult:
    day: date
    rows: int
    seconds: float


def _kill_point(name: str) -> None:
    if os.environ.get(KILL_AT_ENV) == name:
        logger.warning("archive: killed at %s (%s)", name, KILL_AT_ENV)
        os.kill(os.getpid(), signal.SIGKILL)


class ArchiveLock:
    """An exclusive, non-blocking ``flock`` beside the database."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._handle: IO[bytes] | None = None

    def __enter__(self) -> ArchiveLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = self.path.open("ab")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise ArchiveLockedError(f"another archive run holds {self.path}; this one exits "
                                     "without doing anything") from None
        self._handle = handle
        return self

    def __exit__(self, *exc: object) -> None:
        if self._handle is not None:
            fcntl.flock(self._handle.fileno(), fcntl.LOCK_UN)
            self._handle.close()


def _day_batches(influx: InfluxClient, settings: ArchiveSettings, day: date
                 ) -> Iterator[pa.RecordBatch]:
    start, end = day_window(day, settings.timezone)
    measurement = settings.influx.measurement.replace("\\", "\\\\")
    statement = (f'SELECT * FROM "{measurement}" WHERE time >= {epoch_ms(start)}ms '  # noqa: S608
                 f"AND time < {epoch_ms(end)}ms")
    with influx.query_csv(statement, chunk_size=settings.chunk_size) as stream:
        try:
            reader = pa_csv.open_csv(
                stream, read_options=pa_csv.ReadOptions(block_size=1 << 20),
                convert_options=pa_csv.ConvertOptions(column_types=parquet.CSV_TYPES))
        except pa.ArrowInvalid as exc:
            if "Empty CSV" in str(exc):
                return  # no readings that day
            raise InfluxQueryError(f"unreadable CSV from InfluxDB: {exc}") from exc
        if reader.schema.names == ["error"]:
            raise InfluxQueryError(f"{statement!r}: {reader.read_all().column(0)[0]}")
        try:
            for batch in reader:
                if batch.num_rows:
                    yield parquet.from_csv_batch(batch)
        except pa.ArrowInvalid as exc:
            raise InfluxQueryError(f"InfluxDB's answer broke off or changed shape: {exc}"
                                   ) from exc


def export_day(influx: InfluxClient, settings: ArchiveSettings, day: date) -> tuple[Path, int]:
    """Stream one day from InfluxDB into a staged Parquet file; returns it and its row count."""
    return parquet.stage_day(settings.parquet_root, day, _day_batches(influx, settings, day))


def archive_days(settings: ArchiveSettings, days: list[date],
                 progress: Callable[[int, int, date], None] | None = None) -> list[DayResult]:
    """Archive ``days`` (oldest first) under the lock; see the module docstring."""
    paths = ArchivePaths(settings.duckdb_path, settings.duckdb_memory_limit)
    results: list[DayResult] = []
    with ArchiveLock(paths.live.with_name(paths.live.name + ".lock")):
        removed = parquet.clean_staging(settings.parquet_root)
        if removed:
            logger.info("archive: removed %d staging file(s) of an interrupted run", removed)
        duckdb_store.remove_leftovers(paths)
        if not days:
            return results
        files: dict[date, Path] = {}
        with InfluxClient(settings.influx) as influx:
            for index, day in enumerate(days, 1):
                if progress is not None:
                    progress(index, len(days), day)
                started = time.monotonic()
                staged, rows = export_day(influx, settings, day)
                _kill_point("parquet_staged")
                written = parquet.publish_day(settings.parquet_root, day, staged, rows)
                pa.default_memory_pool().release_unused()  # hand the export's buffers back
                files[day] = written.path
                results.append(DayResult(day, rows, time.monotonic() - started))
                logger.info("archive: day=%s rows=%d parquet=%s seconds=%.2f", day, rows,
                            written.path, results[-1].seconds)
        started = time.monotonic()
        live_counts = duckdb_store.day_counts(paths.live, paths.memory_limit)
        duckdb_store.build_next(paths, files)
        built = time.monotonic()
        _kill_point("next_built")
        duckdb_store.verify_next(paths, files, live_counts)
        verified = time.monotonic()
        _kill_point("before_swap")
        duckdb_store.swap(paths)
        logger.info("archive: swapped %s into %s (previous kept as %s) build_seconds=%.2f "
                    "verify_seconds=%.2f", paths.next.name, paths.live.name, paths.prev.name,
                    built - started, verified - built)
    return results


def terminal_progress(index: int, total: int, day: date) -> None:
    """A one-line progress bar on stderr."""
    width = 30
    filled = width * (index - 1) // total
    sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {index}/{total} {day} ")
    sys.stderr.flush()
