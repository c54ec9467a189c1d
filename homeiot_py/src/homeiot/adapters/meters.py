"""Meter backends behind one small interface: ``open()``, ``read() -> Reading``,
``pending() -> list[Reading]``, ``close()``.

``read`` returns a reading whose ``seq`` is a placeholder: the outbox numbers readings when it
commits them. Backends: ``simulated`` (a believable household, reproducible from a seed) here, and
``broute`` (the smart meter over the B-route) in :mod:`homeiot.adapters.broute`.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Protocol
from zoneinfo import ZoneInfo

from homeiot.core.reading import Reading
from homeiot.core.simulation import SimulatedMeter


class Meter(Protocol):
    """What the publisher needs from a meter."""

    def open(self) -> None: ...

    def read(self) -> Reading: ...

    def pending(self) -> list[Reading]:
        """Readings taken besides the live ones (half-hour slots, read back after a gap)."""
        ...

    def close(self) -> None: ...


class SimulatedBackend:
    """The simulated household on the wall clock."""

    def __init__(self, source: str, seed: int, tz: ZoneInfo,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self._meter = SimulatedMeter(source, seed=seed, tz=tz)
        self._clock = clock

    def open(self) -> None:
        """Nothing to open."""

    def read(self) -> Reading:
        return self._meter.read(self._clock())

    def pending(self) -> list[Reading]:
        """No half-hour slots: the simulated household has no history."""
        return []

    def close(self) -> None:
        """Nothing to close."""
