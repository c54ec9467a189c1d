"""InfluxDB line protocol encoding (the v1 ``/write`` body), and the reading → point contract.

Escaping follows the InfluxDB line-protocol spec:

* measurement: ``,`` and space are backslash-escaped;
* tag keys, tag values, field keys: ``,``, ``=`` and space are backslash-escaped;
* string field values: ``"`` and ``\\`` are backslash-escaped, the value is double-quoted;
* integers carry the ``i`` suffix, booleans are ``true``/``false``, floats must be finite.

Outside string field values a backslash is taken literally only when it does not precede another
backslash or a character that needs escaping; the servers read such sequences differently, so they
cannot round-trip and are rejected, as are newlines, NaN/inf, empty names and values, and the
reserved key ``time`` and keys starting with ``_``. A value that cannot be encoded is an
:class:`EncodingError` — never silently dropped.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Iterable, Mapping

from homeiot.core.errors import EncodingError
from homeiot.core.reading import FLOAT_FIELDS, Reading, epoch_ms

FieldValue = float | int | bool | str

_INT64_MIN = -(2**63)
_INT64_MAX = 2**63 - 1

_MEASUREMENT_ESCAPES = str.maketrans({",": r"\,", " ": r"\ "})
_KEY_ESCAPES = str.maketrans({",": r"\,", "=": r"\=", " ": r"\ "})
_STRING_ESCAPES = str.maketrans({"\\": "\\\\", '"': '\\"'})

_NEEDS_CHECK = re.compile(r"[\\\n\r]")
_AMBIGUOUS_BACKSLASH = re.compile(r"\\(?:[\\, =\"]|$)")
_NEWLINE = re.compile(r"[\n\r]")

#: The measurement readings are stored in (the default of ``INFLUXDB_MEASUREMENT``).
DEFAULT_MEASUREMENT = "meter_readings"
#: The tag that identifies the meter.
SOURCE_TAG = "source"


def _check_name(kind: str, name: str) -> None:
    if not isinstance(name, str) or not name:
        raise EncodingError(f"{kind} must be a non-empty string, got {name!r}")
    if _NEEDS_CHECK.search(name) is not None:
        if _NEWLINE.search(name) is not None:
            raise EncodingError(f"{kind} {name!r} contains a newline, which line protocol cannot carry")
        if _AMBIGUOUS_BACKSLASH.search(name) is not None:
            raise EncodingError(
                f"{kind} {name!r} has a backslash before a backslash, quote, comma, equals sign, "
                "space or at its end, which line protocol cannot round-trip"
            )


def _check_key(kind: str, key: str) -> None:
    _check_name(kind, key)
    if key == "time" or key.startswith("_"):
        raise EncodingError(f"{kind} {key!r} is reserved by InfluxDB ('time' and '_' prefixes)")


def escape_measurement(name: str) -> str:
    """Escape a measurement name, or raise :class:`EncodingError`."""
    _check_name("measurement", name)
    if name.startswith("#"):
        raise EncodingError(f"measurement {name!r} starts with '#', which marks a comment line")
    return name.translate(_MEASUREMENT_ESCAPES)


def format_field_value(key: str, value: FieldValue) -> str:
    """Format one field value: ``1.5``, ``7i``, ``true``, ``"text"``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        if not _INT64_MIN <= value <= _INT64_MAX:
            raise EncodingError(f"field {key!r}: integer {value} does not fit in 64 bits")
        return f"{value}i"
    if isinstance(value, float):
        if not math.isfinite(value):
            raise EncodingError(f"field {key!r}: {value} is not finite; InfluxDB cannot store NaN/inf")
        return repr(value)
    if isinstance(value, str):
        if _NEWLINE.search(value) is not None:
            raise EncodingError(f"field {key!r}: string contains a newline")
        return '"' + value.translate(_STRING_ESCAPES) + '"'
    raise EncodingError(f"field {key!r}: unsupported type {type(value).__name__}")


def encode_line(
    measurement: str,
    tags: Mapping[str, str],
    fields: Mapping[str, FieldValue],
    ts_ms: int,
) -> str:
    """Encode one point as a line (without trailing newline), timestamp in milliseconds.

    Tags are written sorted by key, as InfluxDB recommends.
    """
    if not fields:
        raise EncodingError("a point needs at least one field")
    parts = [escape_measurement(measurement)]
    for key in sorted(tags):
        value = tags[key]
        _check_key("tag key", key)
        _check_name(f"tag {key!r} value", value)
        parts.append(f",{key.translate(_KEY_ESCAPES)}={value.translate(_KEY_ESCAPES)}")
    parts.append(" ")
    first = True
    for key, field_value in fields.items():
        _check_key("field key", key)
        if not first:
            parts.append(",")
        first = False
        parts.append(f"{key.translate(_KEY_ESCAPES)}={format_field_value(key, field_value)}")
    if isinstance(ts_ms, bool) or not isinstance(ts_ms, int):
        raise EncodingError(f"timestamp must be integer milliseconds, got {ts_ms!r}")
    parts.append(f" {ts_ms}")
    return "".join(parts)


@functools.lru_cache(maxsize=1024)
def _reading_prefix(measurement: str, source: str) -> str:
    """``measurement,source=…`` escaped exactly as :func:`encode_line` does, once per pair."""
    _check_name(f"tag {SOURCE_TAG!r} value", source)
    return f"{escape_measurement(measurement)},{SOURCE_TAG}={source.translate(_KEY_ESCAPES)}"


def encode_reading(reading: Reading, measurement: str = DEFAULT_MEASUREMENT) -> str:
    """The InfluxDB point of a reading: tag ``source``, one field per present value, time = ``ts``.

    Because the timestamp is the reading's own, a replayed reading overwrites itself. This is the
    gateway's hot path, so it formats directly what :func:`encode_line` would produce for
    ``reading.fields()`` (a property test holds the two equal): a :class:`Reading` has already
    validated that its numbers are finite and its source needs no escaping.
    """
    values = [(name, value) for name in FLOAT_FIELDS
              if (value := getattr(reading, name)) is not None]
    fixed_ts_ms = None if reading.fixed_ts is None else epoch_ms(reading.fixed_ts)
    return reading_line(measurement, reading.source, reading.seq, values,
                        ts_ms=epoch_ms(reading.ts), fixed_ts_ms=fixed_ts_ms)


def reading_line(measurement: str, source: str, seq: int,
                 values: Iterable[tuple[str, float]], *, ts_ms: int,
                 fixed_ts_ms: int | None = None) -> str:
    """The point of a reading from its parts, already validated as a :class:`Reading` validates
    them (``values`` finite floats in ``FLOAT_FIELDS`` order, ``source`` a valid source): the one
    formatting shared by :func:`encode_reading` and the gateway's plain-payload path
    (:func:`homeiot.core.ingest.ingest`)."""
    parts = [_reading_prefix(measurement, source), " seq=", str(seq), "i"]
    for name, value in values:
        parts += (",", name, "=", repr(value))
    if fixed_ts_ms is not None:
        parts += (",fixed_ts_ms=", str(fixed_ts_ms), "i")
    parts += (" ", str(ts_ms))
    return "".join(parts)
