"""The chaos schedule shared by all systems, and the stand-in-based recovery figure."""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from typing import Any

KINDS = ("kill", "stop_short", "stop_long")


@dataclass(frozen=True)
class Planned:
    at: float
    """Seconds after the start of the measurement window."""
    kind: str
    """``kill`` (SIGKILL), ``stop_short`` / ``stop_long`` (SIGSTOP, SIGCONT ``hold`` s later)."""
    hold: float


@dataclass(frozen=True)
class Settings:
    limit: int = 4
    workers: int = 8
    """General worker processes of the limiter systems (M > N)."""
    duration: float = 45.0
    call_ms: float = 100.0
    ttl: float = 2.0
    """dramatiq key TTL, sorted-set holder timeout and apipool liveness window, seconds."""
    stop_short: float = 0.8
    stop_long: float = 5.0
    interval: float = 3.0
    """Mean time between faults (exponential)."""
    backoff: float = 0.005
    """Limiter workers' pause after a failed acquire."""
    seed: int = 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def make_schedule(s: Settings) -> list[Planned]:
    """Faults at exponential intervals over the window; kinds uniform. Bounded by the duration."""
    rng = random.Random(s.seed)
    out: list[Planned] = []
    t = 0.0
    for _ in range(10_000):
        t += rng.expovariate(1.0 / s.interval)
        if t >= s.duration - 0.5:
            break
        kind = rng.choice(KINDS)
        hold = {"kill": 0.0, "stop_short": s.stop_short, "stop_long": s.stop_long}[kind]
        out.append(Planned(round(t, 3), kind, hold))
    return out


@dataclass
class Done:
    """A fault as applied to one system."""

    at: float
    kind: str
    pid: int
    worker: int
    holding: bool
    """Whether the victim was known to be in a call (holding a slot)."""


def recovery_times(
    samples: list[tuple[float, int, int]],
    faults: list[Done],
    limit: int,
    window: float,
    call_ms: float,
) -> dict[str, list[float | None]]:
    """From each SIGKILL / long SIGSTOP to the stand-in serving ``limit`` calls at once again.

    Defined on the stand-in's timeline, the same for every system. The victim's
    own call leaves the stand-in's in-flight count within one call length (a
    killed client's connection closes at once; a stopped client's request is
    still answered by the server), so counting starts ``1.5 x call_ms`` after
    the fault: the recovery is the first moment from then on at which ``limit``
    calls are in flight, i.e. the victim's share of the capacity is used again
    (by whoever: a replacement, or another worker the limiter let in). Its floor
    is therefore ``1.5 x call_ms``. ``None``: not back at the limit before the
    window ended. Overlapping faults share a recovery; that is part of the figure.
    """
    margin = 1.5 * call_ms / 1000.0
    out: dict[str, list[float | None]] = {"kill": [], "stop_long": []}
    for f in faults:
        if f.kind not in out:
            continue
        start = f.at + margin
        took: float | None = None
        current = 0
        for t, _active, in_flight in samples:
            if t > window:
                break
            if t <= start:
                current = in_flight
                continue
            if current >= limit:  # the state in effect at ``start``
                took = margin
                break
            if in_flight >= limit:
                took = t - f.at
                break
        else:
            if current >= limit and start <= window:
                took = margin
        out[f.kind].append(took)
    return out
