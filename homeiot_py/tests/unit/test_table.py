"""The archive's one table definition and what is derived from it."""

from __future__ import annotations

import duckdb

from homeiot.adapters import parquet
from homeiot.core import table
from homeiot.core.reading import FLOAT_FIELDS, Reading


def test_the_columns_are_the_readings_fields_plus_the_day() -> None:
    assert sorted(table.COLUMN_NAMES) == sorted(Reading.__dataclass_fields__)
    assert [c.influx for c in table.FIELDS] == ["seq", *FLOAT_FIELDS[:5], "fixed_ts_ms",
                                                FLOAT_FIELDS[5]]
    assert table.PARTITION.name == "dt"


def test_the_duckdb_table_and_the_parquet_schema_follow_the_definition() -> None:
    con = duckdb.connect()
    con.execute(table.create_table_sql())
    columns = con.execute("SELECT column_name, data_type, is_nullable FROM "
                          "information_schema.columns WHERE table_name = ? ORDER BY "
                          "ordinal_position", [table.TABLE]).fetchall()
    con.close()
    assert [c[0] for c in columns] == [*table.COLUMN_NAMES, "dt"]
    assert {c[0]: c[1] for c in columns}["ts"] == "TIMESTAMP WITH TIME ZONE"
    assert {c[0] for c in columns if c[2] == "NO"} == {"ts", "source", "dt"}
    assert parquet.SCHEMA.names == list(table.COLUMN_NAMES)
    assert [f.nullable for f in parquet.SCHEMA] == [c.nullable for c in table.COLUMNS]
    assert set(parquet.CSV_TYPES) == {"name", "tags", *(c.influx for c in table.COLUMNS)}


def test_the_statistics_touch_every_column() -> None:
    text = " ".join(table.stats_expressions())
    assert all(f"({name})" in text for name in table.COLUMN_NAMES)


def test_the_apis_reading_model_is_derived() -> None:
    from homeiot.services.api import ReadingOut  # noqa: PLC0415

    assert list(ReadingOut.model_fields) == ["time", "source", *(c.name for c in table.VALUES)]
    assert "fixed_ts" not in ReadingOut.model_fields  # the API reports values, not the meter's
