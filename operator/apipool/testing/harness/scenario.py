"""What a run is asked to do: the :class:`Scenario` and its :class:`ChaosPlan`."""

from __future__ import annotations

from dataclasses import dataclass

from ... import defaults
from ...settings import Timings

__all__ = ["FAULT_KINDS", "ChaosPlan", "Scenario", "ScheduledFault"]

FAULT_KINDS = ("kill", "stop_short", "stop_long")


@dataclass(frozen=True)
class ScheduledFault:
    """One fault at a fixed time, to replay the same faults on several systems."""

    at: float
    """Seconds into the measured run."""
    kind: str
    """``kill``, ``stop_short`` or ``stop_long``."""
    hold: float = 0.0
    """For stops: seconds until SIGCONT; 0: stopped until the supervisor kills it."""


@dataclass(frozen=True)
class ChaosPlan:
    """Faults injected during a run. Times in seconds."""

    interval: float = 3.0
    """Mean time between slot faults (exponentially distributed); 0: none."""
    kinds: tuple[str, ...] = FAULT_KINDS
    """Chosen at random: ``kill`` (SIGKILL), ``stop_short`` (SIGSTOP, then SIGCONT
    before the liveness window ends), ``stop_long`` (SIGSTOP for good: the
    supervisor must find and kill it)."""
    stop_short: float = 0.8
    prefer_busy: float = 0.85
    """Chance that the victim is picked among slots that are in a call."""
    redis_restarts: tuple[float, ...] = ()
    """Seconds into the run at which Redis is restarted (append-only, so it keeps its data)."""
    redis_outages: tuple[tuple[float, float], ...] = ()
    """(at, seconds): Redis is stopped at ``at`` and started again ``seconds`` later."""
    schedule: tuple[ScheduledFault, ...] = ()
    """Slot faults at fixed times; when given, instead of random ones every ``interval``."""

    def __post_init__(self) -> None:
        unknown = (set(self.kinds) | {f.kind for f in self.schedule}) - set(FAULT_KINDS)
        if unknown:
            raise ValueError(f"unknown fault kinds: {sorted(unknown)}")

    @property
    def touches_redis(self) -> bool:
        return bool(self.redis_restarts or self.redis_outages)


@dataclass(frozen=True)
class Scenario:
    slots: int = 4
    duration: float = 20.0
    call_ms: float = 100.0
    chaos: ChaosPlan | None = None
    call_timeout: float = 2.0
    heartbeat_interval: float = 0.5
    liveness_window: float = 2.0
    probe_interval: float = 0.25
    max_attempts: int = 5
    backlog: int = 0
    """Queue depth the producers keep; 0: 2 * slots + 4."""
    drain_timeout: float = 30.0
    redis_url: str | None = None
    seed: int | None = None
    log_dir: str | None = None
    ready_timeout: float = 30.0
    api_limit: int = 0
    """The stand-in's limit; 0: slots. Set it below slots to see the checks catch an overrun."""
    standby: bool = False
    """Each slot under a keeper with a warm standby; faults then hit the active worker."""
    hang_window: float = defaults.HANG_WINDOW
    """With ``standby``: the keeper's hang window."""
    prefetch: bool = defaults.PREFETCH
    """Slots take their next job during a call while the queue is long."""
    adaptive: bool = defaults.ADAPTIVE
    """Slots use fewer of themselves while the API answers 429 (throttling.py)."""
    shared_limits: tuple[tuple[float, int | None], ...] = ()
    """``(at, limit)``, in order: the stand-in's shared limit on calls in flight is
    set to ``limit`` (``None``: off) ``at`` seconds into the measured run (0: at its
    start). Before the run, and without any, there is none."""
    api_retry_after: str | None = None
    """Sent verbatim as ``Retry-After`` with the stand-in's 429s over a limit; ``None``: none."""

    def __post_init__(self) -> None:
        times = [at for at, _ in self.shared_limits]
        if times != sorted(times) or any(at < 0 for at in times):
            raise ValueError(f"shared_limits must be in order, at >= 0: {self.shared_limits}")
        if any(limit is not None and limit < 0 for _, limit in self.shared_limits):
            raise ValueError(f"shared limits must be >= 0 or None: {self.shared_limits}")

    @property
    def timings(self) -> Timings:
        return Timings(
            call_timeout=self.call_timeout,
            heartbeat_interval=self.heartbeat_interval,
            hang_window=self.hang_window,
        )

    @property
    def limit(self) -> int:
        """The stand-in's connection limit for this run."""
        return self.api_limit or self.slots

    @property
    def queue_depth(self) -> int:
        """Jobs the producers keep queued."""
        return self.backlog or 2 * self.slots + 4
