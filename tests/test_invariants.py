"""The invariants of docs/design.md, each against real processes and a real redis-server.

I1 cap: the stand-in API never sees more than N connections.
I2 nothing lost: every accepted job has exactly one result (ok, expired or dead).
I3 no idle capacity: with no faults, the slots are busy nearly all the time.
I4 bounded recovery: a killed slot is busy again, a hung slot is killed, in bounded time.
"""

from __future__ import annotations

import asyncio

import pytest

from apipool.testing.harness import ChaosPlan, Scenario, ScenarioResult, run_scenario

# Scenario defaults: call timeout 2 s, heartbeat 0.5 s, take block 0.5 s (lease TTL 5 s),
# liveness window 2 s, probes every 0.25 s with a 0.5 s timeout.
LIVENESS_WINDOW = 2.0
HANG_DETECTION_BOUND = LIVENESS_WINDOW + 0.25 + 0.5 + 1.0  # window + probe period + timeout + slack
KILL_RECOVERY_BOUND = 3.0  # process start (~0.3 s here) + lease + first take, with slack for CI


def run(scenario: Scenario) -> ScenarioResult:
    return asyncio.run(run_scenario(scenario))


def assert_cap_held(result: ScenarioResult) -> None:
    assert result.max_concurrency <= result.limit, result.over_limit_events
    assert result.over_limit_seconds == 0.0
    assert result.rejected == 0


def assert_nothing_lost(result: ScenarioResult) -> None:
    assert result.unfinished == 0
    assert result.lost == 0
    assert result.duplicated == 0
    assert result.submitted == result.completed + result.expired + result.dead
    assert result.completed > 0


@pytest.mark.redis
@pytest.mark.timeout(90)
def test_the_checks_catch_a_pool_larger_than_the_api_limit() -> None:
    """The stand-in and the accounting do see an overrun: 3 slots against a limit of 2
    (adaptation off: it would park the third slot after its first 429)."""
    scenario = Scenario(
        slots=3, api_limit=2, duration=3, call_ms=100, seed=1, adaptive=False,
        drain_timeout=5.0,  # the third slot's jobs back off after 429s: no need to wait them out
    )  # fmt: skip
    result = run(scenario)
    assert result.max_concurrency == 3
    assert result.over_limit_seconds > 0.0
    assert result.rejected > 0
    with pytest.raises(AssertionError):
        assert_cap_held(result)


@pytest.mark.redis
@pytest.mark.timeout(90)
def test_i3_no_fault_run_keeps_every_slot_busy() -> None:
    result = run(Scenario(slots=4, duration=8, call_ms=100, seed=3))
    assert_cap_held(result)
    assert_nothing_lost(result)
    assert result.max_concurrency == 4  # the cap is used, not just respected
    assert result.utilization > 0.95, result.utilization
    assert result.dead == 0


@pytest.mark.chaos
@pytest.mark.timeout(120)
def test_i1_i2_i4_slots_killed_mid_call() -> None:
    result = run(
        Scenario(slots=4, duration=12, chaos=ChaosPlan(interval=1.0, kinds=("kill",)), seed=11)
    )
    assert len(result.faults) >= 5
    assert_cap_held(result)
    assert_nothing_lost(result)
    assert result.dead == 0  # 5 attempts are plenty for a few kills
    assert result.kill_recovery, "no kill was followed by a measured recovery"
    assert max(result.kill_recovery) < KILL_RECOVERY_BOUND, result.kill_recovery


@pytest.mark.chaos
@pytest.mark.timeout(120)
def test_i1_i2_i4_slots_stopped_shorter_and_longer_than_the_liveness_window() -> None:
    result = run(
        Scenario(
            slots=4,
            duration=14,
            chaos=ChaosPlan(interval=1.5, kinds=("stop_short", "stop_long"), stop_short=0.8),
            seed=5,
        )
    )
    kinds = {f.kind for f in result.faults}
    assert kinds == {"stop_short", "stop_long"}, kinds
    assert_cap_held(result)
    assert_nothing_lost(result)
    assert result.hang_detection, "no hung slot was killed"
    assert max(result.hang_detection) < HANG_DETECTION_BOUND, result.hang_detection
    assert min(result.hang_detection) >= LIVENESS_WINDOW - 0.1, result.hang_detection


@pytest.mark.chaos
@pytest.mark.timeout(120)
def test_i1_i2_redis_restarted_mid_run() -> None:
    result = run(
        Scenario(slots=4, duration=10, chaos=ChaosPlan(interval=0, redis_restarts=(3.0,)), seed=2)
    )
    assert [f.kind for f in result.faults] == ["redis_down", "redis_up"]
    assert_cap_held(result)
    assert_nothing_lost(result)


@pytest.mark.chaos
@pytest.mark.timeout(150)
def test_i1_i2_redis_down_longer_than_the_lease() -> None:
    lease_ttl = Scenario().timings.lease_ttl
    outage = lease_ttl + 1.5
    result = run(
        Scenario(
            slots=4,
            duration=outage + 8,
            chaos=ChaosPlan(interval=0, redis_outages=((2.0, outage),)),
            seed=4,
        )
    )
    down, up = result.faults
    assert up.at - down.at >= lease_ttl
    assert_cap_held(result)
    assert_nothing_lost(result)


@pytest.mark.chaos
@pytest.mark.slow
@pytest.mark.timeout(240)
def test_long_mixed_chaos_with_redis_restart() -> None:
    result = run(
        Scenario(
            slots=6,
            duration=30,
            chaos=ChaosPlan(interval=1.0, redis_restarts=(15.0,)),
            seed=17,
        )
    )
    assert len(result.faults) >= 15
    assert_cap_held(result)
    assert_nothing_lost(result)
