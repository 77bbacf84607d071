"""The :class:`~apipool.testing.harness.Scenario` a ``demo`` command line asks for."""

from __future__ import annotations

import argparse

from .. import defaults
from ..testing.harness import ChaosPlan, Scenario

__all__ = ["LIVENESS_WINDOW", "build_scenario", "chaos_interval"]

LIVENESS_WINDOW = 2.0
"""Seconds a slot may fail its /healthz probe before the supervisor kills it."""


def chaos_interval(slots: int) -> float:
    """Mean seconds between injected slot faults for a pool of ``slots``.

    A fault costs the pool about 1.3 slot-seconds on average: a SIGKILL ~0.2 s
    until the restarted process is busy again, a short SIGSTOP 0.8 s, a permanent
    SIGSTOP ~3 s (the 2 s liveness window, the probe, the kill and the restart).
    One fault every ``8 / N`` seconds hits each slot about once every 8 s, so the
    pool loses roughly 1.3 / 8 ~ 15 % of its capacity whatever N is: a dip in the
    concurrency bar every couple of seconds and a dozen faults in the default 30 s
    run (4 slots), yet the pool spends most of its time at the limit. The floor of
    1 s keeps large pools from a fault storm that would show nothing but restarts.
    """
    return max(1.0, 8.0 / max(slots, 1))


def build_scenario(args: argparse.Namespace) -> Scenario:
    """The :class:`Scenario` for the parsed ``demo`` arguments; ``ValueError`` if invalid."""
    slots = int(args.slots)
    if slots < 1:
        raise ValueError(f"--slots must be >= 1, got {slots}")
    duration, call_ms = float(args.duration), float(args.call_ms)
    if duration <= 0 or call_ms <= 0:
        raise ValueError("--duration and --call-ms must be > 0")
    return Scenario(
        slots=slots,
        duration=duration,
        call_ms=call_ms,
        chaos=ChaosPlan(interval=chaos_interval(slots)) if args.chaos else None,
        # The harness's 2 s call timeout suits the default 100 ms calls; keep long
        # calls (--call-ms 3000) from timing out on every attempt.
        call_timeout=max(Scenario.call_timeout, 2.0 * call_ms / 1000.0),
        liveness_window=LIVENESS_WINDOW,
        # Slots as `apipool up` runs them: under keepers, with prefetch; chaos
        # then hits the workers, which the keepers replace.
        standby=defaults.STANDBY,
        prefetch=defaults.PREFETCH,
        redis_url=args.redis_url or None,
        seed=args.seed,
    )
