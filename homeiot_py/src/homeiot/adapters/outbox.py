"""The publisher's outbox: every reading is committed here (SQLite, WAL) before it is published,
and deleted only when the gateway's receipt says InfluxDB stored it (a PUBACK is not enough).

The outbox also owns each source's ``seq``: the next number is stored in the same transaction as
the reading, so numbers keep increasing across restarts and a gap downstream means a real loss.
It is bounded (age and row count); when it must drop, it drops the oldest rows and says how many.

Schema versions (``PRAGMA user_version``): 0, the first, had no index but the primary key; 1 adds
an index on ``ts_ms`` (the age bound's prune would otherwise scan the whole table on the pump
thread) and on ``(source, seq)`` (what a receipt names; which sources still have rows). Opening an
outbox of an older version migrates it in place, in one transaction.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from homeiot.core import codec
from homeiot.core.errors import ConfigError
from homeiot.core.reading import Reading, epoch_ms

logger = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    source  TEXT    NOT NULL,
    seq     INTEGER NOT NULL,
    ts_ms   INTEGER NOT NULL,
    payload BLOB    NOT NULL
);
CREATE TABLE IF NOT EXISTS sequences (
    source   TEXT PRIMARY KEY,
    next_seq INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS last_energy (
    source     TEXT PRIMARY KEY,
    normal_kwh REAL,
    reverse_kwh REAL
);
"""

SCHEMA_VERSION = 1
#: What each version adds to the one before (index 0: from version 0 to 1).
_MIGRATIONS = (
    "CREATE INDEX IF NOT EXISTS outbox_ts_ms ON outbox (ts_ms);"
    "CREATE INDEX IF NOT EXISTS outbox_source_seq ON outbox (source, seq);",
)


@dataclass(frozen=True, slots=True)
class OutboxRow:
    id: int
    source: str
    seq: int
    payload: bytes


class Outbox:
    """A SQLite outbox used from one thread (the publisher's pump)."""

    def __init__(self, path: Path, *, max_rows: int = 2_000_000, max_age_days: float = 30) -> None:
        self.path = path
        self.max_rows = max_rows
        self.max_age_ms = int(max_age_days * 86_400_000)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(path, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            # FULL: a committed reading survives a power cut. Commits are batched by the caller.
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
            self._migrate()
            (self._rows,) = self._db.execute("SELECT count(*) FROM outbox").fetchone()
        except (OSError, sqlite3.Error) as exc:
            raise ConfigError("PUBLISHER_OUTBOX", f"cannot open the outbox {str(path)!r}: {exc}"
                              ) from exc

    def _migrate(self) -> None:
        (version,) = self._db.execute("PRAGMA user_version").fetchone()
        if version > SCHEMA_VERSION:
            raise sqlite3.DatabaseError(f"its schema version {version} is newer than this "
                                        f"publisher's ({SCHEMA_VERSION}); upgrade the publisher")
        if version == SCHEMA_VERSION:
            return
        logger.info("outbox: migrating %s from schema version %d to %d", self.path, version,
                    SCHEMA_VERSION)
        self._db.execute("BEGIN IMMEDIATE")
        try:
            for step in _MIGRATIONS[version:]:
                for statement in step.split(";"):
                    if statement.strip():
                        self._db.execute(statement)
            self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def close(self) -> None:
        self._db.close()

    def __len__(self) -> int:
        return int(self._rows)

    def add(self, readings: Sequence[Reading]) -> list[Reading]:
        """Commit readings in one transaction, numbering each source's ``seq`` on; returns the
        numbered readings. Then enforces the bounds."""
        if not readings:
            return []
        numbered: list[Reading] = []
        self._db.execute("BEGIN IMMEDIATE")
        try:
            next_seq: dict[str, int] = {}
            for reading in readings:
                if reading.source not in next_seq:
                    row = self._db.execute("SELECT next_seq FROM sequences WHERE source = ?",
                                           (reading.source,)).fetchone()
                    next_seq[reading.source] = row[0] if row else 0
                numbered.append(replace(reading, seq=next_seq[reading.source]))
                next_seq[reading.source] += 1
            self._db.executemany(
                "INSERT INTO outbox (source, seq, ts_ms, payload) VALUES (?, ?, ?, ?)",
                [(r.source, r.seq, epoch_ms(r.ts), codec.encode(r)) for r in numbered])
            self._db.executemany(
                "INSERT INTO sequences (source, next_seq) VALUES (?, ?) "
                "ON CONFLICT(source) DO UPDATE SET next_seq = excluded.next_seq",
                list(next_seq.items()))
            # The newest cumulative energies per source, so a meter backend can go on unwrapping
            # its counters after a restart (same transaction: no extra write).
            self._db.executemany(
                "INSERT INTO last_energy (source, normal_kwh, reverse_kwh) VALUES (?, ?, ?) "
                "ON CONFLICT(source) DO UPDATE SET "
                "normal_kwh = coalesce(excluded.normal_kwh, normal_kwh), "
                "reverse_kwh = coalesce(excluded.reverse_kwh, reverse_kwh)",
                [(r.source, r.energy_normal_kwh, r.energy_reverse_kwh) for r in numbered
                 if r.energy_normal_kwh is not None or r.energy_reverse_kwh is not None])
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")
        self._rows += len(numbered)
        if self._rows > self.max_rows:
            self._drop_oldest(self._rows - self.max_rows, "the outbox holds more than "
                              f"{self.max_rows} readings")
        return numbered

    def prune_older_than(self, now_ms: int) -> int:
        """Drop readings older than the age bound; returns how many."""
        cutoff = now_ms - self.max_age_ms
        before = self._db.total_changes
        self._db.execute("DELETE FROM outbox WHERE ts_ms < ?", (cutoff,))  # by the ts_ms index
        old = self._db.total_changes - before
        if old:
            self._rows -= old
            logger.warning("outbox: dropped %d reading(s) older than %.0f days (never delivered)",
                           old, self.max_age_ms / 86_400_000)
        return int(old)

    def _drop_oldest(self, count: int, why: str) -> None:
        self._db.execute("DELETE FROM outbox WHERE id IN (SELECT id FROM outbox ORDER BY id "
                         "LIMIT ?)", (count,))
        self._rows -= count
        logger.warning("outbox: dropped the %d oldest reading(s) (never delivered): %s", count, why)

    def after(self, after_id: int, until_id: int, limit: int) -> list[OutboxRow]:
        """Rows with ``after_id < id <= until_id``, oldest first."""
        rows = self._db.execute(
            "SELECT id, source, seq, payload FROM outbox WHERE id > ? AND id <= ? ORDER BY id "
            "LIMIT ?", (after_id, until_id, limit)).fetchall()
        return [OutboxRow(r[0], r[1], r[2], bytes(r[3])) for r in rows]

    def get(self, row_id: int) -> OutboxRow | None:
        """One row by id, or None when it is gone."""
        r = self._db.execute("SELECT id, source, seq, payload FROM outbox WHERE id = ?",
                             (row_id,)).fetchone()
        return OutboxRow(r[0], r[1], r[2], bytes(r[3])) if r else None

    def sources(self) -> set[str]:
        """The sources that have rows in the outbox (each found by the ``(source, seq)`` index)."""
        known = [r[0] for r in self._db.execute("SELECT source FROM sequences")]
        return {source for source in known if self._db.execute(
            "SELECT 1 FROM outbox WHERE source = ? LIMIT 1", (source,)).fetchone()}

    def max_id(self) -> int:
        (value,) = self._db.execute("SELECT coalesce(max(id), 0) FROM outbox").fetchone()
        return int(value)

    def delete(self, ids: Iterable[int]) -> int:
        """Delete delivered rows (one transaction); returns how many existed."""
        batch = [(i,) for i in ids]
        if not batch:
            return 0
        self._db.execute("BEGIN IMMEDIATE")
        before = self._db.total_changes
        self._db.executemany("DELETE FROM outbox WHERE id = ?", batch)
        deleted = self._db.total_changes - before
        self._db.execute("COMMIT")
        self._rows -= deleted
        return deleted

    def last_energy(self, source: str) -> tuple[float | None, float | None]:
        """The newest committed (normal, reverse) cumulative energy of a source, in kWh."""
        row = self._db.execute("SELECT normal_kwh, reverse_kwh FROM last_energy WHERE source = ?",
                               (source,)).fetchone()
        return (row[0], row[1]) if row else (None, None)

    def next_seq(self, source: str) -> int:
        row = self._db.execute("SELECT next_seq FROM sequences WHERE source = ?", (source,)
                               ).fetchone()
        return int(row[0]) if row else 0
