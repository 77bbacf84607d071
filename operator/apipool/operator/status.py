"""The pool's status: counts, utilization and conditions (pure).

Every key :func:`build_status` can write is in :data:`STATUS_KEYS` (and in the
CRD's status schema: the API server prunes any other). The figures read from
Redis (:data:`REDIS_FIGURES`) are written as null when Redis could not be read,
so that a stale figure never outlives the reading it came from.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..ledger import SlotSeconds
from ..stats import PoolStats
from .planning import Action, ObservedPod

REDIS_FIGURES = (
    "busySlots",
    "queueDepth",
    "inFlight",
    "deadLetters",
    "utilization",
    "effectiveSlots",
    "largestLoss",
)
"""Status figures read from the pool's Redis: null when it could not be read."""
STATUS_KEYS = frozenset(
    {"desiredSlots", "readySlots", "updatedSlots", "selector", "observedGeneration", "conditions"}
    | set(REDIS_FIGURES)
)
"""Every key of the status this module writes."""


@dataclass(frozen=True)
class Problem:
    """Why the pool is degraded: a condition reason and a message."""

    reason: str
    message: str
    retry: bool = True
    """Whether kopf should retry soon (a Secret or a Redis that may come back);
    False where only a change of the spec or of the cluster helps (the timer
    still looks again)."""


def condition(
    kind: str,
    status: bool,
    reason: str,
    message: str,
    *,
    generation: int,
    now: str,
    previous: Sequence[Mapping[str, Any]] = (),
) -> dict[str, Any]:
    """A condition; lastTransitionTime only moves when the status flips."""
    text = "True" if status else "False"
    before = next((c for c in previous if c.get("type") == kind), None)
    since = before["lastTransitionTime"] if before and before.get("status") == text else now
    return {
        "type": kind,
        "status": text,
        "reason": reason,
        "message": message,
        "lastTransitionTime": since,
        "observedGeneration": generation,
    }


def _conditions(
    *,
    slots: int,
    ready: int,
    current: int,
    settled: bool,
    pending: int,
    problem: Problem | None,
    generation: int,
    now: str,
    previous: Sequence[Mapping[str, Any]],
) -> list[dict[str, Any]]:
    """Ready, Progressing and Degraded, in that order."""

    def cond(kind: str, value: bool, reason: str, message: str) -> dict[str, Any]:
        return condition(
            kind, value, reason, message, generation=generation, now=now, previous=previous
        )

    if problem is not None:
        degraded = cond("Degraded", True, problem.reason, problem.message)
    else:
        degraded = cond("Degraded", False, "AsExpected", "no problem seen")
    if ready == slots and problem is None:
        ready_cond = cond("Ready", True, "AllSlotsReady", f"{ready}/{slots} slots ready")
    else:
        why = problem.reason if problem is not None else "SlotsNotReady"
        ready_cond = cond("Ready", False, why, f"{ready}/{slots} slots ready")
    if settled:
        progressing = cond("Progressing", False, "Settled", "every slot is up to date")
    else:
        progressing = cond(
            "Progressing",
            True,
            "Reconciling",
            f"{current}/{slots} slots up to date, {pending} action(s) pending",
        )
    return [ready_cond, progressing, degraded]


def build_status(
    *,
    slots: int,
    selector: str,
    pods: Sequence[ObservedPod],
    template_hash: str,
    actions: Sequence[Action],
    stats: PoolStats | None,
    utilization: float | None,
    problem: Problem | None,
    generation: int,
    now: str,
    previous: Sequence[Mapping[str, Any]] = (),
    ledger: SlotSeconds | None = None,
) -> dict[str, Any]:
    """The whole status of a pool: slot counts, the Redis figures (null when
    ``stats`` is None: not known), and the three conditions. With the pool's
    ``ledger`` over the status window (slots write one), utilization is the
    share of paid capacity spent calling and ``largestLoss`` the largest cause
    of the rest; without it, utilization comes from the busy-time samples."""
    ready = sum(1 for p in pods if p.index < slots and p.ready and not p.terminating)
    current = sum(
        1
        for p in pods
        if p.index < slots and p.template_hash == template_hash and not p.terminating
    )
    status: dict[str, Any] = {
        "desiredSlots": slots,
        "readySlots": ready,
        "updatedSlots": current,
        "selector": selector,
        "observedGeneration": generation,
        **dict.fromkeys(REDIS_FIGURES),
    }
    if stats is not None:
        status.update(
            busySlots=stats.busy,
            queueDepth=stats.queued,
            inFlight=sum(stats.inflight.values()),
            deadLetters=stats.dead_letters,
        )
        status["effectiveSlots"] = stats.effective_slots
        if ledger is not None and ledger.utilization is not None:
            utilization = min(1.0, ledger.utilization)
            largest = ledger.largest_loss
            if largest is not None:
                status["largestLoss"] = {"cause": largest[0], "share": round(largest[1], 4)}
        if utilization is not None:
            status["utilization"] = round(utilization, 4)
    status["conditions"] = _conditions(
        slots=slots,
        ready=ready,
        current=current,
        settled=not actions and current == slots and len(pods) == slots,
        pending=len(actions),
        problem=problem,
        generation=generation,
        now=now,
        previous=previous,
    )
    return status
