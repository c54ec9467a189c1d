"""The gateway's delivery state machine, in memory: literal scenarios and random interleavings."""

from __future__ import annotations

from datetime import UTC, datetime

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from homeiot.core.batching import (
    Ack,
    Action,
    Connected,
    DeadLetter,
    DeadLettered,
    Disconnected,
    GatewayFlow,
    Letter,
    Message,
    Receipt,
    Received,
    Settled,
    Tick,
    Write,
    Written,
)

T = datetime(2025, 12, 16, tzinfo=UTC)


def point(mid: int) -> Message:
    return Message(mid, 1, "home/power/meter1", b"{}", T, line=f"m v={mid} {mid}", source="meter1",
                   seq=mid, ts=T)


def bad(mid: int) -> Message:
    return Message(mid, 1, "home/power/meter1", b"nope", T, rejection="not JSON")


def test_a_full_batch_is_written_then_acknowledged_in_arrival_order() -> None:
    flow = GatewayFlow(batch_size=3, batch_age_s=1.0)
    flow.handle(Connected())
    assert flow.handle(Received(point(5), 0.0)) == []
    assert flow.handle(Received(bad(6), 0.1)) == []
    assert flow.handle(Received(point(7), 0.2)) == [Write(1, ("m v=5 5", "m v=7 7"))]
    assert flow.pending == 3
    actions = flow.handle(Written(1))
    assert actions == [DeadLetter(1, (Letter("home/power/meter1", b"nope", "not JSON", T),))]
    assert flow.handle(DeadLettered(1)) == [Ack(5, 1), Ack(6, 1), Ack(7, 1),
                                            Receipt("meter1", ((5, 5), (7, 7))),
                                            Settled(1, (point(5), point(7)), 1, 0)]
    assert flow.pending == 0


def test_an_old_batch_is_closed_by_a_tick_and_refused_points_become_letters() -> None:
    flow = GatewayFlow(batch_size=100, batch_age_s=1.0)
    flow.handle(Received(point(1), 10.0))
    flow.handle(Received(point(2), 10.5))
    assert flow.handle(Tick(10.9)) == []
    assert flow.handle(Tick(11.0)) == [Write(1, ("m v=1 1", "m v=2 2"))]
    actions = flow.handle(Written(1, frozenset({"m v=2 2"}), reason="field type conflict"))
    assert actions == [DeadLetter(1, (Letter("home/power/meter1", b"{}",
                                             "InfluxDB refused the point: field type conflict",
                                             T),))]
    assert flow.handle(DeadLettered(1))[-1] == Settled(1, (point(1),), 1, 0)


def test_refused_without_naming_lines_sets_the_whole_batch_aside() -> None:
    flow = GatewayFlow(batch_size=2, batch_age_s=1.0)
    flow.handle(Received(point(1), 0))
    flow.handle(Received(point(2), 0))
    [letters] = flow.handle(Written(1, refused_unknown=True, reason="partial write"))
    assert isinstance(letters, DeadLetter)
    assert len(letters.letters) == 2


def test_a_batch_of_invalid_payloads_goes_straight_to_the_dead_letters() -> None:
    flow = GatewayFlow(batch_size=2, batch_age_s=1.0)
    flow.handle(Received(bad(1), 0))
    [action] = flow.handle(Received(bad(2), 0))
    assert isinstance(action, DeadLetter)


def test_a_receipt_names_dead_letters_only_once_they_are_stored() -> None:
    """A refused point and a rejected payload that still names its seq are dead letters; the
    receipt names them as dead (so the publisher stops resending), but only after DeadLettered.
    A payload without a readable seq cannot be named."""
    flow = GatewayFlow(batch_size=4, batch_age_s=1.0)
    old = Message(3, 1, "home/power/meter1", b'{"v":2,"seq":3}', T, source="meter1", seq=3,
                  rejection="v: unsupported schema version 2, expected 1")
    flow.handle(Received(point(1), 0))
    flow.handle(Received(point(2), 0))
    flow.handle(Received(old, 0))
    [write] = flow.handle(Received(bad(4), 0))
    assert write == Write(1, ("m v=1 1", "m v=2 2"))
    [letters] = flow.handle(Written(1, frozenset({"m v=2 2"}), reason="field type conflict"))
    assert isinstance(letters, DeadLetter)
    assert len(letters.letters) == 3
    assert flow.handle(DeadLettered(1)) == [
        Ack(1, 1), Ack(2, 1), Ack(3, 1), Ack(4, 1),
        Receipt("meter1", ((1, 1),), dead=((2, 3),)), Settled(1, (point(1),), 3, 0)]


def test_nothing_is_acknowledged_on_a_later_connection() -> None:
    flow = GatewayFlow(batch_size=2, batch_age_s=1.0)
    flow.handle(Connected())
    flow.handle(Received(point(1), 0))
    flow.handle(Disconnected())  # the drop alone voids the ack: no CONNACK needed
    flow.handle(Received(point(2), 0))  # (a message paho still delivers after the drop)
    assert flow.handle(Written(1)) == [Ack(2, 1), Receipt("meter1", ((1, 2),)),
                                       Settled(1, (point(1), point(2)), 0, 1)]


class GatewayMachine(RuleBasedStateMachine):
    """Random interleavings of messages, connection changes, ticks, write and letter answers.

    Invariants: an ack goes out only after the message's point was written or its letter stored,
    only on the connection that delivered it, and at most once; every message is settled or
    pending."""

    def __init__(self) -> None:
        super().__init__()
        self.flow = GatewayFlow(batch_size=4, batch_age_s=1.0)
        self.now = 0.0
        self.connection = 0  # our own count of connects and drops
        self.next_mid = 1
        self.received: dict[int, tuple[Message, int]] = {}  # mid → (message, connection)
        self.writing: dict[int, tuple[str, ...]] = {}
        self.lettering: dict[int, tuple[Letter, ...]] = {}
        self.written_lines: set[str] = set()
        self.stored_letters: set[bytes] = set()
        self.acked: set[int] = set()
        self.settled: set[int] = set()
        self.settled_messages = 0
        self.left_to_broker = 0

    def _run(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, Write):
                self.writing[action.batch_id] = action.lines
            elif isinstance(action, DeadLetter):
                self.lettering[action.batch_id] = action.letters
            elif isinstance(action, Ack):
                message, connection = self.received[action.mid]
                assert action.mid not in self.acked, "acknowledged twice"
                assert connection == self.connection, "acknowledged on a later connection"
                if message.line is not None:
                    assert message.line in self.written_lines or message.payload in \
                        self.stored_letters, "acknowledged before its point was written"
                else:
                    assert message.payload in self.stored_letters, "acked before its letter"
                self.acked.add(action.mid)
            elif isinstance(action, Receipt):
                for low, high in action.ranges:
                    for seq in range(low, high + 1):
                        line = f"m v={seq} {seq}"
                        assert line in self.written_lines, "a receipt for a point not written"
                for low, high in action.dead:
                    for seq in range(low, high + 1):
                        assert f"payload-{seq}".encode() in self.stored_letters, \
                            "a receipt names a dead letter not stored"
            elif isinstance(action, Settled):
                assert action.batch_id not in self.settled
                self.settled.add(action.batch_id)
                self.settled_messages += len(action.stored) + action.dead
                self.left_to_broker += action.unacked

    @rule(valid=st.booleans(), named=st.booleans())
    def receive(self, valid: bool, named: bool) -> None:
        mid = self.next_mid
        self.next_mid += 1
        payload = f"payload-{mid}".encode()
        message = (Message(mid, 1, "t/m", payload, T, line=f"m v={mid} {mid}", source="m",
                           seq=mid, ts=T) if valid
                   else Message(mid, 1, "t/m", payload, T, source="m" if named else None,
                                seq=mid if named else None, rejection="bad"))
        self.received[mid] = (message, self.connection)
        self._run(self.flow.handle(Received(message, self.now)))

    @rule()
    def connection_changes(self) -> None:
        self.connection += 1
        self._run(self.flow.handle(Disconnected() if self.connection % 2 else Connected()))

    @rule(seconds=st.floats(0, 2), flush=st.booleans())
    def tick(self, seconds: float, flush: bool) -> None:
        self.now += seconds
        self._run(self.flow.handle(Tick(self.now, flush)))

    @precondition(lambda self: self.writing)
    @rule(data=st.data(), refuse=st.sampled_from(["none", "some", "unknown"]))
    def written(self, data: st.DataObject, refuse: str) -> None:
        batch_id = data.draw(st.sampled_from(sorted(self.writing)))
        lines = self.writing.pop(batch_id)
        refused = frozenset(lines[:1]) if refuse == "some" else frozenset()
        self.written_lines |= set(lines) - refused if refuse != "unknown" else set()
        self._run(self.flow.handle(Written(batch_id, refused, refuse == "unknown", "why")))

    @precondition(lambda self: self.lettering)
    @rule(data=st.data())
    def dead_lettered(self, data: st.DataObject) -> None:
        batch_id = data.draw(st.sampled_from(sorted(self.lettering)))
        self.stored_letters |= {lt.payload for lt in self.lettering.pop(batch_id)}
        self._run(self.flow.handle(DeadLettered(batch_id)))

    @invariant()
    def every_message_is_pending_acked_or_left_to_the_broker(self) -> None:
        assert len(self.received) - self.flow.pending == self.settled_messages
        assert self.settled_messages == len(self.acked) + self.left_to_broker


GatewayMachine.TestCase.settings = settings(max_examples=200, stateful_step_count=60,
                                            deadline=None)
TestGatewayMachine = GatewayMachine.TestCase
