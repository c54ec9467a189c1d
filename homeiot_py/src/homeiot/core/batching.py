"""The gateway's delivery state machine: batches, writes, dead letters and MQTT acknowledgements.

Pure, h11-style: the gateway's shell (paho's network thread, the writer thread, InfluxDB, the
dead-letter store) feeds it events and carries out the actions it hands back, in order.

Each received message is collected into the open batch; a full batch (``batch_size``) or an old one
(``batch_age_s``, on a ``Tick``) becomes a ``Write`` of its points. When InfluxDB accepted it
(``Written``, possibly refusing some lines), the messages it could not store — invalid payloads
and refused points — become one ``DeadLetter``; once that is durable (``DeadLettered``) or if there
is none, the batch's messages are acknowledged in arrival order (``Ack``) and each source is told
which of its seqs InfluxDB now holds and which are durably set aside as dead letters (``Receipt``,
see :mod:`homeiot.core.receipts`), so the publisher deletes both instead of resending a dead
letter for ever. Nothing is acknowledged before its point is written or its letter stored; a
receipt names as stored only points InfluxDB accepted, as dead only letters the store committed.

Acknowledgements belong to a connection: a message id is only meaningful on the connection that
delivered it (the broker reuses ids, and resends unacknowledged messages after a reconnect). The
connection generation changes on every connect *and* disconnect, so an ack never goes out for a
message of an earlier connection — not even in the window between a drop and the next CONNACK.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import NamedTuple

from homeiot.core.receipts import Ranges, to_ranges


class Message(NamedTuple):
    """One MQTT message and what ingesting it produced: a line-protocol point, or a rejection.
    (A named tuple, as :class:`Received`: one of each is made per message on paho's thread, and
    a frozen dataclass of ten fields costs five times as much to build.)"""

    mid: int
    qos: int
    topic: str
    payload: bytes
    received_at: datetime
    line: str | None = None
    source: str | None = None
    seq: int | None = None
    ts: datetime | None = None
    rejection: str | None = None


@dataclass(frozen=True, slots=True)
class Letter:
    """A message set aside, and why."""

    topic: str
    payload: bytes
    error: str
    received_at: datetime


# --- events ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Connected:
    """The broker accepted our connection."""


@dataclass(frozen=True, slots=True)
class Disconnected:
    """The connection is gone (acks for its messages are void)."""


class Received(NamedTuple):
    """A message arrived at ``at`` (monotonic seconds)."""

    message: Message
    at: float


@dataclass(frozen=True, slots=True)
class Tick:
    """Time passed; ``flush`` closes the open batch whatever its age (shutting down)."""

    at: float
    flush: bool = False


@dataclass(frozen=True, slots=True)
class Written:
    """InfluxDB accepted batch ``batch_id``, except ``refused`` lines (``reason`` says why).

    ``refused_unknown`` means it refused some lines without saying which (e.g. a field type
    conflict in 1.x): every point of the batch is then set aside, since replaying is harmless.
    """

    batch_id: int
    refused: frozenset[str] = frozenset()
    refused_unknown: bool = False
    reason: str = ""


@dataclass(frozen=True, slots=True)
class DeadLettered:
    """The letters of batch ``batch_id`` are durably stored."""

    batch_id: int


Event = Connected | Disconnected | Received | Tick | Written | DeadLettered


# --- actions ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Write:
    """Write these points to InfluxDB; answer with ``Written`` (the shell retries failures)."""

    batch_id: int
    lines: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """Store these letters durably; answer with ``DeadLettered``."""

    batch_id: int
    letters: tuple[Letter, ...]


class Ack(NamedTuple):
    """Acknowledge MQTT message ``mid`` (QoS ``qos``) on the current connection. (A named tuple:
    one per message.)"""

    mid: int
    qos: int


@dataclass(frozen=True, slots=True)
class Receipt:
    """Tell ``source`` that InfluxDB stored its readings with seqs ``ranges`` and that those with
    seqs ``dead`` are dead letters (end-to-end ack)."""

    source: str
    ranges: Ranges
    dead: Ranges = ()


@dataclass(frozen=True, slots=True)
class Settled:
    """Batch ``batch_id`` is finished: ``stored`` were written, ``dead`` set aside, ``unacked``
    of them belonged to an earlier connection (the broker delivers those again)."""

    batch_id: int
    stored: tuple[Message, ...]
    dead: int
    unacked: int


Action = Write | DeadLetter | Ack | Receipt | Settled


@dataclass(slots=True)
class _Batch:
    id: int
    messages: list[tuple[Message, int]]  # (message, connection generation)
    started: float
    stored: tuple[Message, ...] = ()
    dead: tuple[Message, ...] = ()


@dataclass
class GatewayFlow:
    """See the module docstring."""

    batch_size: int
    batch_age_s: float
    generation: int = 0
    _open: _Batch | None = None
    _busy: dict[int, _Batch] = field(default_factory=dict)  # written or being dead-lettered
    _next_id: int = 1

    @property
    def pending(self) -> int:
        """Messages received and not yet settled."""
        return sum(len(b.messages) for b in self._busy.values()) + (
            len(self._open.messages) if self._open else 0)

    def pending_by_source(self) -> dict[str, int]:
        """Messages not yet settled, per source (``?`` for those without one)."""
        counts: dict[str, int] = {}
        batches = [*self._busy.values(), *([self._open] if self._open else [])]
        for batch in batches:
            for message, _ in batch.messages:
                key = message.source or "?"
                counts[key] = counts.get(key, 0) + 1
        return counts

    def handle(self, event: Event) -> list[Action]:
        """Feed one event; returns what to do, in order."""
        match event:
            case Received(message, at):  # first: once per message
                if self._open is None:
                    self._open = _Batch(self._next_id, [], at)
                    self._next_id += 1
                self._open.messages.append((message, self.generation))
                full = len(self._open.messages) >= self.batch_size
                return self._close() if full else []
            case Connected() | Disconnected():
                self.generation += 1
                return []
            case Tick(at, flush):
                due = self._open is not None and (flush or at - self._open.started
                                                  >= self.batch_age_s)
                return self._close() if due else []
            case Written():
                return self._written(event)
            case DeadLettered(batch_id):
                return self._settle(self._busy[batch_id])
        raise TypeError(f"not a gateway event: {event!r}")

    def _close(self) -> list[Action]:
        batch, self._open = self._open, None
        if batch is None:
            return []
        self._busy[batch.id] = batch
        lines = tuple(m.line for m, _ in batch.messages if m.line is not None)
        if lines:
            return [Write(batch.id, lines)]
        return self._letters(batch, [m for m, _ in batch.messages if m.rejection is not None], [])

    def _written(self, event: Written) -> list[Action]:
        batch = self._busy[event.batch_id]
        stored: list[Message] = []
        rejected: list[Message] = []
        refused: list[Message] = []
        for message, _ in batch.messages:
            if message.line is None:
                rejected.append(message)
            elif event.refused_unknown or message.line in event.refused:
                refused.append(message)
            else:
                stored.append(message)
        batch.stored = tuple(stored)
        return self._letters(batch, rejected, refused, event.reason)

    def _letters(self, batch: _Batch, rejected: list[Message], refused: list[Message],
                 reason: str = "") -> list[Action]:
        letters = [Letter(m.topic, m.payload, m.rejection or "", m.received_at) for m in rejected]
        letters += [Letter(m.topic, m.payload, f"InfluxDB refused the point: {reason}",
                           m.received_at) for m in refused]
        batch.dead = (*rejected, *refused)
        if letters:
            return [DeadLetter(batch.id, tuple(letters))]
        return self._settle(batch)

    def _settle(self, batch: _Batch) -> list[Action]:
        del self._busy[batch.id]
        acks: list[Action] = [Ack(m.mid, m.qos) for m, generation in batch.messages
                              if generation == self.generation]
        stored: dict[str, list[int]] = {}
        dead: dict[str, list[int]] = {}
        for seqs, messages in ((stored, batch.stored), (dead, batch.dead)):
            for m in messages:
                if m.source is not None and m.seq is not None:
                    seqs.setdefault(m.source, []).append(m.seq)
        receipts = [Receipt(source, to_ranges(stored.get(source, ())),
                            to_ranges(dead.get(source, ())))
                    for source in sorted(stored.keys() | dead.keys())]
        return [*acks, *receipts, Settled(batch.id, batch.stored, len(batch.dead),
                                          len(batch.messages) - len(acks))]
