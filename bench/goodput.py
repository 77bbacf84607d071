"""No-fault goodput: a full pool against the stand-in API at 100 ms and at 10 ms calls.

Goodput is the stand-in's ``useful_seconds / (N * window)``: the nominal call
time of every answered call over the capacity of N connections for the whole
measured window. Utilization is the time-integral of ``min(open connections, N)``
over the same capacity (it also counts connection setup and teardown). The two
call lengths run one after the other, each in a fresh pool and redis-server.
"""

from __future__ import annotations

import asyncio

from apipool.harness import Scenario, ScenarioResult, run_scenario

from .common import Figures, Target

SLOTS = 4
CALLS_MS = (100.0, 10.0)

TARGETS = {
    "goodput_100ms": Target(">=", 0.98),
    "goodput_10ms": Target(">=", 0.95),
    "max_concurrency_100ms": Target("<=", SLOTS),
    "max_concurrency_10ms": Target("<=", SLOTS),
    "over_limit_s_100ms": Target("<=", 0.0),
    "over_limit_s_10ms": Target("<=", 0.0),
}


def scenario_figures(result: ScenarioResult, suffix: str) -> Figures:
    """The figures of one no-fault run, names ending in ``suffix``."""
    calls = result.api_calls_ok
    cycle_ms = result.slots * result.duration / calls * 1000.0 if calls else float("nan")
    return {
        f"goodput{suffix}": round(result.goodput, 4),
        f"utilization{suffix}": round(result.utilization, 4),
        f"max_concurrency{suffix}": result.max_concurrency,
        f"over_limit_s{suffix}": round(result.over_limit_seconds, 3),
        f"throughput_per_s{suffix}": round(result.throughput, 1),
        # Mean time a slot spends per answered call: call time + everything else.
        f"cycle_ms{suffix}": round(cycle_ms, 2),
        f"lost{suffix}": result.lost,
    }


def run(*, quick: bool = False, seed: int = 1) -> Figures:
    duration = 3.0 if quick else 20.0
    figures: Figures = {"slots": SLOTS, "duration_s": duration}
    for call_ms in CALLS_MS:
        scenario = Scenario(slots=SLOTS, duration=duration, call_ms=call_ms, seed=seed)
        result = asyncio.run(run_scenario(scenario))
        figures.update(scenario_figures(result, f"_{call_ms:g}ms"))
    return figures
