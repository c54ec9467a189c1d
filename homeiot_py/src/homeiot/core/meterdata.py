"""Smart-meter values (ECHONET Lite class 0x0288) turned into a :class:`Reading`'s fields.

momonga parses the EDTs and maps the "no data" codes it knows to None (0x7FFFFFFE power,
0x7FFE current, 0xFFFFFFFE energy). The rest are guarded here: power overflow/underflow
(0x7FFFFFFF / 0x80000000), current overflow/underflow (0x7FFF / 0x8000), cumulative energy
outside its effective digits (0xD7) — all become absent fields, never numbers. The cumulative
counters wrap at 10^digits x unit x coefficient; :class:`EnergyCounter` unwraps them so the
published energy only grows.
"""

from __future__ import annotations

from dataclasses import dataclass

_POWER_CODES = frozenset({0x7FFFFFFE, 0x7FFFFFFF, -0x80000000})
_CURRENT_CODES_DA = frozenset({0x7FFE, 0x7FFF, -0x8000})  # in 0.1 A


def power_w(value: int | None) -> float | None:
    """Instantaneous power (EPC 0xE7) in W; None for no data and over/underflow codes."""
    if value is None or value in _POWER_CODES:
        return None
    return float(value)


def current_a(value: float | None) -> float | None:
    """One phase current (EPC 0xE8, already in A) ; None for the no-data and over/underflow
    codes (a single-phase meter reports 0x7FFE for the T phase)."""
    if value is None or round(value * 10) in _CURRENT_CODES_DA:
        return None
    return round(value, 1)


@dataclass
class EnergyCounter:
    """Unwraps one cumulative counter (0xE0 or 0xE3) that wraps at ``modulus_kwh``.

    ``modulus_kwh`` = 10^digits (0xD7) x unit (0xE1) x coefficient (0xD3). A value at or above the
    modulus is not a reading (a no-data code the library did not know) and is dropped.
    """

    modulus_kwh: float
    _last: float | None = None
    _wraps: int = 0

    @classmethod
    def resuming(cls, modulus_kwh: float, published_kwh: float | None) -> EnergyCounter:
        """A counter that continues from an energy published before (say, before a restart), so
        a wrap that happened earlier keeps counting."""
        counter = cls(modulus_kwh)
        if published_kwh is not None and published_kwh >= 0:
            counter._wraps = int(published_kwh // modulus_kwh)
            counter._last = published_kwh - counter._wraps * modulus_kwh
        return counter

    def update(self, value: float | None) -> float | None:
        """The unwrapped cumulative energy in kWh, or None for no data."""
        if value is None or value < 0 or value >= self.modulus_kwh:
            return None
        if self._last is not None and value < self._last - self.modulus_kwh / 2:
            self._wraps += 1  # the counter passed 10^digits and started again at 0
        self._last = value
        return round(value + self._wraps * self.modulus_kwh, 6)

    def unwrap_past(self, value: float | None) -> float | None:
        """Unwrap an earlier value of the same counter (the 30-minute energy) without moving it."""
        if value is None or value < 0 or value >= self.modulus_kwh:
            return None
        wraps = self._wraps
        if self._last is not None and value > self._last + self.modulus_kwh / 2:
            wraps -= 1  # it is from before the last wrap
        return round(value + max(wraps, 0) * self.modulus_kwh, 6)
