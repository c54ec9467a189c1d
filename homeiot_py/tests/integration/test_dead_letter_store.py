"""The dead-letter store (real SQLite files): one letter per message, and the schema migration."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

from homeiot.adapters.deadletters import SCHEMA_VERSION, DeadLetter, DeadLetterStore

T = datetime(2025, 12, 16, 15, 0, tzinfo=UTC)
TOPIC = "home/power/meter1"
PAYLOAD = b'{"v":1,"ts":"2025-12-16T15:00:00.000Z","seq":7,"power_w":1e9}'


def letter(payload: bytes = PAYLOAD, *, topic: str = TOPIC, error: str = "out of range",
           at: datetime = T) -> DeadLetter:
    return DeadLetter(topic, payload, error, at)


def test_a_resend_racing_its_receipt_adds_no_second_letter(tmp_path: Path) -> None:
    """The publisher resends seq 7 before the receipt naming its dead letter arrives: the gateway
    sets the copy aside again, in another batch (another transaction) — the store keeps one."""
    store = DeadLetterStore(tmp_path / "dead.db")
    try:
        assert store.add([letter()]) == 1
        assert store.add([letter(error="a later reason", at=T + timedelta(seconds=30))]) == 0
        assert store.add([letter(), letter()]) == 0  # twice in one batch, too
        assert store.count() == 1
        (kept,) = store.list()
        assert kept.letter == letter()  # the first copy, as it arrived
    finally:
        store.close()


def test_a_different_message_with_the_same_seq_is_kept(tmp_path: Path) -> None:
    """Identity is the message, not (source, seq): a replaced Pi numbers from 0 again, and its
    reading must not vanish behind an old letter with the same seq; another topic is another
    source."""
    other = PAYLOAD.replace(b"15:00:00.000Z", b"16:00:00.000Z")
    store = DeadLetterStore(tmp_path / "dead.db")
    try:
        assert store.add([letter(), letter(other), letter(topic="home/power/meter2")]) == 3
        assert store.count() == 3
    finally:
        store.close()


def test_a_store_of_schema_version_0_is_migrated_and_its_identical_letters_merged(
        tmp_path: Path) -> None:
    path = tmp_path / "dead.db"
    old = sqlite3.connect(path)
    old.execute("CREATE TABLE dead_letters (id INTEGER PRIMARY KEY AUTOINCREMENT, "
                "received_at TEXT NOT NULL, topic TEXT NOT NULL, payload BLOB NOT NULL, "
                "error TEXT NOT NULL)")
    rows = [(T.isoformat(), TOPIC, PAYLOAD, "first"), (T.isoformat(), TOPIC, b"other", "x"),
            ((T + timedelta(seconds=30)).isoformat(), TOPIC, PAYLOAD, "resent")]
    old.executemany("INSERT INTO dead_letters (received_at, topic, payload, error) "
                    "VALUES (?,?,?,?)", rows)
    old.commit()
    old.close()

    store = DeadLetterStore(path)
    try:
        assert [(s.id, s.letter.payload, s.letter.error) for s in store.list()] == [
            (1, PAYLOAD, "first"), (2, b"other", "x")]
        assert store.add([letter()]) == 0
        assert store.add([letter(b"new")]) == 1
    finally:
        store.close()
    check = sqlite3.connect(path)
    try:
        assert check.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
    finally:
        check.close()
    DeadLetterStore(path).close()  # opening a current store again changes nothing
