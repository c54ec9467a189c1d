"""The MQTT payload codec, schema version 1: the only place where wire JSON meets :class:`Reading`.

A payload is a compact JSON object (see ``schema/reading-v1.schema.json``)::

    {"v":1,"ts":"2025-12-16T15:00:00.000Z","seq":42,"power_w":532.0,"energy_normal_kwh":12345.6}

The source is not in the payload: it is the last topic level, which the broker's ACL ties to the
publisher's identity, so a payload cannot claim another meter.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from importlib import resources
from typing import Any

try:  # the server's extra (the gateway's hot path); the Pi's publisher has only the checked decoder
    import orjson
except ImportError:  # pragma: no cover - exercised by test_codec in a subprocess without orjson
    orjson = None  # type: ignore[assignment]

from homeiot.core.errors import InvalidDataError, PayloadError
from homeiot.core.reading import FLOAT_FIELDS, MAX_SEQ, Reading

SCHEMA_VERSION = 1
#: Payloads larger than this are rejected before parsing (a reading is ~300 bytes).
MAX_PAYLOAD_BYTES = 4096

_TS_PATTERN = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,3})?Z")
_REQUIRED = frozenset({"v", "ts", "seq"})  # power_w too, unless a half-hour slot (Reading checks)
_ALLOWED = _REQUIRED | frozenset(FLOAT_FIELDS) | {"fixed_ts"}


def load_schema() -> dict[str, Any]:
    """The published JSON Schema of payload version 1."""
    text = resources.files("homeiot.core").joinpath("schema/reading-v1.schema.json").read_text(
        encoding="utf-8"
    )
    schema: dict[str, Any] = json.loads(text)
    return schema


def format_ts(ts: datetime) -> str:
    """Format a UTC datetime as the wire timestamp, e.g. ``2025-12-16T15:00:00.000Z``."""
    return ts.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ts.microsecond // 1000:03d}Z"


def encode(reading: Reading) -> bytes:
    """Serialise a reading to its schema-v1 payload. Absent values are absent keys."""
    obj: dict[str, object] = {"v": SCHEMA_VERSION, "ts": format_ts(reading.ts), "seq": reading.seq}
    for name in FLOAT_FIELDS:
        value = getattr(reading, name)
        if value is not None:
            obj[name] = value
    if reading.fixed_ts is not None:
        obj["fixed_ts"] = format_ts(reading.fixed_ts)
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode("ascii")


def decode(payload: bytes, source: str) -> Reading:
    """Parse a schema-v1 payload received for ``source``.

    Raises :class:`PayloadError` naming the problem for anything that is not a valid reading:
    bad UTF-8 or JSON, duplicate or unknown keys, wrong types, NaN/Infinity, impossible values.
    """
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise PayloadError(f"payload is {len(payload)} bytes, more than {MAX_PAYLOAD_BYTES}")
    obj = plain_object(payload)
    if obj is None:
        obj = _load_checked(payload)
    return _reading(obj, source)


def _load_checked(payload: bytes) -> Any:
    """The payload's JSON by the standard decoder, which names every problem (duplicate keys,
    NaN, bad UTF-8) in its error."""
    try:
        return _DECODER.decode(payload.decode("utf-8"))
    except PayloadError:
        raise
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError included
        raise PayloadError(f"payload is not valid UTF-8 JSON: {exc}") from exc


def plain_object(payload: bytes) -> dict[str, Any] | None:
    """The gateway's hot path: a plain payload (a flat object without escapes, as publishers
    send it) parsed by orjson, faster than the checked decoder (no Python hook per object). None when the
    payload is not plainly such an object; :func:`_load_checked` then decides, so every refusal
    and its message stay the checked decoder's.

    Without a backslash every ``"`` delimits a string, so a flat object holds exactly two per key
    and per string value: a duplicate key (which orjson would silently merge) or a nested string
    shows as more. ``v`` and ``seq`` must come back as integers, and no value may be nested or a
    float beyond 2**63: orjson reads a huge integer as a float, where the checked decoder keeps it
    exact, and a refusal's message quotes the value.
    """
    if orjson is None or not payload.startswith(b"{") or b"\\" in payload:
        return None
    try:
        obj = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    if type(obj) is not dict or type(obj.get("v")) is not int or \
            type(obj.get("seq")) is not int:
        return None
    strings = 0
    for value in obj.values():
        kind = type(value)
        if kind is str:
            strings += 1
        elif (kind is float and not -_HUGE < value < _HUGE) or kind is list or kind is dict:
            return None  # maybe an integer orjson rounded, or nested: a message would differ
    if payload.count(b'"') != 2 * (len(obj) + strings):
        return None
    return obj


_HUGE = float(2**63)  # orjson reads integers beyond 64 bits as floats


def _reading(obj: Any, source: str) -> Reading:
    if not isinstance(obj, dict):
        raise PayloadError(f"payload must be a JSON object, got {type(obj).__name__}")
    keys = obj.keys()
    if not _REQUIRED <= keys <= _ALLOWED:
        missing = _REQUIRED - keys
        if missing:
            raise PayloadError(f"missing required key(s): {', '.join(sorted(missing))}")
        raise PayloadError(f"unknown key(s) for schema v1: {', '.join(sorted(keys - _ALLOWED))}")
    version = obj["v"]
    if type(version) is not int or version != SCHEMA_VERSION:
        raise PayloadError(f"v: unsupported schema version {version!r}, expected 1")
    seq = obj["seq"]
    if type(seq) is not int:
        raise PayloadError(f"seq: must be an integer, got {type(seq).__name__}")
    # A float is taken as it is (the common case); anything else is checked by _number.
    numbers = [value if type(value := obj.get(name)) is float else _number(obj, name)
               for name in FLOAT_FIELDS]
    fixed_ts = parse_ts("fixed_ts", obj["fixed_ts"]) if "fixed_ts" in obj else None
    try:
        # Positional, in Reading's field order (FLOAT_FIELDS keeps fixed_energy_normal_kwh last).
        return Reading(source, parse_ts("ts", obj["ts"]), seq, numbers[0], numbers[1],
                       numbers[2], numbers[3], numbers[4], fixed_ts, numbers[5])
    except PayloadError:
        raise
    except InvalidDataError as exc:
        raise PayloadError(str(exc)) from exc


def peek_seq(payload: bytes) -> int | None:
    """The ``seq`` of a payload that :func:`decode` refused, when it still names one plainly (a
    JSON object with one integer ``seq`` in range); None otherwise. The gateway names a dead
    letter's seq in its receipt with it, so the publisher stops resending what was set aside."""
    if len(payload) > MAX_PAYLOAD_BYTES:
        return None
    try:
        obj = _DECODER.decode(payload.decode("utf-8"))
    except (PayloadError, ValueError, RecursionError):
        return None
    seq = obj.get("seq") if isinstance(obj, dict) else None
    return seq if type(seq) is int and 0 <= seq <= MAX_SEQ else None


def _number(obj: dict[str, Any], name: str) -> float | None:
    value = obj.get(name)
    if value is None:
        if name in obj:
            raise PayloadError(f"{name}: null is not allowed; leave the key out when absent")
        return None
    if type(value) not in (int, float):
        raise PayloadError(f"{name}: must be a number, got {type(value).__name__}")
    try:
        return float(value)
    except OverflowError:
        raise PayloadError(f"{name}: {str(value)[:20]}… is far outside the plausible range") from None


def parse_ts(name: str, value: object) -> datetime:
    """A wire timestamp (UTC, "Z") as an aware datetime; :class:`PayloadError` naming ``name``
    when it is not one."""
    if not isinstance(value, str) or _TS_PATTERN.fullmatch(value) is None:
        raise PayloadError(
            f"{name}: must be a UTC timestamp like 2025-12-16T15:00:00.000Z, got {value!r}"
        )
    try:
        return datetime.fromisoformat(value)
    except ValueError as exc:
        raise PayloadError(f"{name}: {value!r} is not a real date/time: {exc}") from exc


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        dupes: set[str] = set()
        for key, _ in pairs:
            (dupes if key in seen else seen).add(key)
        raise PayloadError(f"duplicate key(s): {', '.join(sorted(dupes))}")
    return obj


def _no_constant(name: str) -> float:
    raise PayloadError(f"{name} is not a number; JSON has no NaN or Infinity")


# One decoder for all payloads (json.loads would build a new one per call for these hooks).
_DECODER = json.JSONDecoder(object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
