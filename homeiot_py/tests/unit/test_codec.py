from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from datetime import UTC, datetime
from typing import Any

import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from homeiot.core import codec
from homeiot.core.errors import PayloadError
from homeiot.core.reading import Reading

TS = datetime(2025, 12, 16, 15, 0, 0, 250000, tzinfo=UTC)
FULL = Reading("meter1", TS, 42, 532.0, current_r_a=3.1, current_t_a=2.0,
               energy_normal_kwh=12345.6, energy_reverse_kwh=0.0, fixed_ts=TS,
               fixed_energy_normal_kwh=12345.5)
SCHEMA = codec.load_schema()


def test_encodes_compact_json_with_absent_keys_left_out() -> None:
    payload = codec.encode(Reading("meter1", TS, 1, 500.0))
    assert payload == b'{"v":1,"ts":"2025-12-16T15:00:00.250Z","seq":1,"power_w":500.0}'


def test_round_trip_full() -> None:
    assert codec.decode(codec.encode(FULL), "meter1") == FULL


def test_source_comes_from_the_caller_not_the_payload() -> None:
    assert codec.decode(codec.encode(FULL), "meter2").source == "meter2"


def test_encoded_payloads_match_the_published_schema() -> None:
    jsonschema.validate(json.loads(codec.encode(FULL)), SCHEMA)
    jsonschema.validate(json.loads(codec.encode(Reading("m", TS, 0, -5.0))), SCHEMA)


def test_accepts_integers_for_numbers_and_short_fractions() -> None:
    reading = codec.decode(b'{"v":1,"ts":"2025-12-16T15:00:00Z","seq":3,"power_w":7}', "m")
    assert reading.power_w == 7.0
    assert reading.ts == datetime(2025, 12, 16, 15, tzinfo=UTC)


BAD: list[tuple[bytes, str]] = [
    (b"", "not valid UTF-8 JSON"),
    (b"\xff\xfe", "not valid UTF-8 JSON"),
    (b"[1]", "must be a JSON object"),
    (b"[" * 3000 + b"]" * 3000, "bytes, more than"),
    (b"[" * 2000 + b"]" * 2000, "not valid UTF-8 JSON"),
    (b'{"v":1,"ts":"2025-12-16T15:00:00Z","seq":1}', "power_w: is required"),
    (b'{"v":1,"ts":"2025-12-16T15:00:00Z","seq":1,"power_w":1,"source":"x"}', "unknown key"),
    (b'{"v":2,"ts":"2025-12-16T15:00:00Z","seq":1,"power_w":1}', "unsupported schema version"),
    (b'{"v":true,"ts":"2025-12-16T15:00:00Z","seq":1,"power_w":1}', "unsupported schema"),
    (b'{"v":1,"ts":"2025-12-16 15:00:00","seq":1,"power_w":1}', "ts: must be a UTC timestamp"),
    (b'{"v":1,"ts":"2025-12-16T15:00:00+09:00","seq":1,"power_w":1}', "ts: must be a UTC"),
    (b'{"v":1,"ts":"2025-02-30T15:00:00Z","seq":1,"power_w":1}', "not a real date"),
    (b'{"v":1,"ts":"1990-02-03T15:00:00Z","seq":1,"power_w":1}', "outside 2000..2199"),
    (b'{"v":1,"ts":"2025-12-16T15:00:00Z","seq":"1","power_w":1}', "seq: must be an integer"),
    (b'{"v":1,"ts":"2025-12-16T15:00:00Z","seq":-1,"power_w":1}', "seq"),
    (b'{"v":1,"ts":"2025-12-16T15:00:00Z","seq":1,"power_w":"1"}', "power_w: must be a number"),
    (b'{"v":1,"ts":"2025-12-16T15:00:00Z","seq":1,"power_w":true}', "power_w: must be a number"),
    (b'{"v":1,"ts":"2025-12-16T15:00:00Z","seq":1,"power_w":NaN}', "NaN is not a number"),
    (b'{"v":1,"ts":"2025-12-16T15:00:00Z","seq":1,"power_w":-Infinity}', "Infinity is not"),
    (b'{"v":1,"ts":"2025-12-16T15:00:00Z","seq":1,"power_w":1e999}', "must be finite"),
    (b'{"v":1,"ts":"2025-12-16T15:00:00Z","seq":1,"power_w":5e6}', "plausible range"),
    (b'{"v":1,"ts":"2025-12-16T15:00:00Z","seq":1,"power_w":1' + b"0" * 400 + b"}", "plausible range"),
    (b'{"v":1,"ts":"2025-12-16T15:00:00Z","seq":1' + b"0" * 30 + b',"power_w":1}', "seq"),
    (b'{"v":1,"ts":"2025-12-16T15:00:00Z","seq":1,"power_w":1,"current_t_a":null}', "null"),
    (b'{"v":1,"ts":"2025-12-16T15:00:00Z","seq":1,"power_w":1,"power_w":2}', "duplicate key"),
    (b'{"v":1,"ts":"2025-12-16T15:00:00Z","seq":1,"power_w":1,"fixed_ts":"2025-12-16T15:00:00Z"}',
     "together"),
]


@pytest.mark.parametrize(("payload", "message"), BAD)
def test_rejects_bad_payloads_naming_the_problem(payload: bytes, message: str) -> None:
    with pytest.raises(PayloadError) as info:
        codec.decode(payload, "meter1")
    assert message in str(info.value)


@pytest.mark.parametrize(("payload", "message"), BAD)
def test_schema_agrees_with_the_codec_on_bad_payloads(payload: bytes, message: str) -> None:
    """Every payload the codec refuses that is JSON at all, the schema refuses too (or it is a
    rule the schema cannot express: duplicates, year range, real calendar dates)."""
    try:
        obj = json.loads(payload, parse_constant=_not_json)
    except (ValueError, RecursionError):
        return  # not JSON at all (Python's json would accept NaN/Infinity; JSON does not)
    if message in ("duplicate key", "outside 2000..2199", "not a real date", "must be finite"):
        return
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(obj, SCHEMA)


def _not_json(name: str) -> None:
    raise ValueError(name)


finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False)
energy = st.floats(min_value=0, max_value=1e12, allow_nan=False)
stamps = st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2199, 12, 31),
                      timezones=st.just(UTC))


@settings(max_examples=300)
@given(ts=stamps, seq=st.integers(0, 2**63 - 1), power=finite,
       current=st.none() | st.floats(-1e4, 1e4), e1=st.none() | energy, e2=st.none() | energy)
def test_round_trip_property(ts: datetime, seq: int, power: float, current: float | None,
                             e1: float | None, e2: float | None) -> None:
    reading = Reading("m-1", ts, seq, power, current_r_a=current, energy_normal_kwh=e1,
                      energy_reverse_kwh=e2)
    payload = codec.encode(reading)
    assert codec.decode(payload, "m-1") == reading
    jsonschema.validate(json.loads(payload), SCHEMA)


@settings(max_examples=300)
@given(st.binary(max_size=300) | st.text(max_size=200).map(str.encode))
def test_arbitrary_bytes_raise_only_payload_error(data: bytes) -> None:
    with contextlib.suppress(PayloadError):
        codec.decode(data, "m")


json_values: Any = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner,
                                                                 max_size=4),
    max_leaves=10,
)


@settings(max_examples=300)
@given(st.dictionaries(st.sampled_from(["v", "ts", "seq", "power_w", "current_r_a", "fixed_ts",
                                        "energy_normal_kwh", "x"]), json_values))
def test_structured_garbage_raises_only_payload_error(obj: dict[str, Any]) -> None:
    try:
        reading = codec.decode(json.dumps(obj).encode(), "m")
    except PayloadError:
        return
    jsonschema.validate(obj, SCHEMA)  # whatever the codec accepts, the schema accepts
    assert reading.source == "m"


def _outcome(payload: bytes, load: Any) -> Reading | str:
    """What decoding ``payload`` gives when its JSON is read by ``load``: the reading or the
    refusal's message."""
    try:
        if len(payload) > codec.MAX_PAYLOAD_BYTES:
            return codec.decode(payload, "m")
        return codec._reading(load(payload), "m")
    except PayloadError as exc:
        return str(exc)


def _decoded(payload: bytes) -> Reading | str:
    try:
        return codec.decode(payload, "m")
    except PayloadError as exc:
        return str(exc)


def _pairs_payload(pairs: list[tuple[str, Any]], compact: bool) -> bytes:
    """A JSON object from ``pairs`` as written, duplicate keys included."""
    separators = (",", ":") if compact else (", ", ": ")
    body = separators[0].join(json.dumps(key) + separators[1] + json.dumps(value)
                              for key, value in pairs)
    return ("{" + body + "}").encode()


keys = st.sampled_from(["v", "ts", "seq", "power_w", "current_r_a", "fixed_ts",
                        "fixed_energy_normal_kwh", "energy_normal_kwh", "x", 'q"', "é"])
values = st.one_of(
    st.just(1), st.integers(), st.integers(2**63, 2**80), st.floats(), st.booleans(), st.none(),
    st.sampled_from(["2025-12-16T15:00:00.250Z", "2025-12-16T15:00:00Z", 'a":b', "\x01"]),
    st.text(max_size=8), json_values)


@settings(max_examples=500)
@given(st.lists(st.tuples(keys, values), max_size=9), st.booleans())
def test_plain_payload_path_agrees_with_the_checked_decoder(pairs: list[tuple[str, Any]],
                                                            compact: bool) -> None:
    """The orjson path for plain payloads gives what the checked decoder gives — the same
    reading, or the same refusal — for duplicate keys, huge integers, nested values, escapes."""
    base = [("v", 1), ("ts", "2025-12-16T15:00:00.250Z"), ("seq", 7), ("power_w", 5.0)]
    for payload in (_pairs_payload(pairs, compact), _pairs_payload(base + pairs, compact)):
        assert _decoded(payload) == _outcome(payload, codec._load_checked)


def test_plain_payload_path_refuses_a_duplicate_key_like_the_checked_decoder() -> None:
    payload = b'{"v":1,"ts":"2025-12-16T15:00:00.250Z","seq":7,"seq":8,"power_w":5.0}'
    assert codec.plain_object(payload) is None
    with pytest.raises(PayloadError, match="duplicate key"):
        codec.decode(payload, "m")


def test_plain_payloads_take_the_plain_path() -> None:
    assert codec.plain_object(codec.encode(FULL)) is not None


def test_the_pi_needs_no_server_extra() -> None:
    """The Pi installs homeiot without the [server] extra (no orjson, FastAPI, pyarrow, ...): its
    entry point imports, and the codec decodes with the checked decoder alone."""
    code = (
        "import sys\n"
        "for name in ('orjson', 'httpx', 'fastapi', 'uvicorn', 'pyarrow', 'duckdb',\n"
        "             'prometheus_client'):\n"
        "    sys.modules[name] = None  # import fails as if not installed\n"
        "import homeiot.cli.publisher\n"
        "from homeiot.core import codec\n"
        "r = codec.decode(b'{\"v\":1,\"ts\":\"2026-01-01T00:00:00Z\",\"seq\":7,\"power_w\":5}', 'm')\n"
        "assert (r.seq, r.power_w) == (7, 5.0), r\n"
        "print('ok')\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "ok"
