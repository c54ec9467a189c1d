"""Parquet partitions of the archive: ``{root}/raw_meter_readings/dt=YYYY-MM-DD/part-0.parquet``.

A day is written as a stream of row groups to a staging file outside the partition root, fsynced,
and moved into place with one atomic rename, so readers see the old day or the new day, never half
of one. The archiver publishes a day only after DuckDB's copy was built and verified.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from homeiot.core import table

TABLE = table.TABLE
PART_NAME = "part-0.parquet"
STAGING = ".staging"

_ARROW_TYPES: dict[table.Kind, pa.DataType] = {
    "timestamp": pa.timestamp("ms", tz="UTC"), "string": pa.string(), "int": pa.int64(),
    "float": pa.float64(), "date": pa.date32()}

#: The archive's columns (``dt`` is the hive partition, not a column in the files).
SCHEMA = pa.schema([pa.field(c.name, _ARROW_TYPES[c.kind], nullable=c.nullable)
                    for c in table.COLUMNS])
#: Rows per Parquet row group: DuckDB's row group size, so each INSERT hands DuckDB whole ones.
ROW_GROUP_ROWS = 122_880


@dataclass(frozen=True, slots=True)
class WrittenDay:
    day: date
    path: Path
    rows: int


def partition_dir(root: Path, day: date) -> Path:
    return root / TABLE / f"dt={day.isoformat()}"


#: Column types of InfluxDB's CSV for our measurement (``time`` and ``fixed_ts_ms`` in epoch
#: milliseconds).
CSV_TYPES = {"name": pa.string(), "tags": pa.string(),
             **{c.influx: pa.int64() if c.kind == "timestamp" else _ARROW_TYPES[c.kind]
                for c in table.COLUMNS}}


def from_csv_batch(batch: pa.RecordBatch) -> pa.RecordBatch:
    """A batch of InfluxDB CSV columns → a record batch in the archive schema."""
    names = batch.schema.names
    arrays = []
    for column, schema_field in zip(table.COLUMNS, SCHEMA, strict=True):
        if column.influx in names:
            array = batch.column(names.index(column.influx))
            if array.type != schema_field.type:
                # Epoch milliseconds (int64) are a timestamp[ms] already: a view, not a copy.
                array = (array.view(schema_field.type)
                         if pa.types.is_timestamp(schema_field.type) and array.type == pa.int64()
                         else array.cast(schema_field.type))
            arrays.append(array)
        else:
            arrays.append(pa.nulls(batch.num_rows, schema_field.type))
    return pa.RecordBatch.from_arrays(arrays, schema=SCHEMA)


def partition_rows(root: Path, day: date) -> int | None:
    """Rows in a day's published partition (from the Parquet footers); None when there is none."""
    directory = partition_dir(root, day)
    if not directory.is_dir():
        return None
    files = sorted(directory.glob("*.parquet"))
    if not files:
        return None
    return sum(int(pq.ParquetFile(f).metadata.num_rows) for f in files)


def read_day(root: Path, day: date, batch_rows: int = 10_000) -> Iterator[pa.RecordBatch]:
    """The published partition of ``day``, in batches (nothing when it does not exist)."""
    path = partition_dir(root, day) / PART_NAME
    if not path.exists():
        return
    with pq.ParquetFile(path) as handle:
        yield from handle.iter_batches(batch_size=batch_rows)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def stage_day(root: Path, day: date, batches: Iterable[pa.RecordBatch],
              on_row_group: Callable[[pa.Table], None] | None = None) -> tuple[Path, int]:
    """Stream ``batches`` into a fsynced staging file under ``{root}/.staging``; returns it and
    its row count. Memory stays at about one row group. ``on_row_group`` sees each row group
    as it is written (the archiver hands it to DuckDB)."""
    staging = root / STAGING
    staging.mkdir(parents=True, exist_ok=True)
    path = staging / f"{TABLE}-dt={day.isoformat()}-{uuid.uuid4().hex}.parquet"
    rows = 0
    pending: list[pa.RecordBatch] = []
    pending_rows = 0
    # Dictionary encoding only where values repeat (the source): on measured values it is work
    # that falls back to plain encoding anyway.
    with pq.ParquetWriter(path, SCHEMA, compression="zstd", use_dictionary=["source"]) as writer:
        for batch in batches:
            pending.append(batch)
            pending_rows += batch.num_rows
            if pending_rows >= ROW_GROUP_ROWS:
                group = pa.Table.from_batches(pending, SCHEMA)
                if on_row_group is not None:
                    on_row_group(group)
                writer.write_table(group)
                rows += pending_rows
                pending, pending_rows = [], 0
        if pending:
            group = pa.Table.from_batches(pending, SCHEMA)
            if on_row_group is not None:
                on_row_group(group)
            writer.write_table(group)
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
    fsync_dir(target_dir)
    fsync_dir(target_dir.parent)
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
