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
    SetAside,
    Stored,
    Tick,
    delivered,
)

BASE = "home/power"
S = "meter9"
NOT_AUTHORIZED = ("the broker refused readings on topic home/power/meter9: Not authorized (0x87); "
                  "they stay in the outbox and are resent with backoff")


def test_reason_codes() -> None:
    assert delivered(0x00)
    assert not delivered(0x10)  # no matching subscribers: nobody will get it
    assert not delivered(0x87)  # not authorized
    assert not delivered(0x97)  # quota exceeded


def test_only_a_receipt_deletes_and_a_missing_one_makes_it_resend_with_backoff() -> None:
    flow = PublisherFlow(BASE, window=10, receipt_timeout_s=30, receipt_timeout_max_s=100)
    flow.handle(Published(1, S, seq=40, mid=11, at=0.0))
    flow.handle(Published(2, S, seq=41, mid=12, at=0.0))
    assert flow.handle(PubAck(11, 0, "Success", at=0.1)) == []  # in flight, not stored
    assert flow.handle(PubAck(12, 0, "Success", at=0.1)) == []
    assert flow.holding == {1, 2}
    assert flow.handle(Stored(S, ((41, 41), (50, 60)))) == [Delete((2,))]
    assert flow.handle(Tick(30.0)) == []
    assert flow.handle(Tick(30.1)) == [Resend((1,))]
    assert flow.handle(Tick(31.0)) == []  # once per timeout, even if it could not go out
    flow.handle(Published(1, S, seq=40, mid=13, at=31.0))
    flow.handle(PubAck(13, 0, "Success", at=31.0))
    assert flow.handle(Tick(90.0)) == []  # the timeout doubled: 60 s
    assert flow.handle(Tick(91.0)) == [Resend((1,))]
    assert flow.handle(Stored(S, ((40, 40),))) == [Delete((1,))]
    assert flow.holding == frozenset()
    assert flow.handle(Stored(S, ((40, 40),))) == []  # a duplicate receipt


def test_receipts_that_stop_coming_raise_one_alarm() -> None:
    flow = PublisherFlow(BASE, window=10, receipt_timeout_s=1, receipt_timeout_max_s=100)
    at = 0.0
    alarms = []
    for attempt in range(5):
        flow.handle(Published(1, S, seq=1, mid=10 + attempt, at=at))
        flow.handle(PubAck(10 + attempt, 0, "Success", at=at))
        at += 2 ** (attempt + 1)
        actions = flow.handle(Tick(at))
        assert actions[-1] == Resend((1,))
        alarms += [a for a in actions if isinstance(a, Alarm)]
    assert len(alarms) == 1
    assert "no receipt from the gateway for readings resent 3 times" in alarms[0].message
    assert flow.handle(Stored(S, ((1, 1),))) == [
        Delete((1,)), Recovered("receipts from the gateway arrive again")]


def test_a_receipt_may_overtake_the_puback() -> None:
    flow = PublisherFlow(BASE, window=10)
    flow.handle(Published(1, S, seq=7, mid=11, at=0.0))
    assert flow.handle(Stored(S, ((0, 9),))) == [Delete((1,))]
    assert flow.handle(PubAck(11, 0, "Success", at=0.1)) == []
    assert flow.in_flight == 0
    assert flow.handle(Tick(1000.0)) == []


def test_a_refused_reading_is_kept_reported_once_and_resent_with_backoff() -> None:
    flow = PublisherFlow(BASE, window=10)
    flow.handle(Published(1, S, seq=1, mid=11, at=100.0))
    flow.handle(Published(2, S, seq=2, mid=12, at=100.0))
    assert flow.handle(PubAck(11, 0x87, "Not authorized", at=100.0)) == [Alarm(NOT_AUTHORIZED)]
    assert flow.handle(PubAck(12, 0x87, "Not authorized", at=100.1)) == []  # once per change
    assert flow.holding == {1, 2}
    assert flow.handle(Tick(100.5)) == []
    assert flow.handle(Tick(101.0)) == [Resend((1, 2))]
    assert flow.handle(Tick(101.5)) == []  # not twice
    flow.handle(Published(1, S, seq=1, mid=13, at=101.0))
    flow.handle(Published(2, S, seq=2, mid=14, at=101.0))
    assert flow.handle(PubAck(13, 0x87, "Not authorized", at=101.2)) == []
    assert flow.handle(PubAck(14, 0x10, "No matching subscribers", at=101.2)) == [
        Alarm("the broker refused readings on topic home/power/meter9: No matching subscribers "
              "(0x10); they stay in the outbox and are resent with backoff")]
    assert flow.handle(Tick(102.9)) == []  # the delay doubled: 2 s after the resend
    assert flow.handle(Tick(103.0)) == [Resend((1, 2))]
    flow.handle(Published(1, S, seq=1, mid=15, at=103.0))
    flow.handle(Gone(2))
    assert flow.handle(PubAck(15, 0, "Success", at=103.1)) == [
        Recovered("the broker accepts readings on topic home/power/meter9 again")]
    assert flow.holding == {1}  # accepted by the broker is not stored yet
    assert flow.handle(Stored(S, ((1, 1),))) == [Delete((1,))]


def test_the_windows_bound_what_is_sent() -> None:
    flow = PublisherFlow(BASE, window=2, unreceipted_max=3)
    for row in range(3):
        flow.handle(Published(row, S, seq=row, mid=row + 100, at=0.0))
        flow.handle(PubAck(row + 100, 0x87, "Not authorized", at=0.0))
    assert flow.room == 0  # three unreceipted
    assert flow.handle(PubAck(999, 0, "Success", at=0.0)) == []
    assert flow.handle(Tick(5.0)) == [Resend((0, 1))]  # two: the PUBACK window


def test_a_receipt_deletes_only_its_own_sources_rows() -> None:
    """After SOURCE_DEFAULT changed, the outbox holds rows of the old and the new source whose
    seqs overlap (each source numbers its own): a receipt for one never deletes the other's."""
    flow = PublisherFlow(BASE, window=10)
    flow.handle(Published(1, "old", seq=5, mid=11, at=0.0))
    flow.handle(Published(2, "new", seq=5, mid=12, at=0.0))
    flow.handle(PubAck(11, 0, "Success", at=0.1))
    flow.handle(PubAck(12, 0, "Success", at=0.1))
    assert flow.handle(Stored("new", ((0, 9),), dead=((5, 5),))) == [Delete((2,))]
    assert flow.holding == {1}
    assert flow.handle(Stored("old", ((5, 5),))) == [Delete((1,))]


def test_a_refusal_names_the_rows_own_topic() -> None:
    flow = PublisherFlow(BASE, window=10)
    flow.handle(Published(1, "old", seq=5, mid=11, at=0.0))
    assert flow.handle(PubAck(11, 0x87, "Not authorized", at=0.0)) == [
        Alarm("the broker refused readings on topic home/power/old: Not authorized (0x87); "
              "they stay in the outbox and are resent with backoff")]


def test_refusals_are_per_topic_so_another_sources_success_does_not_end_them() -> None:
    """The former source's topic is refused while the current one's is taken: one alarm, no
    recovery and no early resend each time a current reading is accepted."""
    flow = PublisherFlow(BASE, window=10)
    flow.handle(Published(1, "old", seq=5, mid=11, at=0.0))
    assert len(flow.handle(PubAck(11, 0x87, "Not authorized", at=0.0))) == 1  # the alarm
    for i in range(5):
        flow.handle(Published(10 + i, "new", seq=i, mid=20 + i, at=0.1 * i))
        assert flow.handle(PubAck(20 + i, 0, "Success", at=0.1 * i)) == []
    assert flow.refusals == {"home/power/old": "Not authorized (0x87)"}
    assert flow.handle(Tick(0.9)) == []  # still backing off
    assert flow.handle(Tick(1.0)) == [Resend((1,))]
    flow.handle(Published(1, "old", seq=5, mid=12, at=1.0))
    assert flow.handle(PubAck(12, 0x87, "Not authorized", at=1.0)) == []  # same reason: quiet
    flow.handle(Published(1, "old", seq=5, mid=13, at=3.0))
    assert flow.handle(PubAck(13, 0, "Success", at=3.0)) == [
        Recovered("the broker accepts readings on topic home/power/old again")]
    assert flow.refusals == {}


def test_a_dead_letter_receipt_deletes_and_says_it_was_set_aside() -> None:
    flow = PublisherFlow(BASE, window=10)
    for row, seq in ((1, 7), (2, 8), (3, 9)):
        flow.handle(Published(row, S, seq=seq, mid=10 + row, at=0.0))
        flow.handle(PubAck(10 + row, 0, "Success", at=0.0))
    assert flow.handle(Stored(S, ((7, 7),), dead=((8, 8), (20, 30)))) == [
        SetAside(S, ((8, 8),)), Delete((1, 2))]
    assert flow.holding == {3}
    assert flow.handle(Tick(1000.0)) == [Resend((3,))]  # neither stored nor set aside: resent


class PublisherMachine(RuleBasedStateMachine):
    """Random interleavings of publishes of two sources with overlapping seqs, PUBACKs (good and
    refused), receipts (stored and dead-lettered), ticks and rows pruned.

    Invariants: a row is deleted only after InfluxDB stored its (source, seq) or the gateway's
    dead-letter store holds it (a receipt for its source named it); every published row is at
    all times deleted, gone, or held (in flight, awaiting a receipt or a retry); the windows
    hold."""

    def __init__(self) -> None:
        super().__init__()
        self.flow = PublisherFlow(BASE, window=5, unreceipted_max=8, receipt_timeout_s=10,
                                  receipt_timeout_max_s=40)
        self.now = 0.0
        self.next_row = 0
        self.next_mid = 1
        self.sent: dict[int, int] = {}  # mid → row, as paho would know it, not yet answered
        self.keys: dict[int, tuple[str, int]] = {}  # row → (source, seq)
        self.next_seq = {"a": 0, "b": 0}
        self.at_broker: set[int] = set()  # rows the broker passed on
        self.in_influx: set[tuple[str, int]] = set()  # (source, seq) stored or dead-lettered
        self.deleted: set[int] = set()
        self.gone: set[int] = set()
        self.published: set[int] = set()
        self.to_resend: set[int] = set()

    def _run(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, Delete):
                for row in action.row_ids:
                    assert self.keys[row] in self.in_influx, \
                        f"row {row} deleted before InfluxDB or the dead letters held it"
                    assert row not in self.deleted
                    self.deleted.add(row)
            elif isinstance(action, Resend):
                assert len(action.row_ids) <= self.flow.window - self.flow.in_flight
                self.to_resend |= set(action.row_ids)

    def _publish(self, row: int) -> None:
        mid = self.next_mid
        self.next_mid += 1
        self.sent[mid] = row
        self.published.add(row)
        source, seq = self.keys[row]
        self._run(self.flow.handle(Published(row, source, seq, mid, self.now)))

    @precondition(lambda self: self.flow.room > 0)
    @rule(source=st.sampled_from(["a", "b"]))
    def publish_new(self, source: str) -> None:
        self.keys[self.next_row] = (source, self.next_seq[source])
        self.next_seq[source] += 1
        self._publish(self.next_row)
        self.next_row += 1

    @precondition(lambda self: self.to_resend and self.flow.window > self.flow.in_flight)
    @rule(data=st.data())
    def resend(self, data: st.DataObject) -> None:
        row = data.draw(st.sampled_from(sorted(self.to_resend)))
        self.to_resend.discard(row)
        if row not in self.gone | self.deleted:
            self._publish(row)

    @precondition(lambda self: self.sent)
    @rule(data=st.data(), reason=st.sampled_from([0x00, 0x10, 0x87, 0x97]))
    def puback(self, data: st.DataObject, reason: int) -> None:
        mid = data.draw(st.sampled_from(sorted(self.sent)))
        row = self.sent.pop(mid)
        if delivered(reason):
            self.at_broker.add(row)
        self._run(self.flow.handle(PubAck(mid, reason, "reason", self.now)))

    @precondition(lambda self: self.at_broker)
    @rule(data=st.data(), source=st.sampled_from(["a", "b"]))
    def gateway_stores(self, data: st.DataObject, source: str) -> None:
        mine = sorted(self.keys[row][1] for row in self.at_broker if self.keys[row][0] == source)
        if not mine:
            return
        seqs = data.draw(st.sets(st.sampled_from(mine), min_size=1))
        dead = data.draw(st.sets(st.sampled_from(sorted(seqs))))
        self.in_influx |= {(source, seq) for seq in seqs}
        ranges = tuple((s, s) for s in sorted(seqs - dead))
        self._run(self.flow.handle(Stored(source, ranges, tuple((s, s) for s in sorted(dead)))))

    @rule(seconds=st.floats(0, 30))
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
        assert self.flow.in_flight <= 5
        assert self.flow.unreceipted <= 8


PublisherMachine.TestCase.settings = settings(max_examples=200, stateful_step_count=60,
                                              deadline=None)
TestPublisherMachine = PublisherMachine.TestCase
