"""What a run reports, and how it is computed from what was recorded.

Everything here is pure: the figures come from the stand-in's stats, the
faults injected, the supervisor's events and the jobs' results, handed in as
values; :mod:`.run` gathers them.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

from ...layout import PoolKeys
from ...supervisor import SlotEvent
from ..standin import OverLimitEvent, StandInStats
from .scenario import Scenario

__all__ = [
    "Fault",
    "OutcomeTally",
    "Outcomes",
    "Recovery",
    "ScenarioResult",
    "Snapshot",
    "build_result",
    "first_call_after",
    "make_snapshot",
    "recovery_times",
]


@dataclass(frozen=True)
class Fault:
    at: float  # seconds since the measurement started
    kind: str
    slot: int
    pid: int
    wall: float = 0.0  # time.time() of the fault
    in_call: bool = False  # the victim held a job when it was hit


@dataclass(frozen=True)
class Snapshot:
    """Live figures, handed to ``on_tick`` a few times a second."""

    elapsed: float
    duration: float
    limit: int
    active: int
    """Open connections at the stand-in (what its limit counts)."""
    in_flight: int
    """Calls being served at the stand-in right now."""
    max_concurrency: int
    over_limit_seconds: float
    utilization: float
    queued: int
    busy_slots: int
    ok_calls: int
    throughput: float
    restarts: int
    faults: int
    submitted: int


@dataclass
class ScenarioResult:
    slots: int
    limit: int
    """The stand-in API's connection limit."""
    duration: float
    call_ms: float
    chaos: bool
    max_concurrency: int
    """Peak of open connections at the stand-in: the figure the cap is about."""
    max_in_flight: int
    over_limit_seconds: float
    over_limit_events: list[OverLimitEvent]
    rejected: int
    utilization: float
    """Calls in flight at the API / (limit x duration)."""
    goodput: float
    """The API's service time spent on successful calls / (slots x duration)."""
    api_calls_ok: int
    submitted: int
    completed: int
    expired: int
    dead: int
    lost: int
    duplicated: int
    unfinished: int
    restarts: int
    faults: list[Fault]
    kill_recovery: list[float]
    """Seconds from a SIGKILL to the replacement's first successful call start."""
    hang_detection: list[float]
    """Seconds from a permanent SIGSTOP to the supervisor's SIGKILL."""
    hang_recovery: list[float]
    """Seconds from a permanent SIGSTOP to the replacement's first successful call start."""
    timeline: list[tuple[float, int, int]] = field(default_factory=list)
    """(seconds, open connections, calls in flight) at the stand-in, at every change."""
    dead_reasons: list[str] = field(default_factory=list)

    @property
    def throughput(self) -> float:
        return self.api_calls_ok / self.duration if self.duration else 0.0

    def to_dict(self, *, timeline: bool = False) -> dict[str, Any]:
        doc = asdict(self)
        doc["throughput"] = self.throughput
        if not timeline:
            doc.pop("timeline")
        return doc


# -- the jobs' outcomes ----------------------------------------------------------

MAX_DEAD_REASONS = 20
"""Errors of dead jobs kept in :attr:`ScenarioResult.dead_reasons`."""


@dataclass(frozen=True)
class Outcomes:
    submitted: int
    counts: dict[str, int]
    """Jobs by result status (ok, expired, dead), plus lost and duplicated."""
    dead_reasons: list[str]
    call_starts: dict[int, list[float]] = field(default_factory=dict)
    """Slot -> wall-clock start times of its successful calls (from the results)."""


def _zero_counts() -> dict[str, int]:
    return {"ok": 0, "expired": 0, "dead": 0, "lost": 0, "duplicated": 0}


@dataclass
class OutcomeTally:
    """The jobs' results, accounted one job at a time."""

    counts: dict[str, int] = field(default_factory=_zero_counts)
    dead_reasons: list[str] = field(default_factory=list)
    call_starts: dict[int, list[float]] = field(default_factory=dict)
    landed: list[str] = field(default_factory=list)
    """Jobs whose submit failed with an error, found to have been queued after all."""

    def add(self, job_id: str, *, certain: bool, copies: int, first: str | bytes | None) -> None:
        """One job: ``certain`` if its submit was acknowledged, ``copies`` the length
        of its result list and ``first`` the oldest result in it."""
        if copies == 0:
            if certain:
                self.counts["lost"] += 1
            return
        if not certain:
            self.landed.append(job_id)  # the uncertain submit did land
        if copies > 1:
            self.counts["duplicated"] += 1
        assert first is not None
        doc = json.loads(first)
        self.counts[doc["status"]] = self.counts.get(doc["status"], 0) + 1
        if doc.get("started_at") is not None:
            self.call_starts.setdefault(int(doc["slot"]), []).append(doc["started_at"])
        if doc["status"] == "dead" and len(self.dead_reasons) < MAX_DEAD_REASONS:
            self.dead_reasons.append(str(doc.get("error")))

    @staticmethod
    def queue_reads(pipe: Any, keys: PoolKeys, chunk: Sequence[str]) -> None:
        """Queue on a pipeline (blocking or asyncio) what :meth:`add_reads` needs
        of each job of ``chunk``: its result list's length and oldest entry."""
        for job_id in chunk:
            pipe.llen(keys.result(job_id))
            pipe.lindex(keys.result(job_id), 0)

    def add_reads(self, chunk: Sequence[str], answers: Sequence[Any], certain: int) -> None:
        """The pipeline's ``answers`` for ``chunk`` (:meth:`queue_reads`); the first
        ``certain`` jobs of the chunk had their submit acknowledged."""
        for k, job_id in enumerate(chunk):
            copies, first = int(answers[2 * k]), answers[2 * k + 1]
            self.add(job_id, certain=k < certain, copies=copies, first=first)

    def outcomes(self, submitted: int) -> Outcomes:
        return Outcomes(
            submitted=submitted,
            counts=self.counts,
            dead_reasons=self.dead_reasons,
            call_starts=self.call_starts,
        )


# -- recovery times --------------------------------------------------------------


class Recovery(NamedTuple):
    kill_recovery: list[float]
    hang_detection: list[float]
    hang_recovery: list[float]


def full_again(samples: Iterable[tuple[float, int, int]], since: float, count: int) -> float | None:
    """In a stand-in timeline of ``(seconds, open connections, calls in flight)``:
    the first moment after ``since`` at which ``count`` calls were in flight
    again, once they had dropped below it (a victim's call ended), or None. A
    victim that dies a moment after the fault is not taken for its replacement."""
    dipped = False
    for t, _open, in_flight in samples:
        if t < since:
            continue
        if in_flight < count:
            dipped = True
        elif dipped:
            return t
    return None


def first_call_after(
    call_starts: Mapping[int, Sequence[float]], slot: int, wall: float
) -> float | None:
    """Seconds from ``wall`` to the first successful call started on ``slot``.

    After a SIGKILL or a permanent SIGSTOP the victim starts nothing more,
    so that call is its replacement's.
    """
    later = [t for t in call_starts.get(slot, ()) if t > wall]
    return min(later) - wall if later else None


def recovery_times(
    faults: Iterable[Fault],
    events: Iterable[SlotEvent],
    call_starts: Mapping[int, Sequence[float]],
    t0: float,
) -> Recovery:
    """Recovery from each slot fault: a kill until the replacement's first call;
    a permanent stop until the supervisor's kill (``events``, monotonic time;
    ``t0`` is the monotonic start of the faults' clock) and until the
    replacement's first call (``call_starts``, wall-clock time)."""
    out = Recovery([], [], [])
    killed = [e for e in events if e.kind == "killed"]
    for fault in faults:
        if fault.kind == "kill":
            took = first_call_after(call_starts, fault.slot, fault.wall)
            if took is not None:
                out.kill_recovery.append(took)
        elif fault.kind == "stop_long":
            since = t0 + fault.at
            hit = next((e for e in killed if e.slot == fault.slot and e.at >= since), None)
            if hit is not None:
                out.hang_detection.append(hit.at - since)
            took = first_call_after(call_starts, fault.slot, fault.wall)
            if took is not None:
                out.hang_recovery.append(took)
    return out


# -- the figures -----------------------------------------------------------------


def make_snapshot(
    stats: StandInStats,
    *,
    elapsed: float,
    duration: float,
    queued: int,
    busy_slots: int,
    last_ok: int,
    dt: float,
    restarts: int,
    faults: int,
    submitted: int,
) -> Snapshot:
    """The live figures; throughput counts the calls answered 200 since ``last_ok``,
    ``dt`` seconds ago."""
    return Snapshot(
        elapsed=elapsed,
        duration=duration,
        limit=stats.limit,
        active=stats.active,
        in_flight=stats.in_flight,
        max_concurrency=stats.max_concurrency,
        over_limit_seconds=stats.over_limit_seconds,
        utilization=stats.utilisation,
        queued=queued,
        busy_slots=busy_slots,
        ok_calls=stats.ok_total,
        throughput=(stats.ok_total - last_ok) / dt if dt > 0 else 0.0,
        restarts=restarts,
        faults=faults,
        submitted=submitted,
    )


def build_result(
    scenario: Scenario,
    measured: StandInStats,
    *,
    useful: float,
    outcomes: Outcomes,
    unfinished: int,
    restarts: int,
    faults: list[Fault],
    recovery: Recovery,
) -> ScenarioResult:
    """The result of a run: ``measured`` is the stand-in's stats at the end of the
    measured window, ``useful`` its service time of 200s inside that window."""
    n, window = scenario.slots, measured.elapsed_seconds
    return ScenarioResult(
        slots=n,
        limit=measured.limit,
        duration=window,
        call_ms=scenario.call_ms,
        chaos=scenario.chaos is not None,
        max_concurrency=measured.max_concurrency,
        max_in_flight=measured.max_in_flight,
        over_limit_seconds=measured.over_limit_seconds,
        over_limit_events=measured.over_limit_events,
        rejected=measured.rejected_total,
        utilization=measured.utilisation,
        goodput=useful / (n * window) if n and window else 0.0,
        api_calls_ok=measured.ok_total,
        submitted=outcomes.submitted,
        completed=outcomes.counts["ok"],
        expired=outcomes.counts["expired"],
        dead=outcomes.counts["dead"],
        lost=outcomes.counts["lost"],
        duplicated=outcomes.counts["duplicated"],
        unfinished=unfinished,
        restarts=restarts,
        faults=faults,
        kill_recovery=recovery.kill_recovery,
        hang_detection=recovery.hang_detection,
        hang_recovery=recovery.hang_recovery,
        timeline=measured.samples,
        dead_reasons=outcomes.dead_reasons,
    )
