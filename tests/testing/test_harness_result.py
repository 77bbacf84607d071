"""The harness's pure parts: the scenario, and the result computed from a recorded run."""

from __future__ import annotations

import json
from typing import Any

import pytest

from apipool.supervisor import SlotEvent
from apipool.testing.harness import ChaosPlan, Fault, Scenario, ScheduledFault
from apipool.testing.harness.result import (
    MAX_DEAD_REASONS,
    Outcomes,
    OutcomeTally,
    Recovery,
    build_result,
    first_call_after,
    make_snapshot,
    recovery_times,
)
from apipool.testing.standin import StandInStats

pytestmark = pytest.mark.unit

T0 = 1000.0
"""time.monotonic() at the start of the recorded run."""
WALL0 = 5000.0
"""time.time() at the same moment."""


def stats(**changes: Any) -> StandInStats:
    fields: dict[str, Any] = {
        "limit": 4,
        "started_at": WALL0,
        "elapsed_seconds": 10.0,
        "active": 4,
        "max_concurrency": 4,
        "in_flight": 3,
        "max_in_flight": 4,
        "over_limit_seconds": 0.0,
        "over_limit_events": [],
        "connections_total": 9,
        "requests_total": 400,
        "ok_total": 380,
        "rejected_total": 0,
        "busy_seconds": 38.0,
        "useful_seconds": 37.0,
        "nominal_seconds": 38.0,
        "samples": [(0.0, 4, 4), (0.1, 4, 3)],
    }
    return StandInStats(**{**fields, **changes})


# -- the scenario ----------------------------------------------------------------


def test_scenario_defaults_derive_the_limit_and_the_queue_depth() -> None:
    assert Scenario(slots=3).limit == 3
    assert Scenario(slots=3, api_limit=2).limit == 2
    assert Scenario(slots=3).queue_depth == 10
    assert Scenario(slots=3, backlog=7).queue_depth == 7
    timings = Scenario(call_timeout=1.5, heartbeat_interval=0.25).timings
    assert (timings.call_timeout, timings.heartbeat_interval) == (1.5, 0.25)


@pytest.mark.parametrize(
    "plan",
    [
        {"kinds": ("kill", "explode")},
        {"schedule": (ScheduledFault(1.0, "explode"),)},
    ],
)
def test_chaos_plan_rejects_unknown_fault_kinds(plan: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="explode"):
        ChaosPlan(**plan)


@pytest.mark.parametrize(
    ("plan", "touches"),
    [
        (ChaosPlan(), False),
        (ChaosPlan(redis_restarts=(3.0,)), True),
        (ChaosPlan(redis_outages=((2.0, 1.0),)), True),
    ],
)
def test_chaos_plan_says_whether_it_touches_redis(plan: ChaosPlan, touches: bool) -> None:
    assert plan.touches_redis is touches


# -- recovery times from a recorded timeline -------------------------------------

FAULTS = [
    Fault(at=1.0, kind="kill", slot=0, pid=10, wall=WALL0 + 1.0),
    Fault(at=2.0, kind="stop_long", slot=1, pid=11, wall=WALL0 + 2.0),
    Fault(at=3.0, kind="stop_short", slot=2, pid=12, wall=WALL0 + 3.0),
    Fault(at=4.0, kind="redis_down", slot=-1, pid=99, wall=WALL0 + 4.0),
    Fault(at=5.0, kind="kill", slot=3, pid=13, wall=WALL0 + 5.0),  # never replaced in time
]
EVENTS = [
    SlotEvent(at=T0 + 1.5, slot=1, kind="killed"),  # before the stop: not its detection
    SlotEvent(at=T0 + 3.0, slot=0, kind="killed"),  # another slot
    SlotEvent(at=T0 + 4.0, slot=1, kind="exited"),  # not a kill
    SlotEvent(at=T0 + 4.5, slot=1, kind="killed"),  # the supervisor found the hang
    SlotEvent(at=T0 + 6.0, slot=1, kind="killed"),  # a later kill of the replacement
]
CALL_STARTS = {
    0: [WALL0 + 0.5, WALL0 + 1.0, WALL0 + 1.75, WALL0 + 1.25],  # unordered on purpose
    1: [WALL0 + 1.0, WALL0 + 6.5, WALL0 + 5.25],
    2: [WALL0 + 3.5],
}


def test_recovery_times_from_a_recorded_run() -> None:
    got = recovery_times(FAULTS, EVENTS, CALL_STARTS, T0)
    assert got == Recovery(kill_recovery=[0.25], hang_detection=[2.5], hang_recovery=[3.25])


def test_recovery_times_without_faults_or_replacements() -> None:
    assert recovery_times([], EVENTS, CALL_STARTS, T0) == Recovery([], [], [])
    assert recovery_times(FAULTS, [], {}, T0) == Recovery([], [], [])


@pytest.mark.parametrize(
    ("slot", "wall", "expected"),
    [
        (0, WALL0 + 1.0, 0.25),  # a call starting exactly at ``wall`` is not after it
        (0, WALL0, 0.5),
        (0, WALL0 + 2.0, None),
        (7, WALL0, None),  # no calls at all
    ],
)
def test_first_call_after(slot: int, wall: float, expected: float | None) -> None:
    assert first_call_after(CALL_STARTS, slot, wall) == expected


# -- the jobs' outcomes ----------------------------------------------------------


def result(status: str, **fields: Any) -> bytes:
    return json.dumps({"status": status, **fields}).encode()


@pytest.mark.parametrize(
    ("certain", "copies", "first", "counts", "landed"),
    [
        (True, 0, None, {"lost": 1}, []),
        (False, 0, None, {}, []),  # an uncertain submit that did not land
        (False, 1, result("ok"), {"ok": 1}, ["j"]),  # ... or did
        (True, 1, result("ok"), {"ok": 1}, []),
        (True, 2, result("ok"), {"ok": 1, "duplicated": 1}, []),
        (True, 1, result("expired"), {"expired": 1}, []),
        (True, 1, result("dead", error="boom"), {"dead": 1}, []),
        (True, 1, result("weird"), {"weird": 1}, []),
    ],
)
def test_outcome_tally_of_one_job(
    certain: bool, copies: int, first: bytes | None, counts: dict[str, int], landed: list[str]
) -> None:
    tally = OutcomeTally()
    tally.add("j", certain=certain, copies=copies, first=first)
    zero = {"ok": 0, "expired": 0, "dead": 0, "lost": 0, "duplicated": 0}
    assert tally.counts == {**zero, **counts}
    assert tally.landed == landed


def test_outcome_tally_keeps_call_starts_and_some_dead_reasons() -> None:
    tally = OutcomeTally()
    tally.add("a", certain=True, copies=1, first=result("ok", slot=2, started_at=WALL0 + 1))
    tally.add("b", certain=True, copies=1, first=result("ok", slot="2", started_at=WALL0 + 2))
    tally.add("c", certain=True, copies=1, first=result("ok", slot=0, started_at=None))
    for i in range(MAX_DEAD_REASONS + 5):
        tally.add(f"d{i}", certain=True, copies=1, first=result("dead", error=f"e{i}"))
    tally.add("x", certain=True, copies=1, first=result("dead"))
    outcomes = tally.outcomes(submitted=42)
    assert outcomes == Outcomes(
        submitted=42,
        counts={"ok": 3, "expired": 0, "dead": MAX_DEAD_REASONS + 6, "lost": 0, "duplicated": 0},
        dead_reasons=[f"e{i}" for i in range(MAX_DEAD_REASONS)],
        call_starts={2: [WALL0 + 1, WALL0 + 2]},
    )


# -- the figures -----------------------------------------------------------------


def test_build_result_from_the_measured_stats() -> None:
    faults = FAULTS[:2]
    measured = stats(over_limit_events=[{"start": 1.0, "end": 1.5, "peak": 5}])
    outcomes = Outcomes(
        submitted=400,
        counts={"ok": 390, "expired": 4, "dead": 6, "lost": 0, "duplicated": 1},
        dead_reasons=["boom"],
    )
    got = build_result(
        Scenario(slots=4, call_ms=100.0, chaos=ChaosPlan()),
        measured,
        useful=36.0,
        outcomes=outcomes,
        unfinished=2,
        restarts=3,
        faults=faults,
        recovery=Recovery([0.25], [2.5], [3.25]),
    )
    doc = got.to_dict()
    assert doc == {
        "slots": 4,
        "limit": 4,
        "duration": 10.0,
        "call_ms": 100.0,
        "chaos": True,
        "max_concurrency": 4,
        "max_in_flight": 4,
        "over_limit_seconds": 0.0,
        "over_limit_events": [{"start": 1.0, "end": 1.5, "peak": 5}],
        "rejected": 0,
        "utilization": pytest.approx(38.0 / 40.0),
        "goodput": pytest.approx(36.0 / 40.0),
        "api_calls_ok": 380,
        "submitted": 400,
        "completed": 390,
        "expired": 4,
        "dead": 6,
        "lost": 0,
        "duplicated": 1,
        "unfinished": 2,
        "restarts": 3,
        "faults": [
            {
                "at": 1.0,
                "kind": "kill",
                "slot": 0,
                "pid": 10,
                "wall": WALL0 + 1.0,
                "in_call": False,
            },
            {
                "at": 2.0,
                "kind": "stop_long",
                "slot": 1,
                "pid": 11,
                "wall": WALL0 + 2.0,
                "in_call": False,
            },
        ],
        "kill_recovery": [0.25],
        "hang_detection": [2.5],
        "hang_recovery": [3.25],
        "dead_reasons": ["boom"],
        "throughput": 38.0,
    }
    assert got.to_dict(timeline=True)["timeline"] == [(0.0, 4, 4), (0.1, 4, 3)]
    assert got.faults is faults


@pytest.mark.parametrize(
    ("slots", "elapsed"),
    [(0, 10.0), (4, 0.0)],
)
def test_build_result_of_an_empty_window_has_no_goodput(slots: int, elapsed: float) -> None:
    got = build_result(
        Scenario(slots=slots),
        stats(elapsed_seconds=elapsed),
        useful=1.0,
        outcomes=OutcomeTally().outcomes(0),
        unfinished=0,
        restarts=0,
        faults=[],
        recovery=Recovery([], [], []),
    )
    assert got.goodput == 0.0
    assert got.chaos is False
    if elapsed == 0.0:
        assert got.throughput == 0.0


@pytest.mark.parametrize(("last_ok", "dt", "throughput"), [(280, 2.0, 50.0), (280, 0.0, 0.0)])
def test_make_snapshot(last_ok: int, dt: float, throughput: float) -> None:
    snap = make_snapshot(
        stats(),
        elapsed=5.0,
        duration=20.0,
        queued=12,
        busy_slots=3,
        last_ok=last_ok,
        dt=dt,
        restarts=1,
        faults=2,
        submitted=400,
    )
    assert (snap.limit, snap.active, snap.in_flight, snap.max_concurrency) == (4, 4, 3, 4)
    assert (snap.elapsed, snap.duration, snap.queued, snap.busy_slots) == (5.0, 20.0, 12, 3)
    assert (snap.ok_calls, snap.restarts, snap.faults, snap.submitted) == (380, 1, 2, 400)
    assert snap.over_limit_seconds == 0.0
    assert snap.utilization == pytest.approx(38.0 / 40.0)
    assert snap.throughput == throughput
