"""The daily archive (the seed's "Batch 実行手順"): InfluxDB → Parquet → DuckDB, and back.

For each local day: stream the day's readings out of InfluxDB with chunked InfluxQL and write them
as Parquet row groups to a staging file (fsynced). A day is never replaced by fewer rows than the
archive holds unless the operator allows it, and never by an empty export. Then build
``home_energy.next.duckdb`` from the live file, replace those days there from the staged Parquet,
CHECKPOINT, close, and verify it in a fresh process. Only then is the run committed: a manifest is
written, the staged files are renamed into ``raw_meter_readings/dt=YYYY-MM-DD/`` and next is
swapped in atomically (the old file becomes ``home_energy.prev.duckdb``). A run killed before the
manifest leaves the archive as it was; one killed after it is completed by the next run, so
Parquet and DuckDB agree. An exclusive lock keeps runs apart.

Reconciliation (:func:`days_to_reconcile`) finds archived days for which InfluxDB received late
readings; :func:`restore_days` writes archived days back into InfluxDB.
"""

from __future__ import annotations

import fcntl
import functools
import json
import logging
import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import IO, Any

import pyarrow as pa
import pyarrow.csv as pa_csv

from homeiot.adapters import duckdb_store, parquet
from homeiot.adapters.duckdb_store import ArchivePaths
from homeiot.adapters.influx import InfluxClient
from homeiot.config import ArchiveSettings
from homeiot.core import status, table
from homeiot.core.days import day_window, local_day
from homeiot.core.errors import HomeIotError, InfluxQueryError
from homeiot.core.lineprotocol import encode_reading
from homeiot.core.reading import Reading, epoch_ms

logger = logging.getLogger(__name__)

#: Testing hook: kill the run (SIGKILL) at a named step, to prove every step is crash-safe.
KILL_AT_ENV = "HOMEIOT_ARCHIVE_KILL_AT"
KILL_POINTS = ("parquet_staged", "next_built", "before_swap", "parquet_published")
#: Written (in the staging directory) once next is verified: the run's commit point.
COMMIT_MANIFEST = "commit.json"


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
        # The header names the columns; InfluxDB's own "name" and "tags" (the measurement and an
        # empty string on every row) are not archived, so they are not even converted.
        header = stream.peek(1 << 16).split(b"\n", 1)[0].strip().decode("utf-8", "replace")
        wanted = [c for c in header.split(",") if c not in ("name", "tags")] or None
        try:
            reader = pa_csv.open_csv(
                stream, read_options=pa_csv.ReadOptions(block_size=1 << 20),
                convert_options=pa_csv.ConvertOptions(column_types=parquet.CSV_TYPES,
                                                      include_columns=wanted))
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


def held_rows(settings: ArchiveSettings, archived: dict[date, int], day: date) -> int:
    """What the archive holds for ``day``: the larger of its DuckDB count and its Parquet rows."""
    return max(archived.get(day, 0), parquet.partition_rows(settings.parquet_root, day) or 0)


def _manifest(settings: ArchiveSettings) -> Path:
    return settings.parquet_root / parquet.STAGING / COMMIT_MANIFEST


def _write_manifest(settings: ArchiveSettings, staged: dict[date, tuple[Path, int]]) -> None:
    """The commit point: once this file exists, the run is completed by whoever runs next."""
    path = _manifest(settings)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({d.isoformat(): [p.name, n] for d, (p, n) in staged.items()}))
    with tmp.open("rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    parquet.fsync_dir(path.parent)


def _commit(settings: ArchiveSettings, paths: ArchivePaths,
            staged: dict[date, tuple[Path, int]]) -> None:
    """Publish the staged Parquet files, swap the verified next in, drop the manifest. Every step
    can be repeated, so a run killed here is finished by :func:`recover`."""
    for day, (path, rows) in sorted(staged.items()):
        if path.exists():
            parquet.publish_day(settings.parquet_root, day, path, rows)
    _kill_point("parquet_published")
    if paths.next.exists():
        duckdb_store.swap(paths)
    _manifest(settings).unlink()
    parquet.fsync_dir(_manifest(settings).parent)


def recover(settings: ArchiveSettings, paths: ArchivePaths) -> None:
    """Finish a run that was killed after its commit point; remove what earlier runs left."""
    manifest = _manifest(settings)
    if manifest.exists():
        entries = json.loads(manifest.read_text())
        staged = {date.fromisoformat(d): (manifest.parent / name, int(rows))
                  for d, (name, rows) in entries.items()}
        logger.warning("archive: completing an interrupted run (days %s)",
                       ", ".join(sorted(entries)))
        _commit(settings, paths, staged)
    manifest.with_name(manifest.name + ".tmp").unlink(missing_ok=True)
    removed = parquet.clean_staging(settings.parquet_root)
    if removed:
        logger.info("archive: removed %d staging file(s) of an interrupted run", removed)
    duckdb_store.remove_leftovers(paths)


def archive_days(settings: ArchiveSettings, days: list[date],
                 progress: Callable[[int, int, date], None] | None = None, *,
                 allow_shrink: bool = False) -> list[DayResult]:
    """Archive ``days`` (oldest first) under the lock; see the module docstring.

    Raises ``ShrinkRefusedError`` (nothing changed) when a day would end up with fewer rows than
    the archive holds, unless ``allow_shrink``; an empty export never replaces a day that has
    rows."""
    paths = ArchivePaths(settings.duckdb_path, settings.duckdb_memory_limit)
    results: list[DayResult] = []
    with ArchiveLock(paths.live.with_name(paths.live.name + ".lock")):
        recover(settings, paths)
        if not days:
            return results
        archived = duckdb_store.archived_days(paths.live, paths.memory_limit)
        live_counts: dict[str, int] = {}
        staged: dict[date, tuple[Path, int]] = {}
        builder = duckdb_store.NextBuilder(paths, allow_shrink=allow_shrink, open_now=False)
        # Started now so that its interpreter and DuckDB load while the export runs; it opens
        # next only once next is built and closed.
        verifier = duckdb_store.Verifier(paths)
        build = _BuildThread()
        try:
            # The live file's rows per day (what verification expects of every other day in
            # next) and the copy of live to next are work on the live file, not on the export:
            # the build thread does them while the export starts (on a 90-day archive, about a
            # second).
            build.call(_prepare_build, paths, builder, live_counts)
            with InfluxClient(settings.influx) as influx:
                for index, day in enumerate(days, 1):
                    if progress is not None:
                        progress(index, len(days), day)
                    started = time.monotonic()
                    build.call(builder.begin_day, day)
                    path, rows = parquet.stage_day(
                        settings.parquet_root, day, _day_batches(influx, settings, day),
                        functools.partial(build.call, builder.add, day))
                    staged[day] = (path, rows)
                    held = held_rows(settings, archived, day)
                    duckdb_store.check_shrink(day, held, rows, allow_shrink=allow_shrink)
                    build.call(builder.end_day, day, rows)
                    _kill_point("parquet_staged")
                    results.append(DayResult(day, rows, time.monotonic() - started))
                    logger.info("archive: day=%s rows=%d staged seconds=%.2f", day, rows,
                                results[-1].seconds)
            started = time.monotonic()
            build.close()
            builder.finish()
            pa.default_memory_pool().release_unused()  # hand the export's buffers back
            built = time.monotonic()
            _kill_point("next_built")
            files = {day: path for day, (path, _) in staged.items()}
            duckdb_store.verify_next(paths, files, live_counts,
                                     timeout_s=settings.verify_timeout_s, verifier=verifier)
            verified = time.monotonic()
            _kill_point("before_swap")
        except BaseException:
            verifier.close()
            build.close(raise_error=False)
            builder.abort()
            for path, _ in staged.values():
                path.unlink(missing_ok=True)
            parquet.clean_staging(settings.parquet_root)
            duckdb_store.remove_leftovers(paths)
            raise
        _write_manifest(settings, staged)
        _commit(settings, paths, staged)
        logger.info("archive: published %d day(s); swapped %s into %s (previous kept as %s) "
                    "build_seconds=%.2f verify_seconds=%.2f", len(staged), paths.next.name,
                    paths.live.name, paths.prev.name, built - started, verified - built)
    return results


def _prepare_build(paths: ArchivePaths, builder: duckdb_store.NextBuilder,
                   live_counts: dict[str, int]) -> None:
    live_counts.update(duckdb_store.day_counts(paths.live, paths.memory_limit))
    builder.open()


class _BuildThread:
    """Runs the DuckDB build on its own thread, fed through a bounded queue, so DuckDB ingests a
    day's row groups while the next ones are exported and written as Parquet (DuckDB and pyarrow
    release the GIL). The first error stops the build; :meth:`close` re-raises it."""

    def __init__(self) -> None:
        self._queue: queue.Queue[tuple[Callable[..., None], tuple[Any, ...]] | None] = (
            queue.Queue(maxsize=2))
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="archive-build", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            if self._error is None:
                try:
                    item[0](*item[1])
                except BaseException as exc:  # noqa: BLE001 - handed to the caller in close()
                    self._error = exc

    def call(self, method: Callable[..., None], *args: Any) -> None:
        if self._error is not None:
            self.close()
        self._queue.put((method, args))

    def close(self, *, raise_error: bool = True) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        if raise_error and self._error is not None:
            raise self._error


def influx_field_counts(influx: InfluxClient, settings: ArchiveSettings, day: date
                        ) -> dict[str, int]:
    """InfluxDB's ``count(field)`` over the local ``day``, by archive column name."""
    start, end = day_window(day, settings.timezone)
    measurement = settings.influx.measurement.replace("\\", "\\\\").replace('"', '\\"')
    selects = ", ".join(f'count("{c.influx}") AS "{c.name}"' for c in table.FIELDS)
    counts = {c.name: 0 for c in table.FIELDS}
    for row in influx.rows(f'SELECT {selects} FROM "{measurement}" '  # noqa: S608
                           f"WHERE time >= {epoch_ms(start)}ms AND time < {epoch_ms(end)}ms"):
        for name in counts:
            counts[name] += int(row.get(name) or 0)
    return counts


def days_to_reconcile(settings: ArchiveSettings, through: date, window: int,
                      skip: Sequence[date] = ()) -> list[date]:
    """Archived days among the ``window`` days ending ``through`` for which InfluxDB now holds
    readings the archive lacks (late data). A day for which InfluxDB holds *fewer* readings
    (retention, a rebuilt database) is kept as archived, with a warning."""
    if window < 1:
        return []
    first = through - timedelta(days=window - 1)
    archived = duckdb_store.field_counts(settings.duckdb_path, first, through,
                                         settings.duckdb_memory_limit)
    late: list[date] = []
    with InfluxClient(settings.influx) as influx:
        for day in sorted(set(archived) - set(skip)):
            counts = influx_field_counts(influx, settings, day)
            if counts == archived[day]:
                continue
            more = [n for n in counts if counts[n] > archived[day][n]]
            if more:
                logger.info("archive: reconcile day=%s influx=%s archived=%s: re-archiving", day,
                            counts, archived[day])
                late.append(day)
            else:
                logger.warning("archive: reconcile day=%s: InfluxDB holds fewer readings than the "
                               "archive (influx=%s archived=%s); keeping the archive (use --date "
                               "%s --allow-shrink to replace it)", day, counts, archived[day], day)
    return late


def first_influx_day(settings: ArchiveSettings) -> date | None:
    """The local day of the oldest reading in InfluxDB (None when it holds none)."""
    measurement = settings.influx.measurement.replace("\\", "\\\\").replace('"', '\\"')
    with InfluxClient(settings.influx) as influx:
        # Every field: a day may hold only half-hour slot readings (read back from the meter's
        # history), which carry no power_w.
        for row in influx.rows(f'SELECT * FROM "{measurement}" '  # noqa: S608
                               "ORDER BY time ASC LIMIT 1"):
            return local_day(datetime.fromtimestamp(int(row["time"]) / 1000, UTC),
                             settings.timezone)
    return None


def restore_days(settings: ArchiveSettings, days: Sequence[date],
                 progress: Callable[[int, int, date], None] | None = None) -> list[DayResult]:
    """Write the archived ``days`` back into InfluxDB with the gateway's encoder and writer
    (``encode_reading`` → ``InfluxClient.write``). A point is keyed by its source and time, so
    restoring again overwrites it: idempotent. Days without a partition are skipped."""
    measurement = settings.influx.measurement
    results: list[DayResult] = []
    with InfluxClient(settings.influx) as influx:
        for index, day in enumerate(days, 1):
            if progress is not None:
                progress(index, len(days), day)
            started = time.monotonic()
            rows = 0
            if parquet.partition_rows(settings.parquet_root, day) is None:
                logger.warning("restore: day=%s has no archived partition; skipped", day)
            for batch in parquet.read_day(settings.parquet_root, day):
                lines = [encode_reading(Reading(**row), measurement) for row in batch.to_pylist()]
                influx.write(lines)
                rows += len(lines)
            results.append(DayResult(day, rows, time.monotonic() - started))
            logger.info("restore: day=%s rows=%d seconds=%.2f", day, rows, results[-1].seconds)
    return results


def terminal_progress(index: int, total: int, day: date) -> None:
    """A one-line progress bar on stderr."""
    width = 30
    filled = width * (index - 1) // total
    sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {index}/{total} {day} ")
    sys.stderr.flush()


def record_success(settings: ArchiveSettings, days: int, rows: int) -> None:
    """Store that this run succeeded (``homeiot_status,component=archive``), for the alert on an
    archive that has not run for 36 hours. The archive itself is done: a failure to store this
    is a warning, never a failed run."""
    line = status.status_line("archive", datetime.now(UTC), ok=1, days=days, rows=rows)
    try:
        with InfluxClient(settings.influx) as influx:
            influx.write([line])
    except HomeIotError as exc:
        logger.warning("archive: done, but its success could not be stored for the alerts: %s",
                       exc)
