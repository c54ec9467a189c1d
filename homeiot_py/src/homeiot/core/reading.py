"""The reading: one sample of a household's smart meter, the value everything else moves around."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from homeiot.core.errors import InvalidReadingError, TopicError

#: A source names one meter. It is one MQTT topic level and an InfluxDB tag value, so it is kept to
#: characters that are safe in both (and in InfluxQL string literals and file names).
SOURCE_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")

# Plausibility bounds. They are wide on purpose: they catch garbage (a sentinel, a unit mix-up by a
# factor of 1000s), not unusual households.
MAX_ABS_POWER_W = 1_000_000.0
MAX_ABS_CURRENT_A = 10_000.0
MAX_ENERGY_KWH = 1e12
MIN_TS = datetime(2000, 1, 1, tzinfo=UTC)
MAX_TS = datetime(2200, 1, 1, tzinfo=UTC)
MAX_SEQ = 2**63 - 1


#: Sources already validated. A household has a handful, and the gateway checks every message.
_KNOWN_SOURCES: set[str] = set()
_KNOWN_SOURCES_MAX = 1024


def validate_source(source: str) -> str:
    """Return ``source`` if it is a valid source name, else raise :class:`TopicError`."""
    if source in _KNOWN_SOURCES:
        return source
    if not isinstance(source, str) or SOURCE_PATTERN.fullmatch(source) is None:
        raise TopicError(
            f"source {source!r} is not a valid source name: 1-63 characters of A-Z a-z 0-9 _ . -, "
            "starting with a letter or digit"
        )
    if len(_KNOWN_SOURCES) < _KNOWN_SOURCES_MAX:
        _KNOWN_SOURCES.add(source)
    return source


def to_utc_ms(ts: datetime, field: str = "ts") -> datetime:
    """Normalise an aware datetime to UTC, truncated to whole milliseconds (the wire precision)."""
    if ts.tzinfo is UTC and ts.microsecond % 1000 == 0 and MIN_TS <= ts < MAX_TS:
        return ts  # already normalised: the common case for decoded payloads
    if ts.tzinfo is None or ts.utcoffset() is None:
        raise InvalidReadingError(field, "timestamp must be timezone-aware")
    ts = ts.astimezone(UTC)
    if not MIN_TS <= ts < MAX_TS:
        raise InvalidReadingError(field, f"timestamp {ts.isoformat()} is outside 2000..2199")
    return ts.replace(microsecond=ts.microsecond - ts.microsecond % 1000)


def epoch_ms(ts: datetime) -> int:
    """Milliseconds since the Unix epoch of an aware datetime."""
    return (ts - _EPOCH) // _ONE_MS


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_MS = timedelta(milliseconds=1)


def _check_number(field: str, value: float | None, low: float, high: float) -> float | None:
    if type(value) is float and low <= value <= high:  # fast path; False for NaN and inf
        return value
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidReadingError(field, f"must be a number, got {type(value).__name__}")
    try:
        value = float(value)
    except OverflowError:
        raise InvalidReadingError(field, "integer is far outside the plausible range") from None
    if not math.isfinite(value):
        raise InvalidReadingError(field, f"must be finite, got {value}")
    if not low <= value <= high:
        raise InvalidReadingError(field, f"{value} is outside the plausible range {low}..{high}")
    return value


@dataclass(frozen=True, slots=True)
class Reading:
    """One smart-meter sample.

    ``ts`` is normalised to UTC with millisecond precision. Optional meter values are ``None`` when
    the meter did not provide them — never a sentinel number. ``fixed_ts`` and
    ``fixed_energy_normal_kwh`` (the meter's 30-minute fixed-time cumulative energy, EPC 0xEA) come
    together or not at all.

    ``power_w`` is required, except in a *half-hour slot reading*: the cumulative energy at one
    half-hour boundary (``ts == fixed_ts``), live from 0xEA or read back from the meter's history
    (0xE2). Its timestamp is the half hour itself, so publishing a slot again overwrites it.
    """

    source: str
    ts: datetime
    seq: int
    power_w: float | None
    current_r_a: float | None = None
    current_t_a: float | None = None
    energy_normal_kwh: float | None = None
    energy_reverse_kwh: float | None = None
    fixed_ts: datetime | None = None
    fixed_energy_normal_kwh: float | None = None

    def __post_init__(self) -> None:
        validate_source(self.source)
        set_ = object.__setattr__  # frozen: normalise in place once, at construction
        if not isinstance(self.ts, datetime):
            raise InvalidReadingError("ts", "must be a datetime")
        set_(self, "ts", to_utc_ms(self.ts))
        if isinstance(self.seq, bool) or not isinstance(self.seq, int):
            raise InvalidReadingError("seq", f"must be an integer, got {type(self.seq).__name__}")
        if not 0 <= self.seq <= MAX_SEQ:
            raise InvalidReadingError("seq", f"{self.seq} is outside 0..2**63-1")
        if self.power_w is None and (self.fixed_ts is None or self.fixed_ts != self.ts):
            raise InvalidReadingError("power_w", "is required (only a half-hour slot reading, "
                                                 "whose ts equals its fixed_ts, goes without)")
        for name, (low, high) in FLOAT_BOUNDS.items():
            value = getattr(self, name)
            checked = _check_number(name, value, low, high)
            if checked is not value:
                set_(self, name, checked)
        if (self.fixed_ts is None) != (self.fixed_energy_normal_kwh is None):
            raise InvalidReadingError(
                "fixed_ts", "fixed_ts and fixed_energy_normal_kwh must be given together"
            )
        if self.fixed_ts is not None:
            if not isinstance(self.fixed_ts, datetime):
                raise InvalidReadingError("fixed_ts", "must be a datetime")
            set_(self, "fixed_ts", to_utc_ms(self.fixed_ts, "fixed_ts"))

    def fields(self) -> dict[str, float | int]:
        """The measured values that are present, by their stored field name.

        ``fixed_ts`` becomes ``fixed_ts_ms`` (an integer), so every field keeps one type forever —
        InfluxDB rejects a field whose type changes.
        """
        out: dict[str, float | int] = {"seq": self.seq}
        for name in FLOAT_FIELDS:
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        if self.fixed_ts is not None:
            out["fixed_ts_ms"] = epoch_ms(self.fixed_ts)
        return out


#: The plausible range of each float field (inclusive).
FLOAT_BOUNDS: dict[str, tuple[float, float]] = {
    "power_w": (-MAX_ABS_POWER_W, MAX_ABS_POWER_W),
    "current_r_a": (-MAX_ABS_CURRENT_A, MAX_ABS_CURRENT_A),
    "current_t_a": (-MAX_ABS_CURRENT_A, MAX_ABS_CURRENT_A),
    "energy_normal_kwh": (0.0, MAX_ENERGY_KWH),
    "energy_reverse_kwh": (0.0, MAX_ENERGY_KWH),
    "fixed_energy_normal_kwh": (0.0, MAX_ENERGY_KWH),
}

#: Float fields, in wire order (``power_w`` first; required except in a half-hour slot reading).
FLOAT_FIELDS: tuple[str, ...] = (
    "power_w",
    "current_r_a",
    "current_t_a",
    "energy_normal_kwh",
    "energy_reverse_kwh",
    "fixed_energy_normal_kwh",
)


def check_not_future(reading: Reading, now: datetime, max_ahead: timedelta) -> Reading:
    """Return ``reading`` unless its timestamp is more than ``max_ahead`` after ``now``.

    A meter clock far in the future would write points nobody queries and that later readings
    never overwrite; such readings are refused (the gateway keeps them as dead letters).
    """
    if reading.ts - now > max_ahead:
        raise InvalidReadingError(
            "ts", f"{reading.ts.isoformat()} is more than {max_ahead.total_seconds():.0f} s in the future"
        )
    return reading
