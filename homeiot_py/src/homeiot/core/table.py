"""The archive's one table definition: ``raw_meter_readings``.

The Parquet schema, the DuckDB DDL, the verification statistics, the reconciliation counts and
the API's reading model are all derived from :data:`COLUMNS`; nothing else lists the columns.
Pure: no I/O, no third-party types (the adapters map :attr:`Column.kind` to theirs).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

TABLE = "raw_meter_readings"
#: The table recording which days are archived and with how many rows.
DAYS_TABLE = "archive_days"

Kind = Literal["timestamp", "string", "int", "float", "date"]


@dataclass(frozen=True, slots=True)
class Column:
    """One column. ``influx`` is its name in InfluxDB: ``time``, the ``source`` tag, or a field
    (``fixed_ts`` is stored as the integer field ``fixed_ts_ms``)."""

    name: str
    kind: Kind
    nullable: bool
    influx: str
    doc: str

    @property
    def is_field(self) -> bool:
        """An InfluxDB field (not the time, not a tag): counted per field by reconciliation."""
        return self.influx not in ("time", "source")


#: The columns of every Parquet file, in order. ``dt`` (:data:`PARTITION`) is the hive partition.
COLUMNS: tuple[Column, ...] = (
    Column("ts", "timestamp", False, "time", "the reading's time"),
    Column("source", "string", False, "source", "the meter"),
    Column("seq", "int", True, "seq", "the publisher's sequence number"),
    Column("power_w", "float", True, "power_w", "W"),
    Column("current_r_a", "float", True, "current_r_a", "A"),
    Column("current_t_a", "float", True, "current_t_a", "A"),
    Column("energy_normal_kwh", "float", True, "energy_normal_kwh", "cumulative kWh"),
    Column("energy_reverse_kwh", "float", True, "energy_reverse_kwh", "cumulative kWh"),
    Column("fixed_ts", "timestamp", True, "fixed_ts_ms",
           "time of the 30-minute fixed-time energy"),
    Column("fixed_energy_normal_kwh", "float", True, "fixed_energy_normal_kwh", "kWh"),
)
#: The local day: a column of the DuckDB table, the ``dt=`` directory of the Parquet partitions.
PARTITION = Column("dt", "date", False, "", "the local day (also the Parquet partition dt=)")

COLUMN_NAMES: tuple[str, ...] = tuple(c.name for c in COLUMNS)
#: Columns summed by verification (numbers).
NUMERIC: tuple[Column, ...] = tuple(c for c in COLUMNS if c.kind in ("int", "float"))
#: InfluxDB fields, counted per day by reconciliation.
FIELDS: tuple[Column, ...] = tuple(c for c in COLUMNS if c.is_field)
#: The measured values a reading carries besides its time and source (the API's reading model).
VALUES: tuple[Column, ...] = tuple(c for c in FIELDS if c.kind in ("int", "float"))

_SQL_TYPES: dict[Kind, str] = {"timestamp": "TIMESTAMPTZ", "string": "VARCHAR", "int": "BIGINT",
                               "float": "DOUBLE", "date": "DATE"}


def sql_type(column: Column) -> str:
    """The column's SQL (DuckDB) type."""
    return _SQL_TYPES[column.kind]


def create_table_sql() -> str:
    """``CREATE TABLE IF NOT EXISTS`` for the table and :data:`DAYS_TABLE`."""
    lines = [f"    {c.name} {sql_type(c)}{'' if c.nullable else ' NOT NULL'}"
             for c in (*COLUMNS, PARTITION)]
    return (f"CREATE TABLE IF NOT EXISTS {TABLE} (\n" + ",\n".join(lines) + "\n);\n"
            f"CREATE TABLE IF NOT EXISTS {DAYS_TABLE} (\n"
            "    dt          DATE PRIMARY KEY,\n"
            "    row_count   BIGINT      NOT NULL,\n"
            "    archived_at TIMESTAMPTZ NOT NULL\n);\n")


def stats_expressions() -> list[str]:
    """SQL aggregates over one day touching every column (verification compares them between the
    Parquet source and the built database): row count, per-column non-null counts, sums of
    numbers, min/max of times and strings."""
    parts = ["count(*) AS rows"]
    for c in COLUMNS:
        if c.kind == "timestamp":
            parts += [f"count({c.name}) AS n_{c.name}", f"epoch_ms(min({c.name})) AS min_{c.name}",
                      f"epoch_ms(max({c.name})) AS max_{c.name}"]
        elif c.kind == "string":
            parts += [f"count(DISTINCT {c.name}) AS distinct_{c.name}",
                      f"min({c.name}) AS min_{c.name}", f"max({c.name}) AS max_{c.name}"]
        else:
            parts += [f"count({c.name}) AS n_{c.name}", f"sum({c.name})::DOUBLE AS sum_{c.name}"]
    return parts


def field_count_expressions() -> list[str]:
    """``count(column) AS column`` per InfluxDB field: what reconciliation compares with
    InfluxDB's ``count(field)`` over the same day."""
    return [f"count({c.name}) AS {c.name}" for c in FIELDS]
