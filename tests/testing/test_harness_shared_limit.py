"""The harness moves the stand-in's shared limit on a schedule, and hands out the stand-in."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from apipool.testing.harness import Scenario, run_scenario
from apipool.testing.standin import StandInApi

CALL_S = 0.1


@pytest.mark.unit
@pytest.mark.parametrize(
    "schedule",
    [((2.0, 4), (1.0, 2)), ((-1.0, 4),), ((0.0, -1),)],
    ids=["out of order", "before the run", "negative limit"],
)
def test_a_bad_shared_limit_schedule_is_refused(schedule: Any) -> None:
    with pytest.raises(ValueError, match="shared"):
        Scenario(shared_limits=schedule)


@pytest.mark.unit
def test_a_scenario_has_no_shared_limit_nor_retry_after_unless_asked() -> None:
    scenario = Scenario()
    assert (scenario.shared_limits, scenario.api_retry_after) == ((), None)
    assert Scenario(shared_limits=((0.0, 2), (0.0, None))).shared_limits[1] == (0.0, None)


@pytest.mark.redis
@pytest.mark.timeout(120)
def test_the_shared_limit_follows_the_schedule_during_a_real_run() -> None:
    """Two slots; the shared limit 2, then 1 from 1.5 s, then off from 3 s."""
    apis: list[StandInApi] = []
    scenario = Scenario(
        slots=2,
        duration=4.0,
        call_ms=CALL_S * 1000,
        seed=1,
        shared_limits=((0.0, 2), (1.5, 1), (3.0, None)),
        api_retry_after="1",
    )
    result = asyncio.run(run_scenario(scenario, on_standin=apis.append))
    (api,) = apis
    stats = api.stats()  # still readable once stopped; its clock began with the window
    assert api.retry_after == "1"
    assert [limit for _, limit in stats.shared_limits] == [None, 2, 1, None]
    at = [t for t, _ in stats.shared_limits]
    assert at[1] == pytest.approx(0.0, abs=0.2)
    assert at[2] == pytest.approx(1.5, abs=0.2)
    assert at[3] == pytest.approx(3.0, abs=0.2)
    # Two slots against a limit of 1: the second one's call is refused at least once.
    assert stats.shared_rejected_total >= 1
    assert all(at[2] <= t <= at[3] for t in stats.rejected_at)
    # While the limit is 1 (once the calls in flight at the change have ended),
    # the stand-in never serves two calls at once; before, it does.
    low = [f for t, _, f in result.timeline if at[2] + CALL_S + 0.05 < t < at[3]]
    assert low
    assert max(low) <= 1
    assert max(f for t, _, f in result.timeline if t < at[2]) == 2
