"""The B-route link's recovery ladder: a pure state machine, events in, actions out.

A smart meter link fails in a few ways that look alike from the outside: the meter stops answering,
the PANA session dies without an event, the dongle goes silent, the serial device vanishes. The
cure gets heavier step by step, and each step is tried before the next:

1. **re-request** — one unanswered request is not a dead link; ask again at the next read;
2. **rejoin** — after ``max_misses`` requests in a row without a valid answer (or ``dead_after_s``
   without one), close the session and open a new one (scan + PANA join, no ``SKRESET``);
3. **reset** — reset the dongle (``SKRESET``) and reopen the serial port;
4. **exit** — give up: the process exits non-zero and systemd starts it again.

A lost session (an event, a dead receiver) skips step 1; a serial device that is gone skips to
step 3 (only reopening the port can help). Failed open attempts are spaced by a doubling backoff
(``backoff_min_s`` → ``backoff_max_s``) on top of the time the attempt itself took (a scan can take
about two minutes, a join about one: the adapter bounds both). One valid answer resets the ladder.

No I/O and no clock: the adapter passes monotonic times in and carries the actions out.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


class Failure(Enum):
    """Why a request or an open attempt failed."""

    TIMEOUT = "no answer in time"
    ERROR = "an answer that could not be used"
    SESSION_LOST = "the session was lost"
    DEVICE_GONE = "the serial device is gone"


class Step(Enum):
    """The rung of the ladder the link is on."""

    OK = "ok"
    REREQUEST = "re-request"
    REJOIN = "rejoin"
    RESET = "reset"
    EXIT = "exit"


@dataclass(frozen=True, slots=True)
class LinkPolicy:
    """How patient the ladder is. Validated at construction."""

    max_misses: int = 2
    dead_after_s: float = 90.0
    rejoin_attempts: int = 1
    reset_attempts: int = 3
    backoff_min_s: float = 10.0
    backoff_max_s: float = 300.0

    def __post_init__(self) -> None:
        if self.max_misses < 1:
            raise ValueError(f"max_misses must be 1 or more, got {self.max_misses}")
        if self.dead_after_s <= 0:
            raise ValueError(f"dead_after_s must be positive, got {self.dead_after_s}")
        if self.rejoin_attempts < 0 or self.reset_attempts < 1:
            raise ValueError("rejoin_attempts must be 0 or more and reset_attempts 1 or more")
        if not 0 <= self.backoff_min_s <= self.backoff_max_s:
            raise ValueError("backoff_min_s must be between 0 and backoff_max_s")


# --- events -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RequestOk:
    """The meter gave a valid answer."""

    at: float


@dataclass(frozen=True, slots=True)
class RequestFailed:
    """A request got no valid answer."""

    at: float
    failure: Failure
    reason: str


@dataclass(frozen=True, slots=True)
class OpenOk:
    """A session was opened (after a rejoin or a reset)."""

    at: float


@dataclass(frozen=True, slots=True)
class OpenFailed:
    """An open attempt failed."""

    at: float
    failure: Failure
    reason: str


Event = RequestOk | RequestFailed | OpenOk | OpenFailed


# --- actions ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Action:
    """What the adapter does next.

    ``step`` OK and REREQUEST: request at the next read. REJOIN / RESET: open a session (without /
    with ``SKRESET``), not before ``not_before`` (monotonic seconds). EXIT: stop the process.
    ``announce`` is true the first time a step is entered, so each step is logged once.
    """

    step: Step
    reason: str = ""
    not_before: float = 0.0
    announce: bool = False


@dataclass
class LinkMachine:
    """The ladder. Feed it :data:`Event` s with :meth:`handle`; it answers with an :class:`Action`."""

    policy: LinkPolicy = field(default_factory=LinkPolicy)
    action: Action = field(default_factory=lambda: Action(Step.OK))
    misses: int = 0
    last_ok: float | None = None
    recoveries: int = 0  # recovery steps taken since the last valid answer
    _alive_since: float | None = None  # the last valid answer or the last session opened
    _delay: float = 0.0

    @property
    def ladder(self) -> tuple[Step, ...]:
        """The recovery steps in the order they are tried."""
        p = self.policy
        return (Step.REJOIN,) * p.rejoin_attempts + (Step.RESET,) * p.reset_attempts + (Step.EXIT,)

    def handle(self, event: Event) -> Action:
        """Feed one event; returns (and keeps in :attr:`action`) what to do next."""
        if isinstance(event, RequestOk):
            healed = self.action.step is not Step.OK or self.recoveries > 0
            self.misses, self.last_ok, self.recoveries = 0, event.at, 0
            self._alive_since = event.at
            self._delay = self.policy.backoff_min_s
            reason = "the meter answers again" if healed else ""
            return self._set(Action(Step.OK, reason, event.at, announce=healed))
        if isinstance(event, OpenOk):
            # A fresh session gets its own misses and time; the ladder stays where it is until a
            # valid answer proves the link works.
            self.misses, self._alive_since = 0, event.at
            return self._set(Action(Step.OK, "session open", event.at, announce=False))
        if isinstance(event, RequestFailed):
            return self._request_failed(event)
        return self._open_failed(event)

    def _request_failed(self, event: RequestFailed) -> Action:
        if event.failure is Failure.DEVICE_GONE:
            return self._recover(event.at, f"{event.failure.value}: {event.reason}", skip_rejoin=True,
                                 now=True)
        if event.failure is Failure.SESSION_LOST:
            return self._recover(event.at, f"{event.failure.value}: {event.reason}", now=True)
        self.misses += 1
        silent_for = None if self._alive_since is None else event.at - self._alive_since
        if self.misses >= self.policy.max_misses or (
                silent_for is not None and silent_for >= self.policy.dead_after_s):
            since = "" if silent_for is None else f" in {silent_for:.0f} s"
            return self._recover(event.at, f"no valid answer for {self.misses} request(s){since} "
                                           f"(last: {event.reason})", now=True)
        announce = self.action.step is not Step.REREQUEST
        return self._set(Action(Step.REREQUEST, f"{event.failure.value}: {event.reason}", event.at,
                                announce=announce))

    def _open_failed(self, event: OpenFailed) -> Action:
        reason = f"the {self.action.step.value} failed: {event.failure.value}: {event.reason}"
        return self._recover(event.at, reason,
                             skip_rejoin=event.failure is Failure.DEVICE_GONE, now=False)

    def _recover(self, at: float, reason: str, *, skip_rejoin: bool = False, now: bool) -> Action:
        ladder = self.ladder
        index = min(self.recoveries, len(ladder) - 1)
        if skip_rejoin and ladder[index] is Step.REJOIN:
            index = ladder.index(Step.RESET)
        step = ladder[index]
        self.recoveries = index + 1
        self.misses = 0
        if now:  # first attempt after a detection: at once
            not_before = at
        else:  # after a failed attempt: back off, doubling
            self._delay = min(self.policy.backoff_max_s, max(self._delay, self.policy.backoff_min_s))
            not_before = at + self._delay
            self._delay = min(self.policy.backoff_max_s, self._delay * 2)
        return self._set(Action(step, reason, not_before, announce=True))

    def _set(self, action: Action) -> Action:
        self.action = action
        return action


@dataclass(frozen=True, slots=True)
class LinkTiming:
    """Bounds on every exchange with the dongle, in seconds (the adapter enforces them).

    A request waits at most ``request_timeout_s`` to be transmitted and ``answer_timeout_s`` for
    the meter's answer to each of its ``request_retries`` transmissions. An open attempt (probe,
    optional ``SKRESET``, PAN scan, PANA join, the unit properties) is abandoned after
    ``scan_timeout_s + join_timeout_s`` plus three request bounds; closing after
    ``close_timeout_s``; the liveness probe of the serial device after ``probe_timeout_s``.
    """

    request_timeout_s: float = 15.0
    answer_timeout_s: float = 8.0
    request_retries: int = 2
    scan_timeout_s: float = 120.0
    join_timeout_s: float = 60.0
    close_timeout_s: float = 10.0
    probe_timeout_s: float = 5.0

    def __post_init__(self) -> None:
        for name in ("request_timeout_s", "answer_timeout_s", "scan_timeout_s", "join_timeout_s",
                     "close_timeout_s", "probe_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.request_retries < 1:
            raise ValueError(f"request_retries must be 1 or more, got {self.request_retries}")

    @property
    def request_bound_s(self) -> float:
        """The longest one request can take (transmit budget + every answer wait)."""
        return self.request_timeout_s + self.request_retries * self.answer_timeout_s

    @property
    def open_bound_s(self) -> float:
        """The longest one open attempt may take before it is abandoned."""
        return self.probe_timeout_s + self.scan_timeout_s + self.join_timeout_s \
            + 3 * self.request_bound_s
