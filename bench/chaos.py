"""Goodput and the connection limit under slot faults: SIGKILL chaos and SIGSTOP chaos.

Two runs of a full pool (100 ms calls) against the stand-in API, one after the
other, each with its own redis-server:

- ``kill``: a random slot (a busy one 85 % of the time) is SIGKILLed; the local
  supervisor restarts it and the new process takes the lease over at once and
  requeues the job the dead one left in flight.
- ``hang``: a random slot is SIGSTOPped, either briefly (``stop_short``, 0.8 s,
  then SIGCONT: it just resumes) or for good (``stop_long``: /healthz fails, the
  supervisor kills it after the liveness window, 2 s here, and restarts it).

Faults arrive at exponentially distributed intervals (mean ``interval_s``), so the
rate per slot-minute is ``60 / (interval_s * slots)``; goodput under chaos
depends on that rate and, for hangs, on the liveness window. A full run first runs
the same pool without faults (``baseline``), so the cost of the faults shows.

Recovery times are the harness's: from the fault to the first call that the
slot's replacement starts (read from the jobs' result records), and for a
permanent stop also the time until the supervisor kills the frozen process.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace

from apipool.testing.harness import ChaosPlan, Scenario, run_scenario

from .common import Figures, Target, maximum, median

SLOTS = 8
CALL_MS = 100.0
LIVENESS_WINDOW = 2.0
PLANS = {
    "kill": ("kill",),
    "hang": ("stop_short", "stop_long"),
}

TARGETS = {
    "goodput_kill": Target(">=", 0.95),
    "goodput_hang": Target(">=", 0.90),
    "over_limit_s_kill": Target("<=", 0.0),
    "over_limit_s_hang": Target("<=", 0.0),
    "max_concurrency_kill": Target("<=", SLOTS),
    "max_concurrency_hang": Target("<=", SLOTS),
    "lost_kill": Target("<=", 0),
    "lost_hang": Target("<=", 0),
}


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 1)


def run(*, quick: bool = False, seed: int = 1) -> Figures:
    duration = 5.0 if quick else 60.0
    interval = 1.5 if quick else 5.0
    figures: Figures = {
        "slots": SLOTS,
        "call_ms": CALL_MS,
        "duration_s": duration,
        "fault_interval_s": interval,
        "planned_faults_per_slot_minute": round(60.0 / (interval * SLOTS), 3),
        "liveness_window_s": LIVENESS_WINDOW,
    }
    base = Scenario(
        slots=SLOTS, duration=20.0, call_ms=CALL_MS, liveness_window=LIVENESS_WINDOW, seed=seed
    )
    if not quick:  # the no-fault goodput of the same pool, for comparison
        figures["goodput_baseline"] = round(asyncio.run(run_scenario(base)).goodput, 4)
        figures["duration_s_baseline"] = base.duration
    for name, kinds in PLANS.items():
        scenario = replace(base, duration=duration, chaos=ChaosPlan(interval=interval, kinds=kinds))
        r = asyncio.run(run_scenario(scenario))
        slot_minutes = r.slots * r.duration / 60.0
        counts = {kind: sum(1 for f in r.faults if f.kind == kind) for kind in kinds}
        figures.update(
            {
                f"goodput_{name}": round(r.goodput, 4),
                f"utilization_{name}": round(r.utilization, 4),
                f"over_limit_s_{name}": round(r.over_limit_seconds, 3),
                f"max_concurrency_{name}": r.max_concurrency,
                f"lost_{name}": r.lost,
                f"duplicated_{name}": r.duplicated,
                f"dead_{name}": r.dead,
                f"unfinished_{name}": r.unfinished,
                f"faults_{name}": " ".join(f"{k}={n}" for k, n in counts.items()),
                f"faults_per_slot_minute_{name}": round(len(r.faults) / slot_minutes, 3),
                f"restarts_{name}": r.restarts,
            }
        )
        if name == "kill":
            figures["kill_recovery_ms_median"] = _ms(median(r.kill_recovery))
            figures["kill_recovery_ms_max"] = _ms(maximum(r.kill_recovery))
        else:
            figures["hang_detection_ms_median"] = _ms(median(r.hang_detection))
            figures["hang_detection_ms_max"] = _ms(maximum(r.hang_detection))
            figures["hang_recovery_ms_median"] = _ms(median(r.hang_recovery))
            figures["hang_recovery_ms_max"] = _ms(maximum(r.hang_recovery))
    return figures
