"""The DuckDB archive: ``home_energy.duckdb`` with the table ``raw_meter_readings``.

The live file is never written in place. A run copies it to ``home_energy.next.duckdb``, replaces
the archived days there from their Parquet files, checkpoints and closes it, has a fresh process
verify it, and swaps it in with atomic renames, keeping the previous file as
``home_energy.prev.duckdb``. Readers holding the old file keep reading it; new connections see the
new one.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any, TypeVar

import duckdb

from homeiot.core import table
from homeiot.core.errors import HomeIotError

T = TypeVar("T")
TABLE = table.TABLE
DDL = table.create_table_sql()
_COLUMNS = table.COLUMN_NAMES

#: DuckDB may otherwise take 80 % of RAM and every core; the archive shares a small home server.
DEFAULT_MEMORY_LIMIT = "128MB"
_THREADS = 2
#: The build of next appends on one thread: DuckDB then writes each full row group to the file,
#: compressed, as it is inserted (an "optimistic write"), so COMMIT and CHECKPOINT have almost
#: nothing left to do. With two threads it keeps the rows in memory and compresses them at
#: CHECKPOINT: measured twice the CPU, a file about 1.7 times the size, more memory.
_BUILD_THREADS = 1
#: Files are written in the storage format of DuckDB 1.0 (storage version 64), which every DuckDB
#: from 0.10 through 1.5 and 2.x reads: a user's ``duckdb`` CLI 1.x can open the archive. Without
#: it, DuckDB 2.0 writes storage version 69, which 1.x refuses ("created with a newer version").
STORAGE_COMPATIBILITY = "v1.0.0"
STORAGE_VERSION = 64


class ArchiveError(HomeIotError):
    """The archive could not be built or verified; the live database is unchanged."""


class DatabaseBusyError(ArchiveError):
    """Another process (a ``duckdb`` CLI left open, a notebook …) holds a database file."""


class VerifyTimeoutError(ArchiveError):
    """The fresh-process verification did not finish in time."""


@contextlib.contextmanager
def _translated(path: Path | None, doing: str) -> Iterator[None]:
    """DuckDB's exceptions → :class:`ArchiveError` (:class:`DatabaseBusyError` for a held lock)."""
    where = str(path) if path is not None else "DuckDB"
    try:
        yield
    except duckdb.IOException as exc:
        if "lock" in str(exc).lower():
            raise DatabaseBusyError(
                f"{where} is held by another process (a duckdb CLI or client left open?); close "
                f"it and re-run. DuckDB said: {exc}") from exc
        raise ArchiveError(f"{doing} {where} failed: {exc}") from exc
    except duckdb.Error as exc:
        raise ArchiveError(f"{doing} {where} failed: {exc}") from exc


def connect(path: Path | None = None, *, read_only: bool = False,
            memory_limit: str = DEFAULT_MEMORY_LIMIT, threads: int = _THREADS
            ) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection with the archive's resource limits (in-memory when ``path`` is None);
    new files get :data:`STORAGE_COMPATIBILITY`. Errors become :class:`ArchiveError`."""
    config: dict[str, str | bool | int | float | list[str]] = {"memory_limit": memory_limit,
                                                               "threads": threads}
    if not read_only:
        config["storage_compatibility_version"] = STORAGE_COMPATIBILITY
    with _translated(path, "opening"):
        return duckdb.connect(str(path) if path is not None else ":memory:",
                              read_only=read_only, config=config)


def storage_version(path: Path) -> int | None:
    """The storage version in a DuckDB file's header (None when it is not a DuckDB file)."""
    with path.open("rb") as handle:
        header = handle.read(20)
    if len(header) < 20 or header[8:12] != b"DUCK":
        return None
    return int(struct.unpack_from("<Q", header, 12)[0])


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
    """Per-day aggregates touching every column (:func:`homeiot.core.table.stats_expressions`)."""
    return (f"SELECT dt::VARCHAR AS dt, {', '.join(table.stats_expressions())} FROM {source} "
            f"{where} GROUP BY dt")


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
        with _translated(None, "reading Parquet statistics in"):
            for day, path in files.items():
                source = f"(SELECT *, DATE '{day.isoformat()}' AS dt FROM read_parquet(?))"
                cursor = con.execute(_stats_sql(source, ""), [str(path)])
                names = [d[0] for d in cursor.description or ()]
                for row in cursor.fetchall():
                    out[row[0]] = dict(zip(names, row, strict=True))
    finally:
        con.close()
    return out


def _read(path: Path, memory_limit: str, statement: str, params: Sequence[Any] = ()
          ) -> list[tuple[Any, ...]] | None:
    """Rows of a read-only statement on a database file; None when the file or table is missing.
    A file another process holds raises :class:`DatabaseBusyError`."""
    if not path.exists():
        return None
    con = connect(path, read_only=True, memory_limit=memory_limit)
    try:
        with _translated(path, "reading"):
            try:
                return con.execute(statement, list(params)).fetchall()
            except duckdb.CatalogException:
                return None
    finally:
        con.close()


def day_counts(path: Path, memory_limit: str = DEFAULT_MEMORY_LIMIT) -> dict[str, int]:
    """Rows per day in a database file (read-only); empty when the file does not exist."""
    rows = _read(path, memory_limit, f"SELECT dt::VARCHAR, count(*) FROM {TABLE} GROUP BY dt")
    return {day: int(count) for day, count in rows or ()}


def archived_days(path: Path, memory_limit: str = DEFAULT_MEMORY_LIMIT) -> dict[date, int]:
    """``archive_days``: every archived day and its recorded row count."""
    rows = _read(path, memory_limit, f"SELECT dt, row_count FROM {table.DAYS_TABLE}")
    return {day: int(count) for day, count in rows or ()}


def last_archived_day(path: Path, memory_limit: str = DEFAULT_MEMORY_LIMIT) -> date | None:
    """The newest day recorded in ``archive_days`` of the live file, if any."""
    days = archived_days(path, memory_limit)
    return max(days) if days else None


def field_counts(path: Path, first: date, last: date,
                 memory_limit: str = DEFAULT_MEMORY_LIMIT) -> dict[date, dict[str, int]]:
    """Per archived day in ``[first, last]``: the non-null count of every InfluxDB field (what
    reconciliation compares with InfluxDB's ``count(field)``); zeros for an empty archived day."""
    counts = ", ".join(f"coalesce(c.{c.name}, 0)" for c in table.FIELDS)
    rows = _read(path, memory_limit,
                 f"SELECT d.dt, {counts} FROM {table.DAYS_TABLE} d LEFT JOIN ("
                 f"SELECT dt, {', '.join(table.field_count_expressions())} FROM {TABLE} "
                 "WHERE dt BETWEEN ? AND ? GROUP BY dt) c ON c.dt = d.dt "
                 "WHERE d.dt BETWEEN ? AND ?", [first, last, first, last])
    return {row[0]: {c.name: int(n) for c, n in zip(table.FIELDS, row[1:], strict=True)}
            for row in rows or ()}


def remove_leftovers(paths: ArchivePaths) -> None:
    """Delete a ``next`` file (and its WAL) that a killed run left behind."""
    for leftover in (paths.next, ArchivePaths.wal(paths.next)):
        leftover.unlink(missing_ok=True)


def _start_next(paths: ArchivePaths) -> duckdb.DuckDBPyConnection:
    """next as a copy of live (a file copy when live has the archive's storage version; otherwise
    its rows copied into a new file in that version, which upgrades an archive written by
    DuckDB 2.x defaults to one DuckDB 1.x reads)."""
    remove_leftovers(paths)
    copy_rows = paths.live.exists() and storage_version(paths.live) != STORAGE_VERSION
    if paths.live.exists() and not copy_rows:
        shutil.copyfile(paths.live, paths.next)
    con = connect(paths.next, memory_limit=paths.memory_limit, threads=_BUILD_THREADS)
    try:
        with _translated(paths.next, "building"):
            con.execute(DDL)
            if copy_rows:
                con.execute("ATTACH ? AS live (READ_ONLY)", [str(paths.live)])
                con.execute(f"INSERT INTO {TABLE} SELECT {', '.join((*_COLUMNS, 'dt'))} "
                            f"FROM live.{TABLE}")
                con.execute(f"INSERT INTO {table.DAYS_TABLE} SELECT dt, row_count, archived_at "
                            f"FROM live.{table.DAYS_TABLE}")
                con.execute("DETACH live")
    except BaseException:
        con.close()
        raise
    return con


class NextBuilder:
    """Builds next in one transaction, a day at a time: :meth:`begin_day`, :meth:`add` Arrow
    batches (or :meth:`add_parquet`), :meth:`end_day`; then :meth:`finish` (COMMIT, CHECKPOINT,
    close, fsync) or :meth:`abort`. Used from one thread only. A day that ends with another row
    count than announced, or with fewer rows than it had (unless ``allow_shrink``; never to zero),
    fails the build."""

    def __init__(self, paths: ArchivePaths, *, allow_shrink: bool = False,
                 open_now: bool = True) -> None:
        """Checks that live has no WAL; copies live to next and begins the transaction unless
        ``open_now`` is false (then :meth:`open` does, e.g. on the build thread)."""
        if ArchivePaths.wal(paths.live).exists():
            raise ArchiveError(
                f"{ArchivePaths.wal(paths.live)} exists: something wrote to the live database. "
                "Open it read-write once with DuckDB and close it (that checkpoints the WAL), "
                "then re-run.")
        self.paths = paths
        self.allow_shrink = allow_shrink
        self._held: dict[date, int] = {}
        self._con: duckdb.DuckDBPyConnection | None = None
        self._closed = False
        if open_now:
            self.open()

    def open(self) -> None:
        """Copy live to next and begin the build's transaction."""
        if self._con is not None or self._closed:
            raise ArchiveError(f"{self.paths.next.name} was opened already")
        self._con = _start_next(self.paths)
        with self._translated():
            self._con.execute("BEGIN TRANSACTION")

    def _connection(self) -> duckdb.DuckDBPyConnection:
        if self._con is None:
            raise ArchiveError(f"{self.paths.next.name} is not open (closed, or never opened)")
        return self._con

    def _translated(self) -> contextlib.AbstractContextManager[None]:
        return _translated(self.paths.next, "building")

    def begin_day(self, day: date) -> None:
        con = self._connection()
        with self._translated():
            self._held[day] = _count(con, day)
            con.execute(f"DELETE FROM {TABLE} WHERE dt = ?", [day])

    def add(self, day: date, batch: Any) -> None:
        """Insert an Arrow record batch in the archive's Parquet schema as rows of ``day``."""
        con = self._connection()
        with self._translated():
            # A relation, not register(): a registered view dropped inside the open transaction
            # stays in the catalog, holding its Arrow batch, until COMMIT (measured: every batch
            # of the day kept alive).
            con.from_arrow(batch).project(
                f"{', '.join(_COLUMNS)}, DATE '{day.isoformat()}' AS dt").insert_into(TABLE)

    def add_parquet(self, day: date, path: Path) -> None:
        with self._translated():
            self._connection().execute(
                f"INSERT INTO {TABLE} SELECT {', '.join(_COLUMNS)}, ?::DATE AS dt "
                "FROM read_parquet(?)", [day, str(path)])

    def end_day(self, day: date, rows: int) -> None:
        con = self._connection()
        with self._translated():
            new = _count(con, day)
            if new != rows:
                raise ArchiveError(f"{day}: {new} rows inserted into {self.paths.next.name}, "
                                   f"{rows} in its Parquet file")
            check_shrink(day, self._held[day], new, allow_shrink=self.allow_shrink)
            con.execute(f"INSERT OR REPLACE INTO {table.DAYS_TABLE} VALUES (?, ?, now())",
                        [day, new])

    def finish(self) -> None:
        con = self._connection()
        try:
            with self._translated():
                con.execute("COMMIT")
                con.execute("CHECKPOINT")
        finally:
            self.abort()
        with self.paths.next.open("rb+") as handle:
            os.fsync(handle.fileno())
        if ArchivePaths.wal(self.paths.next).exists():
            raise ArchiveError(f"{self.paths.next.name} still has a WAL after CHECKPOINT and close")

    def abort(self) -> None:
        """Close without committing (the transaction is rolled back; next is left to remove)."""
        self._closed = True
        if self._con is not None:
            self._con.close()
            self._con = None


def build_next(paths: ArchivePaths, files: Mapping[date, Path], rows: Mapping[date, int],
               *, allow_shrink: bool = False) -> None:
    """Copy live → next and replace ``files``' days in next from their Parquet files, in one
    transaction (:class:`NextBuilder`). ``rows`` are the row counts the files were written
    with."""
    builder = NextBuilder(paths, allow_shrink=allow_shrink)
    try:
        for day, path in sorted(files.items()):
            builder.begin_day(day)
            builder.add_parquet(day, path)
            builder.end_day(day, rows[day])
    except BaseException:
        builder.abort()
        raise
    builder.finish()


def _count(con: duckdb.DuckDBPyConnection, day: date) -> int:
    row = con.execute(f"SELECT count(*) FROM {TABLE} WHERE dt = ?", [day]).fetchone()
    return int(row[0]) if row else 0


class ShrinkRefusedError(ArchiveError):
    """Re-archiving a day would leave it with fewer rows than the archive holds."""

    def __init__(self, day: date, held: int, new: int) -> None:
        hint = ("an empty export never replaces an archived day; if the day must really be "
                "emptied, delete its partition and its archive_days row by hand" if new == 0 else
                "InfluxDB holds fewer readings for it (retention, a rebuilt database?); pass "
                "--allow-shrink to replace it anyway")
        super().__init__(f"{day}: the archive holds {held} rows, InfluxDB now gives {new}; "
                         f"refusing to shrink the day ({hint}). The archive is unchanged.")
        self.day, self.held, self.new = day, held, new


def check_shrink(day: date, held: int, new: int, *, allow_shrink: bool) -> None:
    """The shrink guard: raise :class:`ShrinkRefusedError` when ``new`` rows would replace the
    ``held`` ones of ``day`` and are fewer (allowed by ``allow_shrink``, except to zero)."""
    if new < held and (new == 0 or not allow_shrink):
        raise ShrinkRefusedError(day, held, new)


def verify_next(paths: ArchivePaths, files: Mapping[date, Path],
                live_counts: Mapping[str, int], *, timeout_s: float = 3600,
                verifier: Verifier | None = None) -> None:
    """Check next in a fresh process (read-only) against the Parquet source and the live file:
    every column of the archived days, and the row count of every other day. ``verifier`` is one
    started ahead of time (:class:`Verifier`); by default one is started now."""
    days = sorted(files)
    with verifier or Verifier(paths) as process:
        report, expected = process.run(days, timeout_s,
                                       lambda: parquet_stats(files, paths.memory_limit))
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


class Verifier:
    """The fresh process that verifies next (``python -m homeiot.adapters.duckdb_store``).

    It can be started before next is built: the interpreter and DuckDB load meanwhile (on the
    other core, while the export runs), then it waits for :meth:`run` to send the days on its
    stdin, and only then opens next — closed and fsynced by then, by another process. It shares
    nothing with the connection that built the file. If the archiver dies, the verifier reads
    end-of-file and exits without opening anything."""

    def __init__(self, paths: ArchivePaths) -> None:
        self.paths = paths
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "homeiot.adapters.duckdb_store", paths.memory_limit,
                 str(paths.next)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        except OSError as exc:
            raise ArchiveError(f"cannot start the verification of {paths.next}: {exc}") from exc

    def __enter__(self) -> Verifier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def run(self, days: Sequence[date], timeout_s: float, meanwhile: Callable[[], T]
            ) -> tuple[Any, T]:
        """Verify ``days`` of next; compute ``meanwhile()`` (the Parquet side) while the verifier
        runs, on the other core. Returns the verifier's report and ``meanwhile()``."""
        paths = self.paths
        if storage_version(paths.next) != STORAGE_VERSION:
            raise ArchiveError(f"{paths.next.name} has storage version "
                               f"{storage_version(paths.next)}, not {STORAGE_VERSION} "
                               f"({STORAGE_COMPATIBILITY})")
        proc = self._proc
        started = time.monotonic()
        try:
            if proc.stdin is not None:
                with contextlib.suppress(BrokenPipeError):  # it died: its stderr says why
                    proc.stdin.write(" ".join(d.isoformat() for d in days) + "\n")
                    proc.stdin.flush()
            local = meanwhile()
            stdout, stderr = proc.communicate(timeout=max(0.0, timeout_s
                                                          - (time.monotonic() - started)))
        except subprocess.TimeoutExpired as exc:
            raise VerifyTimeoutError(
                f"verifying {paths.next} took longer than {timeout_s:g} s "
                "(ARCHIVE_VERIFY_TIMEOUT_S); the live database is unchanged") from exc
        finally:
            self.close()
        if proc.returncode != 0:
            raise ArchiveError(f"verifying {paths.next.name} failed: {stderr.strip()[-500:]}")
        try:
            return json.loads(stdout), local
        except ValueError as exc:
            raise ArchiveError(f"verifying {paths.next.name}: unreadable report {stdout[:200]!r}"
                               ) from exc

    def close(self) -> None:
        """Stop the verifier if it still runs (a failed or abandoned run)."""
        if self._proc.poll() is None:
            self._proc.kill()
        with contextlib.suppress(ValueError, OSError):
            self._proc.communicate()


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
    """``python -m homeiot.adapters.duckdb_store MEMORY_LIMIT FILE``, then one line on stdin with
    the days (ISO, space-separated): print the aggregates as JSON. End-of-file instead of the
    line (the archiver gave up) exits at once without opening the file."""
    memory_limit, path = argv[0], Path(argv[1])
    line = sys.stdin.readline()
    if not line.endswith("\n"):
        return 0
    days = [date.fromisoformat(d) for d in line.split()]
    try:
        con = connect(path, read_only=True, memory_limit=memory_limit)
        try:
            with _translated(path, "verifying"):
                stats = day_stats(con, days) if days else {}
                counts = {d: int(n) for d, n in con.execute(
                    f"SELECT dt::VARCHAR, count(*) FROM {TABLE} GROUP BY dt").fetchall()}
        finally:
            con.close()
    except ArchiveError as exc:
        print(exc, file=sys.stderr)
        return 1
    json.dump({"days": stats, "counts": counts}, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(_verify_main(sys.argv[1:]))
