"""The dead-letter store: payloads the gateway could not store, kept in SQLite on the data volume.

Each letter keeps the raw payload, its topic, the reason and when it arrived. Letters are written
(and synced) before the MQTT message is acknowledged, so an invalid payload is never lost, only
set aside; once the cause is fixed, ``homeiot-gateway replay-dead-letters`` feeds them back.

A letter is stored once per message: the same payload on the same topic again (a publisher's
resend racing the receipt that names the first copy) adds nothing. The identity is the message
itself (topic and the SHA-256 of the payload), not its ``(source, seq)``: a different reading
that happens to carry a seq already set aside (a replaced Pi numbers from 0 again) is kept too.

Schema versions (``PRAGMA user_version``): 0, the first, had no identity; 1 adds ``digest`` and a
unique index on ``(topic, digest)``. Opening a store of version 0 migrates it in place, in one
transaction: it computes the digests and keeps the oldest of any identical letters.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sqlite3
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from homeiot.core.errors import ConfigError, StorageError

logger = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS dead_letters (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    received_at TEXT    NOT NULL,
    topic       TEXT    NOT NULL,
    payload     BLOB    NOT NULL,
    error       TEXT    NOT NULL
)
"""

SCHEMA_VERSION = 1
#: Statements that take a store from version ``i`` to ``i + 1`` (``sha256`` is ours, see below).
_MIGRATIONS = (
    """ALTER TABLE dead_letters ADD COLUMN digest BLOB;
    UPDATE dead_letters SET digest = sha256(payload);
    DELETE FROM dead_letters WHERE id NOT IN (SELECT min(id) FROM dead_letters
                                              GROUP BY topic, digest);
    CREATE UNIQUE INDEX dead_letters_identity ON dead_letters (topic, digest)""",
)


def _digest(payload: bytes) -> bytes:
    return hashlib.sha256(payload).digest()


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A message that could not be stored, and why."""

    topic: str
    payload: bytes
    error: str
    received_at: datetime


@dataclass(frozen=True, slots=True)
class StoredDeadLetter:
    """A dead letter with its id in the store."""

    id: int
    letter: DeadLetter


def _read_only(path: Path) -> bool:
    """Whether ``path`` (or its nearest existing parent) is on a file system mounted read-only."""
    for candidate in (path, *path.parents):
        try:
            return bool(os.statvfs(candidate).f_flag & os.ST_RDONLY)
        except OSError:
            continue
    return False


class DeadLetterStore:
    """A small thread-safe SQLite store (WAL, synchronous=FULL: durable before we acknowledge).

    On a read-only file system (a disk remounted read-only after errors, say) the store opens
    *unavailable*: :attr:`problem` says why and every operation raises :class:`StorageError`, so
    the gateway keeps storing valid readings, reports the problem (``/readyz``), and stops
    (exit 1) rather than acknowledge a message it cannot set aside. Any other failure to open it
    is a configuration error.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.problem: str | None = None
        self._db: sqlite3.Connection | None = None
        self._lock = threading.Lock()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.create_function("sha256", 1, _digest, deterministic=True)
            self._db.execute(_SCHEMA)
            self._migrate(self._db)
        except (OSError, sqlite3.Error) as exc:
            if self._db is not None:
                self._db.close()
                self._db = None
            if not _read_only(path.parent):
                raise ConfigError("GATEWAY_DEAD_LETTER_DB", f"cannot open the dead-letter "
                                  f"store {str(path)!r}: {exc}") from exc
            self.problem = (f"the dead-letter store {str(path)!r} is on a read-only file system "
                            f"({exc}): a message that must be set aside cannot be, so it is not "
                            "acknowledged (the gateway stops when one comes); make the disk "
                            "writable and restart the gateway")

    def _connection(self, doing: str) -> sqlite3.Connection:
        if self._db is None:
            raise StorageError(f"cannot {doing}: " + (
                self.problem or f"the dead-letter store {str(self.path)!r} is closed"))
        return self._db

    @staticmethod
    def _migrate(db: sqlite3.Connection) -> None:
        (version,) = db.execute("PRAGMA user_version").fetchone()
        if version > SCHEMA_VERSION:
            raise sqlite3.DatabaseError(f"its schema version {version} is newer than this "
                                        f"gateway's ({SCHEMA_VERSION}); upgrade the gateway")
        if version == SCHEMA_VERSION:
            return
        logger.info("dead letters: migrating from schema version %d to %d", version,
                    SCHEMA_VERSION)
        db.execute("BEGIN IMMEDIATE")
        try:
            for step in _MIGRATIONS[version:]:
                for statement in step.split(";"):
                    if statement.strip():
                        db.execute(statement)
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def close(self) -> None:
        """Close it; every later operation raises StorageError (not sqlite3's ProgrammingError)."""
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def add(self, letters: Iterable[DeadLetter]) -> int:
        """Store letters in one transaction; returns how many were new (a letter already held,
        the same payload on the same topic, is left as it is)."""
        rows = [(lt.received_at.astimezone(UTC).isoformat(), lt.topic, lt.payload, lt.error,
                 _digest(lt.payload)) for lt in letters]
        if not rows:
            return 0
        with self._lock:
            db = self._connection("store dead letters")
            try:
                db.execute("BEGIN IMMEDIATE")
                try:
                    before = db.total_changes
                    db.executemany(
                        "INSERT INTO dead_letters (received_at, topic, payload, error, digest) "
                        "VALUES (?,?,?,?,?) ON CONFLICT (topic, digest) DO NOTHING", rows)
                    added = db.total_changes - before
                    db.execute("COMMIT")
                except BaseException:
                    if db.in_transaction:
                        db.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                raise StorageError(f"cannot store {len(rows)} dead letter(s) in "
                                   f"{str(self.path)!r}: {exc}") from exc
        return added

    def count(self) -> int:
        try:
            with self._lock:
                (total,) = self._connection("count the dead letters").execute(
                    "SELECT COUNT(*) FROM dead_letters").fetchone()
        except sqlite3.Error as exc:
            raise StorageError(f"cannot count the dead letters in {str(self.path)!r}: {exc}"
                               ) from exc
        return int(total)

    def list(self, *, limit: int = 100, after_id: int = 0) -> list[StoredDeadLetter]:
        """Letters with ids greater than ``after_id``, oldest first (keyset pagination)."""
        try:
            with self._lock:
                rows = self._connection("list the dead letters").execute(
                    "SELECT id, received_at, topic, payload, error FROM dead_letters "
                    "WHERE id > ? ORDER BY id LIMIT ?", (after_id, limit)).fetchall()
        except sqlite3.Error as exc:
            raise StorageError(f"cannot list the dead letters in {str(self.path)!r}: {exc}"
                               ) from exc
        return [StoredDeadLetter(row[0], DeadLetter(row[2], bytes(row[3]), row[4],
                                                    datetime.fromisoformat(row[1])))
                for row in rows]

    def delete(self, ids: Sequence[int]) -> None:
        with self._lock:
            self._connection("delete dead letters").executemany(
                "DELETE FROM dead_letters WHERE id = ?", [(i,) for i in ids])

    def update_error(self, letter_id: int, error: str) -> None:
        with self._lock:
            self._connection("update a dead letter").execute(
                "UPDATE dead_letters SET error = ? WHERE id = ?", (error, letter_id))
