"""The InfluxDB adapter against a real influxd (Debian's 1.6.7) over the v1 HTTP API."""

from __future__ import annotations

import tracemalloc
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime

import pytest

from homeiot.adapters.influx import InfluxClient, auth_headers, parse_write_error
from homeiot.config import InfluxSettings
from homeiot.core.errors import (
    EncodingError,
    InfluxAuthError,
    InfluxPartialWriteError,
    InfluxQueryError,
    InfluxUnavailableError,
)
from homeiot.core.lineprotocol import encode_line, encode_reading
from homeiot.core.reading import Reading
from tests.services import CuttingRelay, Influxd, free_port, start_influxd

pytestmark = pytest.mark.integration

T0 = 1_765_897_200_000  # 2025-12-16T15:00:00Z in ms


@pytest.fixture
def client(influx_db: InfluxSettings) -> Iterator[InfluxClient]:
    with InfluxClient(influx_db) as influx:
        yield influx


def test_ping_reports_the_version(client: InfluxClient) -> None:
    assert client.ping().startswith("1.")


TRICKY_TAGS = ["plain", "with space", "com,ma", "eq=uals", 'quo"te', "back\\slash", "東京 電力",
               "a=b,c d", "emoji 🔌", "trailing-dash-"]
TRICKY_STRINGS = ['say "hi"', "back\\slash", "ends with \\", "\\\\double", "東京", "a,b=c d", ""]


def test_line_protocol_round_trips_exactly(client: InfluxClient) -> None:
    lines = [
        encode_line("tricky m,x", {"tag key=,": tag}, {"s": TRICKY_STRINGS[i % len(TRICKY_STRINGS)],
                                                         "f k": i + 0.5, "n": i, "b": i % 2 == 0},
                    T0 + i)
        for i, tag in enumerate(TRICKY_TAGS)
    ]
    client.write(lines)
    rows = list(client.rows('SELECT * FROM "tricky m,x" GROUP BY *'))
    assert len(rows) == len(TRICKY_TAGS)
    by_time = {row["time"]: row for row in rows}
    for i, tag in enumerate(TRICKY_TAGS):
        row = by_time[T0 + i]
        assert row["tag key=,"] == tag
        assert row["s"] == TRICKY_STRINGS[i % len(TRICKY_STRINGS)]
        assert row["f k"] == i + 0.5
        assert row["n"] == i
        assert row["b"] is (i % 2 == 0)


def test_readings_are_stored_by_source_and_time_and_replays_overwrite(client: InfluxClient) -> None:
    ts = datetime(2025, 12, 16, 15, 0, 0, 123000, tzinfo=UTC)
    reading = Reading("meter1", ts, 9, 432.0, current_r_a=2.5, energy_normal_kwh=100.25)
    client.write([encode_reading(reading)])
    client.write([encode_reading(reading)])  # a replayed reading
    rows = list(client.rows('SELECT * FROM "meter_readings"'))
    assert rows == [{"time": T0 + 123, "source": "meter1", "seq": 9, "power_w": 432.0,
                     "current_r_a": 2.5, "energy_normal_kwh": 100.25}]


def test_nan_and_inf_never_reach_the_server() -> None:
    for value in (float("nan"), float("inf"), float("-inf")):
        with pytest.raises(EncodingError, match="not finite"):
            encode_line("m", {}, {"f": value}, T0)


def test_a_partial_write_names_the_offending_lines(client: InfluxClient) -> None:
    good = "m,source=a v=1.5 1"
    bad1, bad2 = "m,source=a v=xx 2", "m no_fields_here 3"
    with pytest.raises(InfluxPartialWriteError) as info:
        client.write([good, bad1, bad2, "m,source=a v=3.5 4"])
    assert info.value.lines == (bad1, bad2)
    assert info.value.dropped == 0
    assert [row["v"] for row in client.rows("SELECT v FROM m")] == [1.5, 3.5]


def test_a_type_conflict_is_a_partial_write_without_lines(client: InfluxClient) -> None:
    client.write(["m v=1.5 1"])
    with pytest.raises(InfluxPartialWriteError, match="field type conflict") as info:
        client.write(["m v=2i 2"])
    assert info.value.dropped == 1
    assert info.value.lines == ()


def test_parse_write_error_handles_quotes_in_lines() -> None:
    text = ("partial write: unable to parse 'm s=\"it's\": x' 5': invalid field format\n"
            "unable to parse 'm a': missing fields dropped=0")
    assert parse_write_error(text) == (["m s=\"it's\": x' 5", "m a"], 0)


def test_query_errors(client: InfluxClient, influxd: Influxd) -> None:
    with pytest.raises(InfluxQueryError, match="error parsing query"):
        list(client.rows("SELEC nothing"))
    missing = InfluxClient(InfluxSettings(url=influxd.url, database="no_such_db"))
    with pytest.raises(InfluxQueryError, match="database not found"):
        list(missing.rows("SELECT * FROM m"))
    missing.close()


def test_bound_parameters_keep_values_out_of_the_statement(client: InfluxClient) -> None:
    client.write(["m,source=a v=1.0 1", "m,source=b v=2.0 2"])
    hostile = "a' OR source='b"
    assert list(client.rows("SELECT v FROM m WHERE source = $s", params={"s": hostile})) == []
    assert [r["v"] for r in client.rows("SELECT v FROM m WHERE source = $s",
                                        params={"s": "b"})] == [2.0]


def test_an_unreachable_server_is_transient() -> None:
    settings = InfluxSettings(url=f"http://127.0.0.1:{free_port()}", database="x", timeout_s=2)
    with InfluxClient(settings) as influx:
        with pytest.raises(InfluxUnavailableError,
                           match=r"the connection to InfluxDB at 127\.0\.0\.1:\d+ was refused"):
            influx.ping()
        with pytest.raises(InfluxUnavailableError):
            influx.write(["m v=1 1"])
        with pytest.raises(InfluxUnavailableError):
            list(influx.rows("SELECT * FROM m"))


def test_chunked_query_streams_with_flat_memory(client: InfluxClient) -> None:
    total = 100_000
    lines = [f"big,source=s{i % 4} power_w={i}.25,seq={i}i {T0 + i}" for i in range(total)]
    client.write(lines)
    del lines

    def peak_while_streaming(limit: int) -> tuple[int, int, int]:
        tracemalloc.start()
        count, seq_sum = 0, 0
        for row in client.rows(f"SELECT power_w, seq FROM big LIMIT {limit}", chunk_size=2000):
            count += 1
            seq_sum += row["seq"]
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return count, seq_sum, peak

    count_small, _, peak_small = peak_while_streaming(20_000)
    count, seq_sum, peak = peak_while_streaming(total)
    assert count_small == 20_000
    assert count == total
    assert seq_sum == total * (total - 1) // 2  # every point came back, once

    tracemalloc.start()
    held = list(client.rows("SELECT power_w, seq FROM big", chunk_size=2000))
    held_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(held) == total
    del held
    print(f"chunked query: peak {peak / 1e6:.2f} MB for {total} rows, {peak_small / 1e6:.2f} MB "
          f"for 20000 rows, {held_peak / 1e6:.2f} MB when the rows are held")
    # Flat: five times the rows costs (almost) no more memory, and far less than holding them.
    assert peak < peak_small * 1.5 + 256_000
    assert peak < held_peak / 5


def test_user_password_auth(tmp_path_factory: pytest.TempPathFactory) -> None:
    server = start_influxd(tmp_path_factory.mktemp("influxd-auth"), auth_enabled=True)
    try:
        server.admin("CREATE USER admin WITH PASSWORD 'adm-pw' WITH ALL PRIVILEGES")
        server.admin("CREATE DATABASE secured", auth=("admin", "adm-pw"))
        base = InfluxSettings(url=server.url, database="secured")
        with InfluxClient(base) as anonymous, pytest.raises(InfluxAuthError, match="credentials"):
            anonymous.write(["m v=1 1"])
        wrong = replace(base, auth="password", username="admin", password="nope")
        with InfluxClient(wrong) as bad, pytest.raises(InfluxAuthError):
            list(bad.rows("SELECT * FROM m"))
        good = replace(base, auth="password", username="admin", password="adm-pw")
        with InfluxClient(good) as influx:
            influx.write(["m v=1.5 1"])
            assert [r["v"] for r in influx.rows("SELECT v FROM m")] == [1.5]
            # The CSV export has its own connection (http.client): the same credentials.
            with influx.query_csv("SELECT v FROM m") as stream:
                assert b"1.5" in stream.read()
    finally:
        server.process.stop()


def test_token_auth_header() -> None:
    """InfluxDB 1.6 has no tokens, so only the header we send to 2.x/3 is checked here."""
    settings = InfluxSettings(url="http://influxdb:8086", database="homeiot", auth="token",
                              token="tok-123")
    assert auth_headers(settings)["Authorization"] == "Token tok-123"
    assert "Authorization" not in auth_headers(replace(settings, auth="none", token=None))


def test_csv_stream_carries_the_same_rows_as_json(client: InfluxClient, influxd: Influxd) -> None:
    import pyarrow.csv as pa_csv  # noqa: PLC0415

    client.write([f"m,source=s{i % 3} v={i}.5,n={i}i {T0 + i}" for i in range(2500)])
    statement = "SELECT * FROM m"
    with client.query_csv(statement, chunk_size=1000) as stream:
        table = pa_csv.read_csv(stream)
    assert table.column_names == ["name", "tags", "time", "n", "source", "v"]
    json_rows = list(client.rows(statement))
    assert table.column("time").to_pylist() == [r["time"] for r in json_rows]
    assert table.column("v").to_pylist() == [r["v"] for r in json_rows]
    assert table.column("source").to_pylist() == [r["source"] for r in json_rows]
    # InfluxDB answers a missing database with an empty CSV body; the client does not accept that.
    missing = InfluxClient(InfluxSettings(url=influxd.url, database="no_such_db"))
    with pytest.raises(InfluxQueryError, match="database not found"), \
            missing.query_csv(statement):
        pass
    missing.close()
    with pytest.raises(InfluxQueryError, match="error parsing query"), \
            client.query_csv("SELEC x"):
        pass


def test_a_csv_answer_that_breaks_off_is_an_error_not_a_short_result(
        client: InfluxClient, influx_db: InfluxSettings) -> None:
    """The CSV stream's connection closes mid-answer: the reader gets InfluxUnavailableError (a
    retry), never a shorter table that would look like a complete day."""
    import pyarrow.csv as pa_csv  # noqa: PLC0415

    client.write([f"m,source=s{i % 3} v={i}.5,n={i}i {T0 + i}" for i in range(30_000)])
    port = int(influx_db.url.rsplit(":", 1)[1])
    relay = CuttingRelay(port, 300_000)
    try:
        with InfluxClient(replace(influx_db, url=f"http://127.0.0.1:{relay.port}")) as cut, \
                pytest.raises(InfluxUnavailableError, match="during a query"), \
                cut.query_csv("SELECT * FROM m", chunk_size=1000) as stream:
            pa_csv.read_csv(stream)
        assert relay.cut >= 1
    finally:
        relay.close()
    with client.query_csv("SELECT * FROM m", chunk_size=1000) as stream:  # the control
        assert pa_csv.read_csv(stream).num_rows == 30_000


def test_a_csv_export_refused_before_its_answer_is_an_error(client: InfluxClient,
                                                              influx_db: InfluxSettings) -> None:
    """The database check passes (first connection), then the CSV connection closes before any
    answer: InfluxUnavailableError naming the server."""
    client.write([f"m v=1 {T0}"])
    port = int(influx_db.url.rsplit(":", 1)[1])
    relay = CuttingRelay(port, 1 << 30, 0)
    try:
        with InfluxClient(replace(influx_db, url=f"http://127.0.0.1:{relay.port}")) as cut, \
                pytest.raises(InfluxUnavailableError, match="cannot reach"), \
                cut.query_csv("SELECT * FROM m"):
            pass
        assert relay.cut == 1
    finally:
        relay.close()
