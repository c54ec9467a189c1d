"""A simulated household meter: believable, reproducible from a seed, no I/O.

Base load with a day/night shape (low at night, peaks in the morning and evening), appliance
spikes (kettle, microwave, washing machine, air conditioner) that start at random and run their
course, small noise, and cumulative energy that only grows. The same seed and the same timestamps
always give the same readings — for the lab, the demos and ``dev_seed``.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

from homeiot.core.reading import Reading

#: (name, watts, typical minutes, starts per day)
APPLIANCES: tuple[tuple[str, float, float, float], ...] = (
    ("kettle", 1300.0, 3.0, 4.0),
    ("microwave", 1000.0, 4.0, 3.0),
    ("washing machine", 500.0, 60.0, 0.7),
    ("rice cooker", 700.0, 45.0, 1.5),
    ("air conditioner", 900.0, 120.0, 1.2),
    ("dryer", 1200.0, 50.0, 0.3),
)
VOLTAGE = 100.0  # Japanese single-phase three-wire households: 100 V per leg


def _daily_shape(local_hour: float) -> float:
    """Relative base load over the day: a night trough, a morning and an evening peak."""
    morning = math.exp(-((local_hour - 7.5) ** 2) / 2.0)
    evening = 1.4 * math.exp(-((local_hour - 19.5) ** 2) / 4.0)
    return 0.55 + 0.45 * morning + 0.6 * evening


@dataclass
class SimulatedMeter:
    """Generates readings for ``source``; call :meth:`read` with increasing timestamps."""

    source: str
    seed: int = 1
    tz: ZoneInfo = field(default_factory=lambda: ZoneInfo("Asia/Tokyo"))
    base_w: float = 250.0
    energy_kwh: float = 12_000.0
    seq: int = 0
    _rng: random.Random = field(init=False, repr=False)
    _running: dict[str, datetime] = field(init=False, default_factory=dict, repr=False)
    _last: datetime | None = field(init=False, default=None, repr=False)
    _last_power: float = field(init=False, default=0.0, repr=False)

    def __post_init__(self) -> None:
        self._rng = random.Random(f"{self.seed}:{self.source}")  # noqa: S311 - a simulation

    def _appliance_load(self, ts: datetime, step: timedelta) -> float:
        load = 0.0
        minutes = step.total_seconds() / 60
        for name, watts, duration, per_day in APPLIANCES:
            until = self._running.get(name)
            if until is not None and ts >= until:
                del self._running[name]
                until = None
            if until is None and self._rng.random() < per_day * minutes / 1440:
                length = max(1.0, self._rng.gauss(duration, duration / 4))
                self._running[name] = ts + timedelta(minutes=length)
                until = self._running[name]
            if until is not None:
                load += watts * self._rng.uniform(0.9, 1.05)
        return load

    def read(self, ts: datetime) -> Reading:
        """The reading at ``ts`` (aware). Energy integrates the power since the previous read."""
        step = ts - self._last if self._last is not None else timedelta(seconds=30)
        if step <= timedelta(0):
            raise ValueError(f"timestamps must increase: {ts} after {self._last}")
        local = ts.astimezone(self.tz)
        hour = local.hour + local.minute / 60
        power = self.base_w * _daily_shape(hour) + self._appliance_load(ts, step)
        power = max(30.0, power + self._rng.gauss(0, 8))
        if self._last is not None:
            self.energy_kwh += (self._last_power + power) / 2 * step.total_seconds() / 3_600_000
        self._last, self._last_power = ts, power
        r_share = self._rng.uniform(0.45, 0.6)
        reading = Reading(
            source=self.source, ts=ts, seq=self.seq, power_w=round(power, 1),
            current_r_a=round(power * r_share / VOLTAGE, 1),
            current_t_a=round(power * (1 - r_share) / VOLTAGE, 1),
            energy_normal_kwh=round(self.energy_kwh, 3), energy_reverse_kwh=0.0)
        self.seq += 1
        return reading
