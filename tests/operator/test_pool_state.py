"""What the operator remembers per pool: one lock per pool, pruned once the pool is gone."""

from __future__ import annotations

import threading

import pytest

from apipool.operator.pool_state import MIN_WINDOW, PoolState, PoolStates
from apipool.stats import PoolStats

from ..conftest import wait_for

pytestmark = pytest.mark.unit

A = ("default", "a")
B = ("default", "b")


def stats(slots: int, busy_ms: int, busy_now: int = 0) -> PoolStats:
    return PoolStats(
        pool="a",
        slots=slots,
        queued=0,
        inflight={i: int(i < busy_now) for i in range(slots)},
        leases={},
        dead_letters=0,
        counters={"busy_ms": busy_ms},
    )


def test_an_entry_is_kept_while_the_pool_lives_and_dropped_when_it_is_forgotten() -> None:
    states = PoolStates()
    with states.hold(A) as first:
        first.busy_samples.append((1.0, 0))
    with states.hold(A) as again:
        assert again is first  # remembered between reconciles
    with states.hold(B):
        pass
    assert states.keys() == {A, B}

    states.forget(A)
    assert A not in states
    assert states.keys() == {B}
    states.forget(A)  # forgetting twice, or a pool never seen, is harmless
    states.forget(("default", "never"))
    with states.hold(A) as fresh:
        assert fresh is not first
        assert not fresh.busy_samples


def test_a_pool_forgotten_while_held_goes_when_its_last_holder_leaves() -> None:
    states = PoolStates()
    with states.hold(A):
        states.forget(A)
        assert A in states  # a waiter must still find the same lock
    assert A not in states
    assert len(states) == 0


def test_holders_of_one_pool_take_turns_and_share_one_lock() -> None:
    states = PoolStates()
    inside = threading.Event()
    release = threading.Event()
    order: list[str] = []

    def first() -> None:
        with states.hold(A):
            inside.set()
            release.wait(5)
            order.append("first")

    def second() -> None:
        with states.hold(A):
            order.append("second")

    t1 = threading.Thread(target=first)
    t1.start()
    assert inside.wait(5)
    t2 = threading.Thread(target=second)
    t2.start()
    # The pool is forgotten while one thread holds it and another waits: both
    # still use the one entry, which goes once both have left.
    states.forget(A)
    with states.hold(B):  # another pool is not held up meanwhile
        pass
    release.set()
    t1.join(5)
    t2.join(5)
    assert order == ["first", "second"]
    wait_for(lambda: A not in states, 2, what="the forgotten pool's entry to go")
    assert states.keys() == {B}


def test_utilization_is_the_busy_share_now_until_a_window_has_passed() -> None:
    state = PoolState()
    assert state.utilization(stats(4, 0, busy_now=1), now=100.0, window=60.0) == 0.25
    # 4 slots busy for 10 s of the 20 s since: 10 / (4 x 20).
    later = state.utilization(stats(4, 10_000), now=100.0 + 20.0, window=60.0)
    assert later == pytest.approx(10 / 80)
    assert state.utilization(stats(0, 10_000), now=121.0, window=60.0) is None


def test_utilization_forgets_samples_older_than_the_window() -> None:
    state = PoolState()
    for t in range(0, 200, 10):
        state.utilization(stats(1, t * 1000), now=float(t), window=60.0)
    # Samples before the window are dropped; the oldest kept is at most one step older.
    assert state.busy_samples[0][0] >= 190 - 60 - 10
    assert len(state.busy_samples) <= 60 // 10 + 2
    assert state.utilization(stats(1, 200_000), now=200.0, window=60.0) == 1.0
    assert MIN_WINDOW < 60.0
