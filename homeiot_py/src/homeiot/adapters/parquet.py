"""Parquet partitions of the archive: ``{root}/raw_meter_readings/dt=YYYY-MM-DD/part-0.parquet``.

A day is written as a stream of row groups to a staging file outside the partition root, fsynced,
and moved into place with one atomic rename, so readers see the old day or the new day, never half
of one. Re-running a day replaces it.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

TABLE = "raw_meter_readings"
PART_NAME = "part-0.parquet"
STAGING = ".staging"

#: The archive's columns (``dt`` is the hive partition, not a column in the files).
SCHEMA = pa.schema([
    pa.field("ts", pa.timestamp("ms", tz="UTC"), nullable=False),
    pa.field("source", pa.string(), nullable=False),
    pa.field("seq", pa.int64()),
    pa.field("power_w", pa.float64()),
    pa.field("current_r_a", pa.float64()),
    pa.field("current_t_a", pa.float64()),
    pa.field("energy_normal_kwh", pa.float64()),
    pa.field("energy_reverse_kwh", pa.float64()),
    pa.field("fixed_ts", pa.timestamp("ms", tz="UTC")),
    pa.field("fixed_energy_normal_kwh", pa.float64()),
])
ROW_GROUP_ROWS = 131_072


@dataclass(frozen=True, slots=True)
class WrittenDay:
    day: date
    path: Path
    rows: int


def partition_dir(root: Path, day: date) -> Path:
    return root / TABLE / f"dt={day.isoformat()}"


#: Column types of InfluxDB's CSV for our measurement (``time`` in epoch milliseconds).
CSV_TYPES = {"name": pa.string(), "tags": pa.string(), "time": pa.int64(), "source": pa.string(),
             "seq": pa.int64(), "fixed_ts_ms": pa.int64(),
             **{f.name: pa.float64() for f in SCHEMA if f.type == pa.float64()}}


def from_csv_batch(batch: pa.RecordBatch) -> pa.RecordBatch:
    """A batch of InfluxDB CSV columns → a record batch in the archive schema."""
    names = batch.schema.names
    arrays = []
    for schema_field in SCHEMA:
        source = {"ts": "time", "fixed_ts": "fixed_ts_ms"}.get(schema_field.name, schema_field.name)
        if source in names:
            column = batch.column(names.index(source))
            if pa.types.is_timestamp(schema_field.type):
                column = column.cast(pa.int64()).cast(schema_field.type)
            arrays.append(column.cast(schema_field.type))
        else:
            arrays.append(pa.nulls(batch.num_rows, schema_field.type))
    return pa.RecordBatch.from_arrays(arrays, schema=SCHEMA)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def stage_day(root: Path, day: date, batches: Iterable[pa.RecordBatch]) -> tuple[Path, int]:
    """Stream ``batches`` into a fsynced staging file under ``{root}/.staging``; returns it and
    its row count. Memory stays at about one row group."""
    staging = root / STAGING
    staging.mkdir(parents=True, exist_ok=True)
    path = staging / f"{TABLE}-dt={day.isoformat()}-{uuid.uuid4().hex}.parquet"
    rows = 0
    pending: list[pa.RecordBatch] = []
    pending_rows = 0
    with pq.ParquetWriter(path, SCHEMA, compression="zstd") as writer:
        for batch in batches:
            pending.append(batch)
            pending_rows += batch.num_rows
            if pending_rows >= ROW_GROUP_ROWS:
                writer.write_table(pa.Table.from_batches(pending, SCHEMA))
                rows += pending_rows
                pending, pending_rows = [], 0
        if pending:
            writer.write_table(pa.Table.from_batches(pending, SCHEMA))
            rows += pending_rows
    with path.open("rb+") as handle:
        os.fsync(handle.fileno())
    return path, rows


def publish_day(root: Path, day: date, staged: Path, rows: int) -> WrittenDay:
    """Move a staged file into its partition atomically (replacing the day) and sync the dirs."""
    target_dir = partition_dir(root, day)
    target_dir.mkdir(parents=True, exist_ok=True)
    target = target_dir / PART_NAME
    os.replace(staged, target)
    for other in target_dir.iterdir():  # files of an older layout would double the day
        if other.name != PART_NAME:
            other.unlink()
    _fsync_dir(target_dir)
    _fsync_dir(target_dir.parent)
    return WrittenDay(day, target, rows)


def clean_staging(root: Path) -> int:
    """Remove staging files a killed run left behind; returns how many."""
    staging = root / STAGING
    removed = 0
    if staging.is_dir():
        for leftover in staging.iterdir():
            leftover.unlink()
            removed += 1
    return removed
