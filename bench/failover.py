"""Failover inside a slot: the same faults with and without a keeper's warm standby.

Four runs of a full pool (8 slots, 100 ms calls, the stand-in's limit 8), one
after the other, each with its own redis-server, side by side:

- ``kill``: a busy slot's worker is SIGKILLed every 3 s;
- ``hang``: a busy slot's worker is SIGSTOPped for 8 s every 3 s (far longer
  than any hang window, so it must be found and killed);

each once with plain slots as they were before keepers (``--standby false
--prefetch false``: the supervisor restarts a dead slot and kills one that
fails /healthz for its 2 s liveness window) and once as they run now, with the
defaults (``--standby true``: the keeper promotes its warm standby when the
worker dies, or when its event loop has been silent for the hang window;
``--prefetch true``: the next job taken during a call, the outcome written
during the next call).

Recovery of a fault: from the fault until the stand-in again serves 8 calls at
once, read from the stand-in's timeline (for a hang counted from one call's
length after the fault, so that the frozen victim's last call, which the
stand-in serves to its end, does not count). Faults come
every 3 s, so a recovery longer than that overlaps the next fault.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace

from apipool import defaults
from apipool.testing.harness import ChaosPlan, Scenario, run_scenario
from apipool.testing.harness.result import ScenarioResult, full_again
from apipool.testing.harness.scenario import ScheduledFault

from .common import Figures, Target, maximum, median

SLOTS = 8
CALL_MS = 100.0
EVERY = 3.0
HANG_HOLD = 8.0
LIVENESS_WINDOW = 2.0

RUNS = ("kill_plain", "kill_standby", "hang_plain", "hang_standby")
TARGETS = {
    "goodput_kill_standby": Target(">=", 0.98),
    "goodput_hang_standby": Target(">=", 0.95),
    "recovery_ms_p50_kill_standby": Target("<=", 150.0),
    **{f"over_limit_s_{run}": Target("<=", 0.0) for run in RUNS},
    **{f"lost_{run}": Target("<=", 0) for run in RUNS},
}


def recoveries(result: ScenarioResult, call_s: float) -> list[float]:
    """Seconds from each fault until the stand-in served ``limit`` calls at once
    again, after the count had dropped below it (the victim's call ended: at
    once for a killed worker, whose connection closes with it; a stopped one's
    call is served to its end, so a hang is looked at from one call's length on)."""
    found = []
    for fault in result.faults:
        since = fault.at if fault.kind == "kill" else fault.at + call_s + 0.05
        full = full_again(result.timeline, since, result.limit)
        if full is not None:
            found.append(full - fault.at)
    return found


def _schedule(duration: float, kind: str, hold: float) -> tuple[ScheduledFault, ...]:
    count = int((duration - 1.0) // EVERY)
    return tuple(ScheduledFault(EVERY * (k + 1), kind, hold) for k in range(count))


def run(*, quick: bool = False, seed: int = 1) -> Figures:
    duration = 5.0 if quick else 60.0
    figures: Figures = {
        "slots": SLOTS,
        "call_ms": CALL_MS,
        "duration_s": duration,
        "fault_every_s": EVERY,
        "hang_hold_s": HANG_HOLD,
        "liveness_window_s_plain": LIVENESS_WINDOW,
    }
    base = Scenario(
        slots=SLOTS,
        duration=duration,
        call_ms=CALL_MS,
        liveness_window=LIVENESS_WINDOW,
        seed=seed,
    )
    figures["hang_window_s_standby"] = base.hang_window
    plans = {
        "kill": ChaosPlan(schedule=_schedule(duration, "kill", 0.0), prefer_busy=1.0),
        "hang": ChaosPlan(schedule=_schedule(duration, "stop_short", HANG_HOLD), prefer_busy=1.0),
    }
    for fault, plan in plans.items():
        for mode, new in (("plain", False), ("standby", True)):
            name = f"{fault}_{mode}"
            # Plain: as before keepers and prefetch; standby: the defaults.
            scenario = replace(base, chaos=plan, standby=new, prefetch=new and defaults.PREFETCH)
            result = asyncio.run(run_scenario(scenario))
            times = recoveries(result, CALL_MS / 1000.0)
            figures.update(
                {
                    f"goodput_{name}": round(result.goodput, 4),
                    f"faults_{name}": len(result.faults),
                    f"recovery_ms_p50_{name}": round(median(times) * 1000.0, 1),
                    f"recovery_ms_max_{name}": round(maximum(times) * 1000.0, 1),
                    f"over_limit_s_{name}": round(result.over_limit_seconds, 3),
                    f"max_concurrency_{name}": result.max_concurrency,
                    f"lost_{name}": result.lost,
                    f"duplicated_{name}": result.duplicated,
                    f"restarts_{name}": result.restarts,
                }
            )
    return figures
