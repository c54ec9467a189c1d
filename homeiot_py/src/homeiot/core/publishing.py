"""The publisher's delivery state machine: which outbox rows may be deleted, which resent.

Pure, h11-style: the publisher's shell (paho, threads, the SQLite outbox) feeds it events and
carries out the actions it hands back; it does no I/O and reads no clock (times come in events).

A row is *sent* when paho took it (``Published``, with paho's message id). Its PUBACK
(``PubAck``) either says the broker took it for its subscribers — the row is then deleted — or
refuses it (a failure reason code such as 0x87 "not authorized", or 0x10 "no matching
subscribers"): the row stays, is resent after a backoff, and the refusal is reported once per
change of reason. Messages paho still holds across a reconnect keep their message ids (paho
resends them itself), so a PUBACK always names the row it was sent for.
"""

from __future__ import annotations

from dataclasses import dataclass, field

#: PUBACK reason code 0x10: the broker accepted the message but nobody subscribes to the topic.
NO_MATCHING_SUBSCRIBERS = 0x10

RETRY_MIN_S = 1.0
RETRY_MAX_S = 60.0


def delivered(reason: int) -> bool:
    """Whether a PUBACK reason code means the broker took the message for its subscribers."""
    return reason < 0x80 and reason != NO_MATCHING_SUBSCRIBERS


# --- events ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Connected:
    """The broker accepted our connection."""


@dataclass(frozen=True, slots=True)
class Disconnected:
    """The connection was lost (or refused)."""


@dataclass(frozen=True, slots=True)
class Published:
    """paho took outbox row ``row_id`` for sending, as message ``mid``."""

    row_id: int
    mid: int


@dataclass(frozen=True, slots=True)
class PubAck:
    """The broker answered message ``mid`` with ``reason`` (an MQTT v5 reason code)."""

    mid: int
    reason: int
    reason_text: str
    at: float


@dataclass(frozen=True, slots=True)
class Gone:
    """Outbox row ``row_id`` no longer exists (pruned by the outbox's bounds)."""

    row_id: int


@dataclass(frozen=True, slots=True)
class Tick:
    """Time passed (monotonic seconds)."""

    at: float


Event = Connected | Disconnected | Published | PubAck | Gone | Tick


# --- actions ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Delete:
    """Delete these outbox rows: their readings were delivered."""

    row_ids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Resend:
    """Publish these outbox rows again (each is answered by a new ``Published``)."""

    row_ids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Alarm:
    """Something refuses our readings; log at ERROR (once per change, the machine sees to it)."""

    message: str


@dataclass(frozen=True, slots=True)
class Recovered:
    """What the last alarm was about is over; log at INFO."""

    message: str


Action = Delete | Resend | Alarm | Recovered


@dataclass
class PublisherFlow:
    """See the module docstring. ``topic`` only names the topic in reports; ``window`` bounds the
    messages in flight."""

    topic: str
    window: int
    _in_flight: dict[int, int] = field(default_factory=dict)  # mid → row id
    _refused: set[int] = field(default_factory=set)  # row ids waiting for their retry
    _retry_at: float = 0.0
    _retry_delay: float = RETRY_MIN_S
    _refusal: str | None = None

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    @property
    def room(self) -> int:
        """How many more rows may be published now."""
        return max(0, self.window - len(self._in_flight))

    @property
    def holding(self) -> frozenset[int]:
        """Rows sent or waiting for a retry: a backlog scan must skip them."""
        return frozenset(self._in_flight.values()) | frozenset(self._refused)

    @property
    def refusal(self) -> str | None:
        """The broker's current refusal, if any."""
        return self._refusal

    def handle(self, event: Event) -> list[Action]:
        """Feed one event; returns what to do, in order."""
        match event:
            case Published(row_id, mid):
                self._in_flight[mid] = row_id
                self._refused.discard(row_id)
                return []
            case PubAck():
                return self._pub_ack(event)
            case Tick(at):
                return self._tick(at)
            case Gone(row_id):
                self._refused.discard(row_id)
                return []
            case Connected() | Disconnected():
                return []
        raise TypeError(f"not a publisher event: {event!r}")

    def _pub_ack(self, ack: PubAck) -> list[Action]:
        row_id = self._in_flight.pop(ack.mid, None)
        if row_id is None:  # a message id we never sent (or already settled): nothing to do
            return []
        if delivered(ack.reason):
            actions: list[Action] = [Delete((row_id,))]
            if self._refusal is not None:
                actions.append(Recovered(f"the broker accepts readings on topic {self.topic} "
                                         "again"))
                self._refusal = None
                self._retry_delay = RETRY_MIN_S
                self._retry_at = 0.0  # what it refused goes out again at once
            return actions
        self._refused.add(row_id)
        reason = f"{ack.reason_text} (0x{ack.reason:02x})"
        if ack.at >= self._retry_at:  # refusals of live readings meanwhile do not push it back
            self._retry_at = ack.at + self._retry_delay
        if reason == self._refusal:
            return []
        self._refusal = reason
        return [Alarm(f"the broker refused readings on topic {self.topic}: {reason}; they stay "
                      "in the outbox and are resent with backoff")]

    def _tick(self, at: float) -> list[Action]:
        if not self._refused or at < self._retry_at:
            return []
        due = tuple(sorted(self._refused)[:self.room])
        if not due:
            return []
        # Until they are published again they still count as refused (holding); a Published
        # moves each to the in-flight set.
        self._retry_delay = min(RETRY_MAX_S, self._retry_delay * 2)
        self._retry_at = at + self._retry_delay
        return [Resend(due)]
