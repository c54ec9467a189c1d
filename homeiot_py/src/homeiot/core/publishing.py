"""The publisher's delivery state machine: which outbox rows may be deleted, which resent.

Pure, h11-style: the publisher's shell (paho, threads, the SQLite outbox) feeds it events and
carries out the actions it hands back; it does no I/O and reads no clock (times come in events).

A row is *in flight* once paho took it (``Published``, with paho's message id). Its PUBACK
(``PubAck``) only says what the broker did with it: a good one makes the row *await its receipt*;
a refusal (a failure reason code such as 0x87 "not authorized", or 0x10 "no matching
subscribers") makes it *refused*: resent after a backoff, the refusal reported once per change of
reason. Only a receipt from the gateway (``Stored``: InfluxDB holds these seqs of this source, or
its dead-letter store does, see :mod:`homeiot.core.receipts`) deletes a row. Rows are known by
``(source, seq)``: seqs are numbered per source, and the outbox may hold rows of a source the
publisher was renamed from, so a receipt for one source never deletes another's row. A row whose
receipt does not come within ``receipt_timeout_s`` is resent, the timeout doubling each time up to
``receipt_timeout_max_s`` (the receipt may have been lost, or the gateway may be away: InfluxDB
overwrites a point with the same series and time, so a resend never duplicates a row).

Messages paho still holds across a reconnect keep their message ids (paho resends them itself),
so a PUBACK always names the row it was sent for.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from homeiot.core.receipts import Ranges, contains, to_ranges
from homeiot.core.topics import topic_for

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
    """paho took outbox row ``row_id`` (reading ``seq`` of ``source``) for sending, as message
    ``mid``."""

    row_id: int
    source: str
    seq: int
    mid: int
    at: float


@dataclass(frozen=True, slots=True)
class Stored:
    """A receipt for ``source``: InfluxDB holds its readings with seqs ``ranges``, the gateway's
    dead-letter store those with seqs ``dead`` (inclusive ranges)."""

    source: str
    ranges: Ranges
    dead: Ranges = ()


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


Event = Connected | Disconnected | Published | PubAck | Stored | Gone | Tick


# --- actions ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Delete:
    """Delete these outbox rows: InfluxDB stored their readings."""

    row_ids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Resend:
    """Publish these outbox rows again (each is answered by a new ``Published``)."""

    row_ids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class SetAside:
    """The gateway set these readings of ``source`` aside as dead letters (they are deleted
    here too, by the ``Delete`` that follows); log at WARNING."""

    source: str
    seqs: Ranges


@dataclass(frozen=True, slots=True)
class Alarm:
    """Something refuses our readings; log at ERROR (once per change, the machine sees to it)."""

    message: str


@dataclass(frozen=True, slots=True)
class Recovered:
    """What the last alarm was about is over; log at INFO."""

    message: str


Action = Delete | Resend | SetAside | Alarm | Recovered

Key = tuple[str, int]  # (source, seq): what a receipt names


@dataclass(slots=True)
class _Waiting:
    key: Key
    due: float
    timeout: float


@dataclass
class PublisherFlow:
    """See the module docstring. ``base_topic`` (``MQTT_TOPIC``) only names topics in reports;
    ``window`` bounds the messages awaiting a PUBACK, ``unreceipted_max`` every row sent and not
    yet receipted."""

    base_topic: str
    window: int
    unreceipted_max: int = 10_000
    receipt_timeout_s: float = 30.0
    receipt_timeout_max_s: float = 600.0
    _in_flight: dict[int, tuple[int, Key]] = field(default_factory=dict)  # mid → (row id, key)
    _waiting: dict[int, _Waiting] = field(default_factory=dict)  # row id → its receipt's wait
    _refused: dict[int, Key] = field(default_factory=dict)  # row id → key, waiting for a retry
    _timeouts: dict[int, float] = field(default_factory=dict)  # row id → next receipt timeout
    _retry_at: float = 0.0
    _retry_delay: float = RETRY_MIN_S
    _refusals: dict[str, str] = field(default_factory=dict)  # topic → the broker's refusal
    _topics: dict[str, str] = field(default_factory=dict)  # source → its topic (validated once)
    _scan_at: float = 0.0  # no receipt is due before then (saves scanning every tick)
    _no_receipts: bool = False  # alarmed that receipts stopped coming
    _now: float | None = None  # the latest time seen
    _receipt_at: float | None = None  # when the latest receipt came (or when we started)

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    @property
    def unreceipted(self) -> int:
        """Rows sent (or refused) in this run whose receipt has not come."""
        return len(self._in_flight) + len(self._waiting) + len(self._refused)

    @property
    def room(self) -> int:
        """How many more rows may be published now."""
        return max(0, min(self.window - len(self._in_flight),
                          self.unreceipted_max - self.unreceipted))

    @property
    def holding(self) -> frozenset[int]:
        """Rows sent, awaiting their receipt or a retry: a backlog scan must skip them."""
        return (frozenset(row for row, _ in self._in_flight.values()) | frozenset(self._waiting)
                | frozenset(self._refused))

    @property
    def refusals(self) -> dict[str, str]:
        """The broker's current refusals, by topic."""
        return dict(self._refusals)

    def handle(self, event: Event) -> list[Action]:
        """Feed one event; returns what to do, in order."""
        match event:
            case Published(row_id, source, seq, mid, _):
                self._in_flight[mid] = (row_id, (source, seq))
                self._refused.pop(row_id, None)
                self._waiting.pop(row_id, None)
                return []
            case PubAck():
                return self._pub_ack(event)
            case Stored():
                return self._stored(event)
            case Tick(at):
                return self._tick(at)
            case Gone(row_id):
                self._refused.pop(row_id, None)
                self._waiting.pop(row_id, None)
                self._timeouts.pop(row_id, None)
                return []
            case Connected() | Disconnected():
                return []
        raise TypeError(f"not a publisher event: {event!r}")

    def _pub_ack(self, ack: PubAck) -> list[Action]:
        entry = self._in_flight.pop(ack.mid, None)
        if entry is None:  # a message id we never sent (or already receipted): nothing to do
            return []
        row_id, key = entry
        topic = self._topics.get(key[0]) or self._topics.setdefault(
            key[0], topic_for(self.base_topic, key[0]))
        if delivered(ack.reason):
            timeout = self._timeouts.get(row_id, self.receipt_timeout_s)
            self._waiting[row_id] = _Waiting(key, ack.at + timeout, timeout)
            self._scan_at = min(self._scan_at, ack.at + timeout)
            # Per topic: readings of a former source may be refused while the current one's
            # are taken; one's success neither ends the other's alarm nor its backoff.
            if self._refusals.pop(topic, None) is None:
                return []
            self._retry_delay = RETRY_MIN_S
            self._retry_at = 0.0  # what it refused goes out again at once
            return [Recovered(f"the broker accepts readings on topic {topic} again")]
        self._refused[row_id] = key
        reason = f"{ack.reason_text} (0x{ack.reason:02x})"
        if ack.at >= self._retry_at:  # refusals of live readings meanwhile do not push it back
            self._retry_at = ack.at + self._retry_delay
        if self._refusals.get(topic) == reason:
            return []
        self._refusals[topic] = reason
        return [Alarm(f"the broker refused readings on topic {topic}: {ack.reason_text} "
                      f"(0x{ack.reason:02x}); they stay in the outbox and are resent with "
                      "backoff")]

    def _stored(self, receipt: Stored) -> list[Action]:
        def named(key: Key) -> bool:
            return key[0] == receipt.source and (contains(receipt.ranges, key[1])
                                                 or contains(receipt.dead, key[1]))

        rows = {row: w.key for row, w in self._waiting.items() if named(w.key)}
        rows |= {row: key for row, key in self._refused.items() if named(key)}
        for mid, (row, key) in list(self._in_flight.items()):
            if named(key):  # the receipt overtook our PUBACK (an earlier send was stored)
                rows[row] = key
                del self._in_flight[mid]
        for row in rows:
            self._waiting.pop(row, None)
            self._refused.pop(row, None)
            self._timeouts.pop(row, None)
        actions: list[Action] = []
        dead = [seq for _, seq in rows.values() if contains(receipt.dead, seq)
                and not contains(receipt.ranges, seq)]
        if dead:
            actions.append(SetAside(receipt.source, to_ranges(dead)))
        if rows:
            actions.append(Delete(tuple(sorted(rows))))
        self._receipt_at = self._now
        if self._no_receipts:
            self._no_receipts = False
            actions.append(Recovered("receipts from the gateway arrive again"))
        return actions

    def _tick(self, at: float) -> list[Action]:
        self._now = at
        if self._receipt_at is None:
            self._receipt_at = at
        room = self.window - len(self._in_flight)
        due: list[int] = []
        if self._refused and at >= self._retry_at:
            due = sorted(self._refused)[:room]
            if due:
                # Until published again they still count as refused (holding); a Published moves
                # each to the in-flight set.
                self._retry_delay = min(RETRY_MAX_S, self._retry_delay * 2)
                self._retry_at = at + self._retry_delay
        late: list[int] = []
        if at >= self._scan_at:
            late = sorted(row for row, w in self._waiting.items() if w.due <= at)[:room - len(due)]
        for row in late:
            wait = self._waiting[row]
            wait.timeout = min(self.receipt_timeout_max_s, wait.timeout * 2)
            wait.due = at + wait.timeout  # not again before then, even if it cannot go out now
            self._timeouts[row] = wait.timeout
        if at >= self._scan_at:
            self._scan_at = min((w.due for w in self._waiting.values()), default=at + 1.0)
        actions: list[Action] = []
        silent = at - self._receipt_at >= 8 * self.receipt_timeout_s
        if not self._no_receipts and silent and \
                any(self._waiting[row].timeout >= 8 * self.receipt_timeout_s for row in late):
            self._no_receipts = True
            actions.append(Alarm(
                "no receipt from the gateway for readings resent 3 times; they stay in the outbox "
                "and are resent. Is the gateway running and storing, and may it write the "
                "receipt topic (the broker's ACL)?"))
        due += late
        return [*actions, Resend(tuple(due))] if due else actions
