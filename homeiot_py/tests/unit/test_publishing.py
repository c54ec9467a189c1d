"""The publisher's delivery state machine, in memory: literal scenarios and random interleavings."""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from homeiot.core.publishing import (
    Action,
    Alarm,
    Delete,
    Gone,
    PubAck,
    Published,
    PublisherFlow,
    Recovered,
    Resend,
    Tick,
    delivered,
)

TOPIC = "home/power/meter9"


def test_reason_codes() -> None:
    assert delivered(0x00)
    assert not delivered(0x10)  # no matching subscribers: nobody will get it
    assert not delivered(0x87)  # not authorized
    assert not delivered(0x97)  # quota exceeded


def test_a_refused_reading_is_kept_reported_once_and_resent_with_backoff() -> None:
    flow = PublisherFlow(TOPIC, window=10)
    flow.handle(Published(1, mid=11))
    flow.handle(Published(2, mid=12))
    first = flow.handle(PubAck(11, 0x87, "Not authorized", at=100.0))
    assert first == [Alarm("the broker refused readings on topic home/power/meter9: Not authorized"
                           " (0x87); they stay in the outbox and are resent with backoff")]
    assert flow.handle(PubAck(12, 0x87, "Not authorized", at=100.1)) == []  # once per change
    assert flow.holding == {1, 2}
    assert flow.handle(Tick(100.5)) == []
    assert flow.handle(Tick(101.0)) == [Resend((1, 2))]
    assert flow.handle(Tick(101.5)) == []  # not twice
    flow.handle(Published(1, mid=13))
    flow.handle(Published(2, mid=14))
    assert flow.handle(PubAck(13, 0x87, "Not authorized", at=101.2)) == []
    assert flow.handle(PubAck(14, 0x10, "No matching subscribers", at=101.2)) == [
        Alarm("the broker refused readings on topic home/power/meter9: No matching subscribers "
              "(0x10); they stay in the outbox and are resent with backoff")]
    assert flow.handle(Tick(102.9)) == []  # the delay doubled: 2 s after the resend
    assert flow.handle(Tick(103.0)) == [Resend((1, 2))]
    flow.handle(Published(1, mid=15))
    flow.handle(Gone(2))
    assert flow.handle(PubAck(15, 0, "Success", at=103.1)) == [
        Delete((1,)), Recovered("the broker accepts readings on topic home/power/meter9 again")]
    assert flow.holding == frozenset()


def test_the_window_bounds_resends_and_unknown_acks_are_ignored() -> None:
    flow = PublisherFlow(TOPIC, window=2)
    for row in range(3):
        flow.handle(Published(row, mid=row + 100))
        flow.handle(PubAck(row + 100, 0x87, "Not authorized", at=0.0))
    assert flow.handle(PubAck(999, 0, "Success", at=0.0)) == []
    flow.handle(Published(7, mid=7))
    assert flow.room == 1
    assert flow.handle(Tick(5.0)) == [Resend((0,))]


class PublisherMachine(RuleBasedStateMachine):
    """Random interleavings of publishes, PUBACKs (good and refused), ticks and lost rows.

    Invariant: a row is deleted only after a successful PUBACK for a message it was published as;
    every published row is at all times either deleted, gone, or held (in flight / waiting)."""

    def __init__(self) -> None:
        super().__init__()
        self.flow = PublisherFlow(TOPIC, window=5)
        self.now = 0.0
        self.next_row = 0
        self.next_mid = 1
        self.sent: dict[int, int] = {}  # mid → row, as paho would know it, not yet answered
        self.ok_acked: set[int] = set()  # rows with a successful PUBACK
        self.deleted: set[int] = set()
        self.gone: set[int] = set()
        self.published: set[int] = set()
        self.to_resend: set[int] = set()

    def _run(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, Delete):
                for row in action.row_ids:
                    assert row in self.ok_acked, f"row {row} deleted without a good PUBACK"
                    assert row not in self.deleted
                    self.deleted.add(row)
            elif isinstance(action, Resend):
                assert len(action.row_ids) <= self.flow.room
                self.to_resend |= set(action.row_ids)

    def _publish(self, row: int) -> None:
        mid = self.next_mid
        self.next_mid += 1
        self.sent[mid] = row
        self.published.add(row)
        self._run(self.flow.handle(Published(row, mid)))

    @precondition(lambda self: self.flow.room > 0)
    @rule()
    def publish_new(self) -> None:
        self._publish(self.next_row)
        self.next_row += 1

    @precondition(lambda self: self.to_resend and self.flow.room > 0)
    @rule(data=st.data())
    def resend(self, data: st.DataObject) -> None:
        row = data.draw(st.sampled_from(sorted(self.to_resend)))
        self.to_resend.discard(row)
        if row not in self.gone:
            self._publish(row)

    @precondition(lambda self: self.sent)
    @rule(data=st.data(), reason=st.sampled_from([0x00, 0x10, 0x87, 0x97]))
    def puback(self, data: st.DataObject, reason: int) -> None:
        mid = data.draw(st.sampled_from(sorted(self.sent)))
        row = self.sent.pop(mid)
        if delivered(reason):
            self.ok_acked.add(row)
        self._run(self.flow.handle(PubAck(mid, reason, "reason", self.now)))

    @rule(seconds=st.floats(0, 70))
    def tick(self, seconds: float) -> None:
        self.now += seconds
        self._run(self.flow.handle(Tick(self.now)))

    @precondition(lambda self: self.to_resend)
    @rule(data=st.data())
    def row_pruned(self, data: st.DataObject) -> None:
        row = data.draw(st.sampled_from(sorted(self.to_resend)))
        self.to_resend.discard(row)
        self.gone.add(row)
        self._run(self.flow.handle(Gone(row)))

    @invariant()
    def nothing_untracked(self) -> None:
        held = self.flow.holding
        for row in self.published - self.deleted - self.gone:
            assert row in held, f"row {row} is neither deleted nor held"
        assert self.flow.in_flight <= 5  # the window


PublisherMachine.TestCase.settings = settings(max_examples=200, stateful_step_count=60,
                                              deadline=None)
TestPublisherMachine = PublisherMachine.TestCase
