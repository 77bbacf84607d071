"""SlotTime: a slot's wall time split into states that add up (pure, a fake clock)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from apipool.ledger import by_minute, merge_buckets
from apipool.probes import CallTracker
from apipool.slot_time import STATES, SlotTime
from apipool.testing.clock import FakeClock

pytestmark = pytest.mark.unit


def test_the_states_are_the_contracts_names_plus_handoff() -> None:
    names = "starting recovering waiting_for_work calling handoff held_back fenced"
    assert names.split() == list(STATES)


def test_time_goes_to_the_state_it_was_spent_in() -> None:
    clock = FakeClock()
    t = SlotTime(clock)
    clock.advance(2)
    t.enter("recovering")
    clock.advance(0.5)
    assert t.enter("waiting_for_work") == "recovering"
    clock.advance(3)
    totals = t.totals()
    assert totals["starting"] == 2
    assert totals["recovering"] == 0.5
    assert totals["waiting_for_work"] == 3  # the open stretch counts
    assert sum(totals.values()) == t.elapsed() == 5.5


def test_the_state_context_returns_to_the_state_it_found_also_on_error() -> None:
    clock = FakeClock()
    t = SlotTime(clock)
    t.enter("handoff")

    def held_back_then_fail() -> None:
        with t.state("held_back"):
            clock.advance(4)
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        held_back_then_fail()
    assert t.current == "handoff"
    clock.advance(1)
    assert t.totals()["held_back"] == 4
    assert t.totals()["handoff"] == 1


def test_an_unknown_state_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown slot state"):
        SlotTime(FakeClock()).enter("idle")  # type: ignore[arg-type]


def test_fenced_covers_waiting_and_handoff_but_not_a_call_or_the_start() -> None:
    clock = FakeClock()
    t = SlotTime(clock)
    t.fence(True)
    clock.advance(1)  # starting: a slot that never held its lease is still starting
    t.enter("waiting_for_work")
    clock.advance(2)  # fenced
    with t.state("calling"):
        clock.advance(3)  # a call already running still uses the API
    assert t.current == "fenced"
    t.fence(False)
    assert t.current == "waiting_for_work"
    clock.advance(4)
    assert t.totals() == {
        **dict.fromkeys(STATES, 0.0),
        "starting": 1,
        "fenced": 2,
        "calling": 3,
        "waiting_for_work": 4,
    }


def test_deltas_give_each_second_once() -> None:
    clock = FakeClock()
    t = SlotTime(clock)
    clock.advance(1)
    assert t.take_deltas() == {"starting": 1}
    t.enter("calling")
    clock.advance(2)
    t.enter("handoff")
    clock.advance(0.25)
    assert t.take_deltas() == {"calling": 2, "handoff": 0.25}
    assert t.take_deltas() == {}


def test_restart_starts_from_zero_in_starting() -> None:
    clock = FakeClock()
    t = SlotTime(clock)
    t.enter("calling")
    clock.advance(10)
    t.restart()
    clock.advance(1)
    assert t.totals()["calling"] == 0
    assert t.totals()["starting"] == 1
    assert t.take_deltas() == {"starting": 1}


def test_a_tracked_call_is_booked_to_calling_and_back() -> None:
    clock = FakeClock()
    t = SlotTime(clock)
    t.enter("handoff")
    calls = CallTracker(clock, slot_time=t)
    calls.start()
    clock.advance(1.5)
    assert t.current == "calling"
    assert calls.finish() == 1.5
    assert t.current == "handoff"
    assert t.totals()["calling"] == 1.5


actions = st.lists(
    st.one_of(
        st.tuples(st.just("enter"), st.sampled_from(STATES)),
        st.tuples(st.just("fence"), st.booleans()),
        st.tuples(st.just("advance"), st.floats(0, 100, allow_nan=False)),
        st.tuples(st.just("take"), st.none()),
        st.tuples(st.just("nested"), st.sampled_from(STATES)),
    ),
    max_size=60,
)


@given(actions)
def test_the_states_always_sum_to_the_elapsed_time(steps: list[tuple[str, object]]) -> None:
    clock = FakeClock(0.0)
    t = SlotTime(clock)
    taken: dict[str, float] = dict.fromkeys(STATES, 0.0)
    for kind, arg in steps:
        if kind == "enter":
            t.enter(arg)  # type: ignore[arg-type]
        elif kind == "fence":
            t.fence(bool(arg))
        elif kind == "advance":
            clock.advance(float(arg))  # type: ignore[arg-type]
        elif kind == "nested":
            with t.state(arg):  # type: ignore[arg-type]
                clock.advance(0.5)
        else:
            merge_buckets({0: taken}, {0: t.take_deltas()})
        totals = t.totals()
        assert all(v >= 0 for v in totals.values())
        assert sum(totals.values()) == pytest.approx(clock.now, abs=1e-6)
    merge_buckets({0: taken}, {0: t.take_deltas()})
    assert sum(taken.values()) == pytest.approx(clock.now, abs=1e-6)
    for state in STATES:
        assert taken[state] == pytest.approx(t.totals()[state], abs=1e-6)


def test_seconds_are_split_at_minute_boundaries() -> None:
    # 10 s ending 4 s into minute 2: 6 s in minute 1, 4 s in minute 2, in proportion
    buckets = by_minute({"calling": 5.0, "handoff": 5.0}, end=124.0)
    assert sorted(buckets) == [1, 2]
    assert buckets[1] == pytest.approx({"calling": 3.0, "handoff": 3.0})
    assert buckets[2] == pytest.approx({"calling": 2.0, "handoff": 2.0})
    assert by_minute({}, end=124.0) == {}


@given(
    st.dictionaries(st.sampled_from(STATES), st.floats(0, 500, allow_nan=False), max_size=7),
    st.floats(1e9, 2e9, allow_nan=False),
)
def test_a_split_keeps_every_second(deltas: dict[str, float], end: float) -> None:
    buckets = by_minute(deltas, end)
    for state, seconds in deltas.items():
        assert sum(b.get(state, 0.0) for b in buckets.values()) == pytest.approx(seconds)
    for minute, bucket in buckets.items():
        assert sum(bucket.values()) <= 60 + 1e-6
        assert minute * 60 < end + 1e-6
