"""Run apipool through :func:`apipool.testing.harness.run_scenario`, on the shared chaos schedule.

The shared schedule is handed to the harness as ``ChaosPlan(schedule=...)``: the
same faults at the same times as the limiter systems get, each hitting a slot in
a call. Everything else -- the supervisor, the slots, the producers, the
accounting of every job, the recovery figures -- is the harness's own code.
"""

from __future__ import annotations

from typing import Any

from apipool.testing.harness import ChaosPlan, Scenario, ScheduledFault, run_scenario

from .schedule import Done, Planned, Settings, recovery_times


async def run_apipool(s: Settings, plan: list[Planned]) -> dict[str, Any]:
    scenario = Scenario(
        slots=s.limit,
        duration=s.duration,
        call_ms=s.call_ms,
        chaos=ChaosPlan(
            schedule=tuple(ScheduledFault(p.at, p.kind, p.hold) for p in plan),
            prefer_busy=1.0,  # victims are slots in a call, as for the other systems
        ),
        liveness_window=s.ttl,
        seed=s.seed + 1,
        standby=True,  # the product's default: faults hit the worker, its keeper recovers
    )
    res = await run_scenario(scenario)
    done = [
        Done(round(f.at, 3), f.kind, f.pid, f.slot, f.in_call)
        for f in res.faults
        if f.kind in ("kill", "stop_short", "stop_long")
    ]
    window = res.duration
    return {
        "system": "apipool",
        "limit": res.limit,
        "workers": res.slots,
        "window": window,
        "max_concurrency": res.max_concurrency,
        "max_in_flight": res.max_in_flight,
        "over_limit_seconds": res.over_limit_seconds,
        "over_limit_events": res.over_limit_events,
        "utilization": res.utilization,
        "goodput": res.goodput,
        "calls_ok": res.api_calls_ok,
        "rejected_429": res.rejected,
        "jobs_submitted": res.submitted,
        "jobs_completed": res.completed,
        "dead": res.dead,
        "duplicated": res.duplicated,
        "unfinished": res.unfinished,
        "lost": res.lost,
        "lost_definition": "jobs accepted by the pool with no result or dead letter after "
        "the drain (the harness's count); a killed slot's job is re-queued",
        "restarts": res.restarts,
        "stopped_at_end": 0,
        "faults": [f.__dict__ for f in done],
        "recovery": recovery_times(res.timeline, done, s.limit, window, s.call_ms),
        "harness_recovery": {
            "kill_to_replacement_call": res.kill_recovery,
            "hang_detection": res.hang_detection,
            "hang_to_replacement_call": res.hang_recovery,
        },
        "samples": [list(x) for x in res.timeline],
    }
