"""The ``broute`` meter: a Japanese low-voltage smart meter over the B-route, through an SK-text
Wi-SUN dongle (BP35A1, BP35C2, RL7023 Stick-D, RS-WSUHA-P), using the momonga library.

momonga owns the radio protocol: scan, PANA join, re-authentication after the session lifetime
(EVENT 29 → 25), transmit pacing. This adapter asks for instantaneous power (0xE7), currents (0xE8)
and the cumulative energies (0xE0/0xE3) in one request, the 30-minute fixed-time energy (0xEA)
once per half hour, and guards the values (``core.meterdata``).

It keeps the link alive itself. Every exchange is bounded (``core.link.LinkTiming``: momonga's own
transmit budget of 300 s is far too long to notice a dead session), every outcome is fed to the
recovery ladder (``core.link.LinkMachine``), and the ladder's actions are carried out here:
re-request, rejoin (close, then scan + PANA join without ``SKRESET``), reset (``SKRESET`` and a
fresh open of the serial port, waiting for a device that vanished), and finally
:class:`MeterLinkDeadError` so the process exits and systemd starts it again. A refused B-route
password on the first join stops at once (:class:`MeterAuthError`, never retried: it could lock
the household's B-route account). The ID and the password never reach a log.
"""

from __future__ import annotations

import hashlib
import logging
import os
import select
import termios
import threading
import time
import tty
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import momonga
from momonga import EchonetPropertyCode as Epc

from homeiot.core.errors import MeterAuthError, MeterLinkDeadError, MeterUnavailableError
from homeiot.core.link import (
    Action,
    Failure,
    LinkMachine,
    LinkPolicy,
    LinkTiming,
    OpenFailed,
    OpenOk,
    RequestFailed,
    RequestOk,
    Step,
)
from homeiot.core.meterdata import EnergyCounter, current_a, power_w
from homeiot.core.reading import Reading
from homeiot.core.slots import METER_TZ, SLOT, day_readings, days_to_read, slot_reading

logger = logging.getLogger(__name__)

_FIXED_EVERY = timedelta(minutes=30)
_DEFAULT_DIGITS = 8
_ABANDON_JOIN_S = 10.0  # how long an abandoned open/close may take to notice its cancellation


@dataclass
class _Session:
    """An open momonga session and the counters unwrapped in it."""

    mo: momonga.Momonga
    normal: EnergyCounter
    reverse: EnergyCounter


class _OpenFailedError(Exception):
    """An open attempt failed; ``failure`` says how (fed to the ladder)."""

    def __init__(self, failure: Failure, reason: str) -> None:
        super().__init__(reason)
        self.failure = failure


def _bounded(name: str, work: Callable[[], Any], timeout_s: float,
             abort: Callable[[], None]) -> Any:
    """Run ``work`` on a helper thread; after ``timeout_s`` call ``abort`` (which must make
    ``work`` return soon) and raise ``TimeoutError``. Errors of ``work`` are raised here."""
    result: list[Any] = []
    error: list[BaseException] = []

    def run() -> None:
        try:
            result.append(work())
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            error.append(exc)

    thread = threading.Thread(target=run, name=f"broute-{name}", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        abort()
        thread.join(_ABANDON_JOIN_S)
        if thread.is_alive():
            logger.warning("broute: the abandoned %s is still running", name)
        raise TimeoutError(f"the {name} took longer than {timeout_s:.0f} s")
    if error:
        raise error[0]
    return result[0] if result else None


class BrouteBackend:
    """A :class:`~homeiot.adapters.meters.Meter` reading a B-route smart meter."""

    def __init__(self, source: str, rbid: str, password: str, device: str, *,
                 timing: LinkTiming | None = None, policy: LinkPolicy | None = None,
                 tuning: dict[str, Any] | None = None,
                 resume_kwh: tuple[float | None, float | None] = (None, None),
                 history_days: int = 2,
                 joined_marker: Path | None = None,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC),
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.source = source
        self._rbid = rbid
        self._password = password
        self.device = device
        self.timing = timing or LinkTiming()
        self.link = LinkMachine(policy or LinkPolicy())
        self._tuning = tuning or {}
        self._clock = clock
        self._monotonic = monotonic
        self._session: _Session | None = None
        # A join refused after one succeeded with these credentials is the radio, not the
        # password. Remembered across restarts in ``joined_marker`` (a digest of the credentials,
        # beside the outbox): after an exit 4 (link dead), the next process's first failed join
        # must climb the ladder, not stop for good with exit 3.
        self._joined_marker = joined_marker
        self._credentials_digest = hashlib.sha256(f"{rbid}\0{password}".encode()).hexdigest()
        self._ever_joined = self._joined_before()
        self._counters: tuple[EnergyCounter, EnergyCounter] | None = None  # survive reconnects
        self._resume = resume_kwh  # the last published (normal, reverse), e.g. from the outbox
        self._next_fixed = datetime.min.replace(tzinfo=UTC)
        self._slots: list[Reading] = []  # half-hour slot readings not yet handed over
        self._last_slot: datetime | None = None  # the newest half hour handed over
        self._history_days = history_days  # 0: never read the history back
        self._history_supported = True
        self._history_due = True  # read the history back at the next good read
        self._next_history = datetime.min.replace(tzinfo=UTC)

    def _joined_before(self) -> bool:
        if self._joined_marker is None:
            return False
        try:
            return self._joined_marker.read_text().strip() == self._credentials_digest
        except OSError:
            return False

    def _remember_join(self) -> None:
        if self._joined_marker is None or self._ever_joined:
            return
        try:
            tmp = self._joined_marker.with_name(self._joined_marker.name + ".tmp")
            tmp.write_text(self._credentials_digest + "\n")
            tmp.chmod(0o600)
            tmp.replace(self._joined_marker)
        except OSError as exc:  # the session works; only a later restart loses the memory
            logger.warning("broute: cannot remember the successful join in %s: %s",
                           self._joined_marker, exc)

    def __repr__(self) -> str:  # never the credentials
        return f"BrouteBackend(source={self.source!r}, device={self.device!r})"

    # --- lifecycle --------------------------------------------------------------------------

    def open(self) -> None:
        """Try to open the session now; a transient failure is left to the ladder (:meth:`read`).
        A refused password raises :class:`MeterAuthError`."""
        self._attempt_open(reset=True)

    def close(self) -> None:
        """End the session (SKTERM, bounded) and let the device go."""
        self._drop_session(polite=True)

    def _drop_session(self, *, polite: bool) -> None:
        session, self._session = self._session, None
        if session is None:
            return
        skw = session.mo.session_manager.skw
        if not polite:  # a silent dongle would hold SKTERM for 30 s: cancel it up front
            skw.cancel_commands()
        try:
            _bounded("close", session.mo.close, self.timing.close_timeout_s, skw.cancel_commands)
        except (momonga.MomongaError, OSError) as exc:
            logger.debug("broute: close: %s", exc)

    def _attempt_open(self, *, reset: bool) -> bool:
        """One open attempt, its outcome fed to the ladder. True when a session is open."""
        try:
            self._session = self._open(reset=reset)
        except _OpenFailedError as exc:
            self._announce(self.link.handle(OpenFailed(self._monotonic(), exc.failure, str(exc))))
            return False
        self.link.handle(OpenOk(self._monotonic()))
        self._history_due = True  # the link was down: half hours may be missing
        return True

    def _open(self, *, reset: bool) -> _Session:
        self._probe()
        logger.info("broute: opening a session through %s%s (a scan and a join take up to "
                    "%.0f s)", self.device, " after SKRESET" if reset else "",
                    self.timing.scan_timeout_s + self.timing.join_timeout_s)
        # One join attempt: a wrong password must not be tried again and again (it can lock the
        # B-route account); a radio problem is retried by the ladder instead.
        mo = momonga.Momonga(self._rbid, self._password, self.device, reset_dev=reset,
                             scan_retries=3, join_retries=1)
        mo.xmit_timeout = self.timing.request_timeout_s
        mo.recv_timeout = self.timing.answer_timeout_s
        mo.xmit_retries = self.timing.request_retries
        for name, value in self._tuning.items():
            setattr(mo, name, value)

        def work() -> int:
            mo.open()
            return self._digits(mo)

        def abort() -> None:  # unblocks a command waiting for the dongle; the open then fails
            mo.session_manager.skw.cancel_commands()
            try:
                mo.session_manager.skw.close()
            except (momonga.MomongaError, OSError) as exc:
                logger.debug("broute: abandoning the open: %s", exc)

        try:
            digits = int(_bounded("open", work, self.timing.open_bound_s, abort))
        except momonga.MomongaSkJoinFailure as exc:
            if not self._ever_joined:
                raise MeterAuthError(
                    "the smart meter refused the PANA authentication: check BROUTE_ID and "
                    "BROUTE_PASSWORD (not retried: repeated attempts can lock the B-route "
                    "account)") from exc
            raise _OpenFailedError(Failure.SESSION_LOST, "the PANA join failed") from exc
        except TimeoutError as exc:
            raise _OpenFailedError(self._gone_or(Failure.TIMEOUT), str(exc)) from exc
        except (momonga.MomongaError, OSError) as exc:
            raise _OpenFailedError(self._gone_or(Failure.ERROR),
                               f"{type(exc).__name__}: {exc}") from exc
        self._remember_join()
        self._ever_joined = True
        modulus = 10 ** digits * mo.energy_unit * mo.energy_coefficient
        if self._counters is None or self._counters[0].modulus_kwh != modulus:
            self._counters = (EnergyCounter.resuming(modulus, self._resume[0]),
                              EnergyCounter.resuming(modulus, self._resume[1]))
        logger.info("broute: session open (unit %s kWh, coefficient %s, %d digits)",
                    mo.energy_unit, mo.energy_coefficient, digits)
        return _Session(mo, *self._counters)

    def _gone_or(self, failure: Failure) -> Failure:
        return failure if os.path.exists(self.device) else Failure.DEVICE_GONE

    def _probe(self) -> None:
        """Is anything answering on the serial port? A silent dongle would hold momonga's first
        command (ROPT) for 300 s, so a short SKINFO probe comes first."""
        if not os.path.exists(self.device):
            raise _OpenFailedError(Failure.DEVICE_GONE, f"{self.device} does not exist")
        try:
            fd = os.open(self.device, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        except OSError as exc:
            raise _OpenFailedError(self._gone_or(Failure.ERROR),
                               f"cannot open {self.device}: {exc.strerror}") from exc
        try:
            try:
                tty.setraw(fd)
                attrs = termios.tcgetattr(fd)
                attrs[4] = attrs[5] = termios.B115200
                termios.tcsetattr(fd, termios.TCSANOW, attrs)
                termios.tcflush(fd, termios.TCIFLUSH)
                os.write(fd, b"\r\nSKINFO\r\n")
                ready, _, _ = select.select([fd], [], [], self.timing.probe_timeout_s)
                answered = bool(ready) and bool(os.read(fd, 256))
            except OSError as exc:
                raise _OpenFailedError(self._gone_or(Failure.ERROR),
                                   f"{self.device}: {exc.strerror}") from exc
        finally:
            os.close(fd)
        if not answered:
            raise _OpenFailedError(Failure.TIMEOUT, f"the dongle did not answer SKINFO within "
                                                f"{self.timing.probe_timeout_s:.0f} s")

    @staticmethod
    def _digits(mo: momonga.Momonga) -> int:
        try:
            return int(mo.get_number_of_effective_digits_for_cumulative_energy())
        except momonga.MomongaResponseNotPossible:
            return _DEFAULT_DIGITS  # 0xD7 is optional; 8 digits is the common case

    # --- the ladder -------------------------------------------------------------------------

    def _announce(self, action: Action) -> None:
        if not action.announce:
            return
        if action.step is Step.OK:
            logger.info("broute: link healthy again (%s)", action.reason)
        elif action.step is Step.REREQUEST:
            logger.warning("broute: re-requesting: %s", action.reason)
        elif action.step is Step.EXIT:
            logger.error("broute: giving up: %s", action.reason)
        else:
            wait = max(0.0, action.not_before - self._monotonic())
            logger.warning("broute: %s%s: %s", action.step.value,
                           f" in {wait:.0f} s" if wait >= 1 else "", action.reason)

    def _session_or_recover(self) -> _Session:
        """The open session, after carrying out whatever the ladder asks for first."""
        action = self.link.action
        if action.step is Step.EXIT:
            raise MeterLinkDeadError(f"the B-route link is dead: {action.reason}")
        if action.step in (Step.REJOIN, Step.RESET):
            if self._monotonic() < action.not_before:
                raise MeterUnavailableError(f"the B-route link is down; {action.step.value} "
                                            "pending")
            self._drop_session(polite=action.step is Step.REJOIN)
            if not self._attempt_open(reset=action.step is Step.RESET):
                if self.link.action.step is Step.EXIT:
                    raise MeterLinkDeadError(f"the B-route link is dead: {self.link.action.reason}")
                raise MeterUnavailableError(f"the B-route link is down; "
                                            f"{self.link.action.step.value} pending")
        if self._session is None and not self._attempt_open(reset=True):
            # the first open failed before the ladder had a say
            raise MeterUnavailableError("the B-route link is down; "
                                        f"{self.link.action.step.value} pending")
        if self._session is None:
            raise MeterUnavailableError("the B-route link is down")
        return self._session

    def _failure(self, exc: Exception, session: _Session) -> Failure:
        if not os.path.exists(self.device):
            return Failure.DEVICE_GONE
        if isinstance(exc, momonga.MomongaResponseNotPossible | momonga.MomongaResponseNotExpected):
            return Failure.ERROR  # an answer; the session is fine
        manager = session.mo.session_manager
        if (manager.receiver_exception is not None or manager.skw.publisher_exception is not None
                or not manager.session_established):
            return Failure.SESSION_LOST
        return Failure.TIMEOUT

    def read(self) -> Reading:
        """One reading (``seq`` is a placeholder; the outbox numbers it)."""
        session = self._session_or_recover()
        mo = session.mo
        now = self._clock()
        try:
            values = mo.request_to_get({Epc.instantaneous_power, Epc.instantaneous_current,
                                        Epc.measured_cumulative_energy,
                                        Epc.measured_cumulative_energy_reversed})
        except (momonga.MomongaError, OSError) as exc:
            failure = self._failure(exc, session)
            self._announce(self.link.handle(RequestFailed(self._monotonic(), failure,
                                                          f"{type(exc).__name__}: {exc}")))
            raise MeterUnavailableError(f"no meter reading: {failure.value}") from exc
        self._announce(self.link.handle(RequestOk(self._monotonic())))
        currents = values.get(Epc.instantaneous_current) or {}
        power = power_w(values.get(Epc.instantaneous_power))
        if power is None:
            raise MeterUnavailableError("the meter has no instantaneous power value right now")
        reading = Reading(
            source=self.source, ts=now, seq=0, power_w=power,
            current_r_a=current_a(currents.get("r phase current")),
            current_t_a=current_a(currents.get("t phase current")),
            energy_normal_kwh=session.normal.update(values.get(Epc.measured_cumulative_energy)),
            energy_reverse_kwh=session.reverse.update(
                values.get(Epc.measured_cumulative_energy_reversed)))
        self._half_hours(session, now)
        return reading

    def pending(self) -> list[Reading]:
        """Half-hour slot readings taken since the last call (live 0xEA, history 0xE2)."""
        out, self._slots = self._slots, []
        return out

    def _add_slots(self, readings: list[Reading]) -> None:
        for reading in readings:
            if self._last_slot is None or reading.ts > self._last_slot:
                self._slots.append(reading)
                self._last_slot = reading.ts

    def _half_hours(self, session: _Session, now: datetime) -> None:
        """The half-hour slots: the missed ones from the meter's history after an open (the link
        or the process was down), then the latest one (0xEA) once per half hour."""
        if self._history_due and now >= self._next_history:
            self._read_history(session, now)
        if now < self._next_fixed:
            return
        self._next_fixed = now + _FIXED_EVERY / 6  # retry in 5 min when it fails
        try:
            value = session.mo.get_cumulative_energy_measured_at_fixed_time()
        except (momonga.MomongaError, OSError) as exc:  # the next live request will tell
            logger.info("broute: no 30-minute energy this time: %s", exc)
            return
        stamp, energy = value.get("timestamp"), value.get("cumulative energy")
        kwh = session.normal.unwrap_past(energy) if isinstance(energy, int | float) else None
        if not isinstance(stamp, datetime) or kwh is None:
            return
        fixed_ts = stamp.replace(tzinfo=METER_TZ).astimezone(UTC)
        self._next_fixed = fixed_ts + _FIXED_EVERY + timedelta(minutes=1)
        if (self._last_slot is not None and fixed_ts - self._last_slot > SLOT
                and self._history_days > 0 and self._history_supported):
            self._read_history(session, now)  # a half hour went by unseen (a slow link)
        self._add_slots([slot_reading(self.source, fixed_ts, kwh)])

    def _read_history(self, session: _Session, now: datetime) -> None:
        """Read the missing half hours back from the meter's history (0xE5 + 0xE2), oldest day
        first. A meter without the history is logged once and never asked again."""
        if self._history_days < 1 or not self._history_supported:
            self._history_due = False
            return
        today = now.astimezone(METER_TZ).date()
        days = days_to_read(now, self._last_slot, self._history_days)
        before, count = self._last_slot, len(self._slots)
        for back in days:
            try:
                entries = session.mo.get_historical_cumulative_energy_1(day=back)
            except momonga.MomongaResponseNotPossible as exc:
                self._history_supported = self._history_due = False
                logger.warning("broute: the meter keeps no half-hour history (0xE2/0xE5: %s); "
                               "half hours missed while the link was down stay missing", exc)
                return
            except (momonga.MomongaError, OSError) as exc:
                logger.info("broute: no history this time (trying again in 5 min): %s", exc)
                self._next_history = now + _FIXED_EVERY / 6
                return
            if self._clock().astimezone(METER_TZ).date() != today:
                return  # midnight passed during the read: "days back" moved; next read again
            energies = [e.get("cumulative energy") for e in entries]
            self._add_slots(day_readings(
                self.source, today - timedelta(days=back),
                [v if isinstance(v, int | float) else None for v in energies], now=now,
                after=self._last_slot, unwrap=session.normal.unwrap_past))
        self._history_due = False
        logger.info("broute: read the half hours after %s back from the meter's history "
                    "(%d day(s)): %d slot(s)", before.isoformat() if before else "start-up",
                    len(days), len(self._slots) - count)
