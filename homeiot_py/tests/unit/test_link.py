"""The B-route recovery ladder, in memory."""

from __future__ import annotations

import pytest

from homeiot.core.link import (
    Failure,
    LinkMachine,
    LinkPolicy,
    OpenFailed,
    OpenOk,
    RequestFailed,
    RequestOk,
    Step,
)

POLICY = LinkPolicy(max_misses=2, dead_after_s=90, rejoin_attempts=1, reset_attempts=2,
                    backoff_min_s=10, backoff_max_s=25)


def timeout(at: float) -> RequestFailed:
    return RequestFailed(at, Failure.TIMEOUT, "no answer")


def test_one_miss_is_re_requested_and_an_answer_heals_it() -> None:
    link = LinkMachine(POLICY)
    assert link.handle(RequestOk(0)).step is Step.OK
    action = link.handle(timeout(10))
    assert (action.step, action.announce) == (Step.REREQUEST, True)
    assert "no answer in time" in action.reason
    healed = link.handle(RequestOk(20))
    assert (healed.step, healed.announce) == (Step.OK, True)
    quiet = link.handle(RequestOk(30))
    assert (quiet.step, quiet.announce) == (Step.OK, False)  # logged once, not every read


def test_the_full_ladder_with_backoff_then_exit() -> None:
    link = LinkMachine(POLICY)
    link.handle(RequestOk(0))
    link.handle(timeout(10))
    rejoin = link.handle(timeout(20))
    assert (rejoin.step, rejoin.not_before, rejoin.announce) == (Step.REJOIN, 20, True)
    assert "no valid answer for 2 request(s) in 20 s" in rejoin.reason
    reset1 = link.handle(OpenFailed(30, Failure.ERROR, "FAIL ER05"))
    assert (reset1.step, reset1.not_before) == (Step.RESET, 40)  # 10 s backoff
    assert "the rejoin failed" in reset1.reason
    assert "FAIL ER05" in reset1.reason
    reset2 = link.handle(OpenFailed(50, Failure.TIMEOUT, "scan"))
    assert (reset2.step, reset2.not_before) == (Step.RESET, 70)  # doubled
    give_up = link.handle(OpenFailed(80, Failure.TIMEOUT, "scan"))
    assert give_up.step is Step.EXIT
    assert link.handle(OpenFailed(90, Failure.TIMEOUT, "x")).step is Step.EXIT  # stays there


def test_backoff_is_capped() -> None:
    link = LinkMachine(LinkPolicy(reset_attempts=5, backoff_min_s=10, backoff_max_s=25))
    link.handle(RequestFailed(0, Failure.SESSION_LOST, "EVENT 24"))
    waits = []
    for at in (100, 200, 300, 400):
        action = link.handle(OpenFailed(at, Failure.ERROR, "x"))
        waits.append(action.not_before - at)
    assert waits == [10, 20, 25, 25]


def test_a_lost_session_skips_the_re_request() -> None:
    link = LinkMachine(POLICY)
    link.handle(RequestOk(0))
    action = link.handle(RequestFailed(5, Failure.SESSION_LOST, "receiver died"))
    assert (action.step, action.not_before) == (Step.REJOIN, 5)


def test_a_vanished_device_skips_to_the_reset() -> None:
    link = LinkMachine(POLICY)
    link.handle(RequestOk(0))
    action = link.handle(RequestFailed(5, Failure.DEVICE_GONE, "/dev/ttyUSB0"))
    assert action.step is Step.RESET
    assert "the serial device is gone" in action.reason


def test_the_time_rule_detects_a_slow_death() -> None:
    link = LinkMachine(LinkPolicy(max_misses=5, dead_after_s=60))
    link.handle(RequestOk(0))
    assert link.handle(timeout(30)).step is Step.REREQUEST
    assert link.handle(timeout(61)).step is Step.REJOIN  # 2 misses, but 61 s without an answer


def test_a_reopened_session_that_stays_silent_climbs_on() -> None:
    link = LinkMachine(POLICY)
    link.handle(RequestOk(0))
    link.handle(timeout(10))
    assert link.handle(timeout(20)).step is Step.REJOIN
    assert link.handle(OpenOk(30)).step is Step.OK
    assert link.handle(timeout(40)).step is Step.REREQUEST  # its own misses and clock
    assert link.handle(timeout(50)).step is Step.RESET  # not another rejoin
    link.handle(OpenOk(60))
    link.handle(RequestOk(70))  # a valid answer: back to the bottom of the ladder
    link.handle(timeout(80))
    assert link.handle(timeout(90)).step is Step.REJOIN


def test_no_rejoin_rung() -> None:
    link = LinkMachine(LinkPolicy(max_misses=1, rejoin_attempts=0, reset_attempts=1))
    assert link.handle(timeout(0)).step is Step.RESET
    assert link.handle(OpenFailed(1, Failure.ERROR, "x")).step is Step.EXIT


@pytest.mark.parametrize("kwargs", [{"max_misses": 0}, {"dead_after_s": 0}, {"reset_attempts": 0},
                                    {"rejoin_attempts": -1},
                                    {"backoff_min_s": 30, "backoff_max_s": 10}])
def test_a_bad_policy_is_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="must be"):
        LinkPolicy(**kwargs)  # type: ignore[arg-type]
