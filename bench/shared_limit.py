"""A shared limit: the API's limit drops below N for a while, then comes back.

Two runs of a full pool (N = 8 slots, 100 ms calls, the stand-in's hard limit of
8 connections), one after the other, each a
:func:`apipool.testing.harness.run_scenario` with its own redis-server and its
own stand-in API, side by side:

- ``constant``: the stand-in's shared limit on calls in flight is 8 from the
  start to the end: the API's limit is N all along, so a pool that keeps to N
  never hears a 429.
- ``drop``: the shared limit is 8 for 20 s, then 4 for 30 s (other consumers
  use half of the API's limit), then 8 again for 30 s (quick: 4 s, 8 s, 6 s).
  The stand-in answers 429 at once, without ``Retry-After``, to a call arriving
  while the shared limit's worth of calls are in flight; the calls in flight
  when it drops are served to their end.

Phases are read from the stand-in's record of its shared limit
(``StandInStats.shared_limits``: when each change actually happened), the limit
in force in each being the lower of the hard and the shared limit. From the
stand-in's counters, after the queue has drained:

- 429s per second in each phase, and ``series_429_per_s``: one figure per
  ``series_bin_s`` seconds of the ``drop`` run (2 s; quick: 1 s), a run of
  equal figures written once with its length (``0 x10, 4, 0 x29``).
- ``share_429_low_settled``: of the calls arriving from ``SETTLE`` (5 s) after
  the drop until the limit returns, the share answered 429 (429s over 429s
  plus calls that went in flight, counted from the stand-in's timeline).
- ``goodput_<phase>``: the API's service time of 200s inside the phase
  (``useful_between``, calls straddling an edge counted for their part inside)
  over limit in force x phase length; ``goodput_low_settled`` for the low phase
  from ``SETTLE`` after the drop on.
- ``adapt_down_s``: from the drop until the 429 share stays at or under 2 %
  for good: the first moment after the drop (the drop itself, or right after
  one of its 429s) from which to the return at most 2 % of the calls arriving
  are answered 429. A pool that never adapts gets about the phase's length.
- ``last_429_low_s``: from the drop to its last 429 before the return (when
  429s stopped for good; about the phase's length for a pool that keeps
  probing above the limit now and then).
- ``adapt_up_s``: from the return until the stand-in serves 8 calls at once
  again.
- ``over_limit_s`` (connections over the hard limit), ``lost``, ``dead``: the
  harness's figures for the whole run.
"""

from __future__ import annotations

import asyncio
import math
from bisect import bisect_left
from collections.abc import Sequence
from dataclasses import replace
from itertools import groupby

from apipool.testing.harness import Scenario, run_scenario
from apipool.testing.harness.result import ScenarioResult, full_again
from apipool.testing.standin import StandInApi, StandInStats

from .common import Figures, Target

SLOTS = 8
CALL_MS = 100.0
LOW = 4
"""The shared limit during the drop: N / 2."""
PHASES_S = (20.0, 30.0, 30.0)
"""Seconds at 8, at ``LOW``, at 8 again (quick: ``QUICK_PHASES_S``)."""
QUICK_PHASES_S = (4.0, 8.0, 6.0)
CONSTANT_S = 30.0
"""Length of the ``constant`` run (quick: 5 s)."""
SETTLE = 5.0
"""Seconds after the drop from which the low phase is held to the targets."""
SETTLED_SHARE = 0.02
"""The 429 share under which the pool counts as adapted (``adapt_down_s``)."""

TARGETS = {
    "rejected_constant": Target("<=", 0),
    "goodput_constant": Target(">=", 0.98),
    "share_429_low_settled": Target("<=", SETTLED_SHARE),
    "goodput_low_settled": Target(">=", 0.9),
    "adapt_up_s": Target("<=", 10.0),
    "over_limit_s_constant": Target("<=", 0.0),
    "over_limit_s_drop": Target("<=", 0.0),
    "lost_constant": Target("<=", 0),
    "lost_drop": Target("<=", 0),
}


def in_force(stats: StandInStats) -> list[tuple[float, int]]:
    """``(seconds, limit in force)`` at the start and at every change of the
    shared limit: the lower of the hard and the shared limit."""
    return [(t, stats.limit if s is None else min(stats.limit, s)) for t, s in stats.shared_limits]


def drop_and_return(limits: Sequence[tuple[float, int]], full: int) -> tuple[float, int, float]:
    """When the limit in force first fell below ``full``, to what, and when it was
    back to ``full``."""
    drop, low = next((t, limit) for t, limit in limits if limit < full)
    back = next(t for t, limit in limits if t > drop and limit >= full)
    return drop, low, back


def admissions(timeline: Sequence[tuple[float, int, int]]) -> list[float]:
    """Times at which a call went in flight: each rise of the in-flight count."""
    return [
        t for (t, _, f), (_, _, before) in zip(timeline[1:], timeline, strict=False) if f > before
    ]


def count_between(times: Sequence[float], start: float, end: float) -> int:
    """How many of the sorted ``times`` fall in [start, end)."""
    return bisect_left(times, end) - bisect_left(times, start)


def share_429(
    rejected: Sequence[float], admitted: Sequence[float], start: float, end: float
) -> float:
    """Of the calls arriving in [start, end), the share answered 429 (NaN: none arrived)."""
    refused = count_between(rejected, start, end)
    calls = refused + count_between(admitted, start, end)
    return refused / calls if calls else math.nan


def adapt_down(
    rejected: Sequence[float], admitted: Sequence[float], drop: float, back: float
) -> float:
    """Seconds from ``drop`` until the 429 share from then to ``back`` is at most
    ``SETTLED_SHARE``: tried from the drop, then from right after each of its 429s."""
    first, last = bisect_left(rejected, drop), bisect_left(rejected, back)
    for since in [drop, *rejected[first:last]]:
        start = math.nextafter(since, math.inf) if since > drop else drop
        share = share_429(rejected, admitted, start, back)
        if math.isnan(share) or share <= SETTLED_SHARE:
            return since - drop
    return back - drop  # not reached: after the last 429 the share is 0


def last_429(rejected: Sequence[float], drop: float, back: float) -> float:
    """Seconds from ``drop`` to its last 429 before ``back`` (0: none)."""
    inside = rejected[bisect_left(rejected, drop) : bisect_left(rejected, back)]
    return inside[-1] - drop if inside else 0.0


def series(rejected: Sequence[float], window: float, width: float) -> str:
    """429s per second in bins of ``width`` seconds over the window, as one line;
    a run of equal rates is written once with its length: ``0 x10, 4, 0 x29``."""
    bins = max(1, round(window / width))  # the window ends a few ms late
    rates = [count_between(rejected, k * width, (k + 1) * width) / width for k in range(bins)]
    runs = [(rate, len(list(same))) for rate, same in groupby(f"{r:.0f}" for r in rates)]
    return ", ".join(rate if n == 1 else f"{rate} x{n}" for rate, n in runs)


def limit_seconds(limits: Sequence[tuple[float, int]], window: float) -> float:
    """The integral of the limit in force over [0, window]."""
    ends = [t for t, _ in limits[1:]] + [window]
    return sum(
        limit * max(0.0, min(end, window) - t) for (t, limit), end in zip(limits, ends, strict=True)
    )


def goodput(api: StandInApi, start: float, end: float, limit: int) -> float:
    """Service time of 200s in [start, end] over ``limit`` x its length."""
    span = end - start
    return api.useful_between(start, end) / (limit * span) if span > 0 else math.nan


def _run(scenario: Scenario) -> tuple[ScenarioResult, StandInApi]:
    apis: list[StandInApi] = []
    result = asyncio.run(run_scenario(scenario, on_standin=apis.append))
    return result, apis[0]


def harness_figures(result: ScenarioResult, name: str) -> Figures:
    return {
        f"goodput_{name}": round(result.goodput, 4),
        f"rejected_{name}": result.rejected,
        f"max_concurrency_{name}": result.max_concurrency,
        f"over_limit_s_{name}": round(result.over_limit_seconds, 3),
        f"lost_{name}": result.lost,
        f"dead_{name}": result.dead,
    }


def drop_figures(result: ScenarioResult, api: StandInApi, width: float) -> Figures:
    """The figures of the ``drop`` run, from its stand-in once the queue has drained."""
    stats = api.stats()
    window = result.duration
    rejected = sorted(t for t in stats.rejected_at if t < window)
    admitted = admissions(result.timeline)
    limits = in_force(stats)
    drop, low, back = drop_and_return(limits, SLOTS)
    phases = {
        "before": (0.0, drop, SLOTS),
        "low": (drop, back, low),
        "after": (back, window, SLOTS),
    }
    figures: Figures = {}
    for name, (start, end, limit) in phases.items():
        figures[f"rate_429_per_s_{name}"] = round(
            count_between(rejected, start, end) / (end - start), 1
        )
        figures[f"goodput_{name}"] = round(goodput(api, start, end, limit), 4)
    settled = drop + SETTLE
    full = full_again(result.timeline, back, SLOTS)
    figures.update(
        {
            "series_429_per_s": series(rejected, window, width),
            "share_429_low_settled": round(share_429(rejected, admitted, settled, back), 4),
            "goodput_low_settled": round(goodput(api, settled, back, low), 4),
            "goodput_vs_limit_drop": round(
                api.useful_between(0.0, window) / limit_seconds(limits, window), 4
            ),
            "adapt_down_s": round(adapt_down(rejected, admitted, drop, back), 2),
            "last_429_low_s": round(last_429(rejected, drop, back), 2),
            "adapt_up_s": round(full - back, 2) if full is not None else math.nan,
            "shared_rejected_drop": stats.shared_rejected_total,
        }
    )
    return figures


def run(*, quick: bool = False, seed: int = 1) -> Figures:
    phases = QUICK_PHASES_S if quick else PHASES_S
    constant_s = 5.0 if quick else CONSTANT_S
    width = 1.0 if quick else 2.0
    figures: Figures = {
        "slots": SLOTS,
        "call_ms": CALL_MS,
        "phases_s": "/".join(f"{p:g}" for p in phases),
        "shared_limits": f"{SLOTS}/{LOW}/{SLOTS}",
        "series_bin_s": width,
    }
    base = Scenario(slots=SLOTS, call_ms=CALL_MS, seed=seed)
    result, _ = _run(replace(base, duration=constant_s, shared_limits=((0.0, SLOTS),)))
    figures.update(harness_figures(result, "constant"))
    schedule = ((0.0, SLOTS), (phases[0], LOW), (phases[0] + phases[1], SLOTS))
    result, api = _run(replace(base, duration=sum(phases), shared_limits=schedule))
    figures.update(harness_figures(result, "drop"))
    figures.update(drop_figures(result, api, width))
    return figures
