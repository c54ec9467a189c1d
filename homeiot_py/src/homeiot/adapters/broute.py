"""The ``broute`` meter: a Japanese low-voltage smart meter over the B-route, through an SK-text
Wi-SUN dongle (BP35A1, BP35C2, RL7023 Stick-D, RS-WSUHA-P), using the momonga library.

momonga owns the radio: scan, PANA join, re-authentication after the session lifetime (EVENT 29 →
25), transmit pacing. This adapter asks for instantaneous power (0xE7), currents (0xE8) and the
cumulative energies (0xE0/0xE3) in one request, the 30-minute fixed-time energy (0xEA) once per
half hour, guards the values (``core.meterdata``), reconnects after a lost session with capped,
jittered backoff — and stops at once when the B-route credentials are refused. The ID and the
password never reach a log.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import momonga
from momonga import EchonetPropertyCode as Epc

from homeiot.core.errors import MeterAuthError, MeterUnavailableError
from homeiot.core.meterdata import EnergyCounter, current_a, power_w
from homeiot.core.reading import Reading

logger = logging.getLogger(__name__)

_JST = ZoneInfo("Asia/Tokyo")  # the meter's clock (0xEA timestamps)
_FIXED_EVERY = timedelta(minutes=30)
_DEFAULT_DIGITS = 8


@dataclass
class _Session:
    """An open momonga session and the counters unwrapped in it."""

    mo: momonga.Momonga
    normal: EnergyCounter
    reverse: EnergyCounter


class BrouteBackend:
    """A :class:`~homeiot.adapters.meters.Meter` reading a B-route smart meter."""

    def __init__(self, source: str, rbid: str, password: str, device: str, *,
                 reconnect_min_s: float = 10.0, reconnect_max_s: float = 600.0,
                 tuning: dict[str, Any] | None = None,
                 resume_kwh: tuple[float | None, float | None] = (None, None),
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self.source = source
        self._rbid = rbid
        self._password = password
        self.device = device
        self._reconnect_min = reconnect_min_s
        self._reconnect_max = reconnect_max_s
        self._tuning = tuning or {}
        self._clock = clock
        self._session: _Session | None = None
        self._delay = reconnect_min_s
        self._next_attempt = 0.0
        self._counters: tuple[EnergyCounter, EnergyCounter] | None = None  # survive reconnects
        self._resume = resume_kwh  # the last published (normal, reverse), e.g. from the outbox
        self._next_fixed = datetime.min.replace(tzinfo=UTC)
        self._fixed: tuple[datetime, float] | None = None

    def __repr__(self) -> str:  # never the credentials
        return f"BrouteBackend(source={self.source!r}, device={self.device!r})"

    def open(self) -> None:
        """Try to open the session now; a transient failure is retried by :meth:`read`."""
        try:
            self._connect()
        except MeterUnavailableError as exc:
            logger.warning("broute: %s; retrying in %.0f s", exc, self._delay)

    def close(self) -> None:
        if self._session is not None:
            try:
                self._session.mo.close()
            except momonga.MomongaError as exc:
                logger.debug("broute: close: %s", exc)
            self._session = None

    def _connect(self) -> _Session:
        if time.monotonic() < self._next_attempt:
            raise MeterUnavailableError(f"no B-route session; next attempt in "
                                        f"{self._next_attempt - time.monotonic():.0f} s")
        logger.info("broute: opening a session through %s (scan and join take up to minutes)",
                    self.device)
        # One join attempt: a wrong password must not be tried again and again (it can lock the
        # B-route account); a radio problem is retried by our own backoff instead.
        mo = momonga.Momonga(self._rbid, self._password, self.device, scan_retries=3,
                             join_retries=1)
        for name, value in self._tuning.items():
            setattr(mo, name, value)
        try:
            mo.open()
            digits = self._digits(mo)
        except momonga.MomongaSkJoinFailure as exc:
            mo.close()
            raise MeterAuthError(
                "the smart meter refused the PANA authentication: check BROUTE_ID and "
                "BROUTE_PASSWORD (not retried: repeated attempts can lock the B-route account)"
            ) from exc
        except (momonga.MomongaError, OSError) as exc:
            self._schedule_retry()
            raise MeterUnavailableError(f"cannot open the B-route session: {exc}") from exc
        modulus = 10 ** digits * mo.energy_unit * mo.energy_coefficient
        if self._counters is None or self._counters[0].modulus_kwh != modulus:
            self._counters = (EnergyCounter.resuming(modulus, self._resume[0]),
                              EnergyCounter.resuming(modulus, self._resume[1]))
        self._session = _Session(mo, *self._counters)
        self._delay = self._reconnect_min
        logger.info("broute: session open (unit %s kWh, coefficient %s, %d digits)",
                    mo.energy_unit, mo.energy_coefficient, digits)
        return self._session

    @staticmethod
    def _digits(mo: momonga.Momonga) -> int:
        try:
            return int(mo.get_number_of_effective_digits_for_cumulative_energy())
        except momonga.MomongaResponseNotPossible:
            return _DEFAULT_DIGITS  # 0xD7 is optional; 8 digits is the common case

    def _schedule_retry(self) -> None:
        delay = self._delay * random.uniform(0.8, 1.2)  # noqa: S311 - jitter, not secrecy
        self._next_attempt = time.monotonic() + delay
        self._delay = min(self._reconnect_max, self._delay * 2)

    def read(self) -> Reading:
        """One reading (``seq`` is a placeholder; the outbox numbers it)."""
        session = self._session or self._connect()
        mo = session.mo
        now = self._clock()
        try:
            values = mo.request_to_get({Epc.instantaneous_power, Epc.instantaneous_current,
                                        Epc.measured_cumulative_energy,
                                        Epc.measured_cumulative_energy_reversed})
        except (momonga.MomongaNeedToReopen, momonga.MomongaConnectionFailure,
                momonga.MomongaTimeoutError, momonga.MomongaIOError) as exc:
            self.close()
            self._schedule_retry()
            raise MeterUnavailableError(f"the B-route session was lost: {exc}") from exc
        except momonga.MomongaError as exc:  # an unreadable answer; the session is fine
            raise MeterUnavailableError(f"unreadable meter answer: {exc}") from exc
        currents = values.get(Epc.instantaneous_current) or {}
        power = power_w(values.get(Epc.instantaneous_power))
        if power is None:
            raise MeterUnavailableError("the meter has no instantaneous power value right now")
        fixed = self._fixed_energy(session, now)
        return Reading(
            source=self.source, ts=now, seq=0, power_w=power,
            current_r_a=current_a(currents.get("r phase current")),
            current_t_a=current_a(currents.get("t phase current")),
            energy_normal_kwh=session.normal.update(values.get(Epc.measured_cumulative_energy)),
            energy_reverse_kwh=session.reverse.update(
                values.get(Epc.measured_cumulative_energy_reversed)),
            fixed_ts=fixed[0] if fixed else None,
            fixed_energy_normal_kwh=fixed[1] if fixed else None)

    def _fixed_energy(self, session: _Session, now: datetime) -> tuple[datetime, float] | None:
        """The 30-minute fixed-time energy (0xEA), asked for once per half hour."""
        if now < self._next_fixed:
            return self._fixed
        self._next_fixed = now + _FIXED_EVERY / 6  # retry in 5 min when it fails
        try:
            value = session.mo.get_cumulative_energy_measured_at_fixed_time()
        except momonga.MomongaError as exc:
            logger.info("broute: no 30-minute energy this time: %s", exc)
            return self._fixed
        stamp, energy = value.get("timestamp"), value.get("cumulative energy")
        energy = session.normal.unwrap_past(energy) if isinstance(energy, int | float) else None
        if not isinstance(stamp, datetime) or energy is None:
            return self._fixed
        fixed_ts = stamp.replace(tzinfo=_JST).astimezone(UTC)
        self._fixed = (fixed_ts, energy)
        self._next_fixed = fixed_ts + _FIXED_EVERY + timedelta(minutes=1)
        return self._fixed
