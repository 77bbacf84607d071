"""What to do to a pool's slot pods: one pure function of desired and observed state.

Rules (kill-before-replace: a replacement never coexists with its predecessor,
so more than N slot pods never run, not even while one is Terminating or sits on
an unreachable node):

1. A missing slot ``i < N`` (no pod of that name at all) is created.
2. A slot pod ``i >= N`` is deleted (scale-down), highest index first.
3. A slot pod that Failed or Succeeded (evicted, say) is deleted; rule 1
   creates it again once it is gone.
4. Out-of-date pods (template hash differs) are deleted, highest index first,
   only while fewer than ``max_unavailable`` slots ``< N`` are unavailable
   (missing, terminating or not ready); rule 1 recreates each once it is gone.
5. A pod that is already terminating is left alone: its name is not free yet.
6. A terminating pod that still carries the slot-exit finalizer is released
   (the finalizer removed, so the API server can remove it and rule 1 can
   recreate its slot) once its last status shows no container running, or
   once ``exit_hold`` seconds have passed since its ``deletionTimestamp``
   (quarantine.py says why).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

FINISHED_PHASES = frozenset({"Failed", "Succeeded"})
TEMPLATE_CHANGED = "pod template changed"
"""The reason of a Delete that replaces an out-of-date pod (a rollout)."""


@dataclass(frozen=True)
class Desired:
    slots: int
    template_hash: str
    max_unavailable: int = 1
    now: float = 0.0
    """Wall-clock time (epoch seconds) of the observation."""
    exit_hold: float = 0.0
    """Seconds after its deletionTimestamp that a pod whose container still runs
    keeps its name (the lease TTL + the API's idle timeout)."""


@dataclass(frozen=True)
class ObservedPod:
    index: int
    name: str
    template_hash: str
    phase: str = "Pending"
    ready: bool = False
    terminating: bool = False
    uid: str = ""
    running: bool = False
    """Its last status shows a container running."""
    finalizer_index: int | None = None
    """Where the slot-exit finalizer is in its finalizers (None: not there)."""
    deleted_at: float | None = None
    """Its deletionTimestamp (epoch seconds): when it should be gone."""


@dataclass(frozen=True)
class Create:
    index: int


@dataclass(frozen=True)
class Delete:
    index: int
    name: str
    reason: str


@dataclass(frozen=True)
class Release:
    """Remove the slot-exit finalizer of a terminating pod."""

    index: int
    name: str
    uid: str
    finalizer_index: int
    reason: str


Action = Create | Delete | Release


def _available(pod: ObservedPod | None) -> bool:
    return (
        pod is not None and pod.ready and not pod.terminating and pod.phase not in FINISHED_PHASES
    )


def _release(desired: Desired, pod: ObservedPod) -> Release | None:
    """Rule 6: a terminating pod's finalizer goes once its process is known gone."""
    if not pod.terminating or pod.finalizer_index is None:
        return None
    if not pod.running:
        why = "no container running"
    elif pod.deleted_at is not None and desired.now >= pod.deleted_at + desired.exit_hold:
        why = f"held {desired.exit_hold:g} s past its deletion"
    else:
        return None
    return Release(pod.index, pod.name, pod.uid, pod.finalizer_index, why)


def releases(desired: Desired, pods: Iterable[ObservedPod]) -> list[Release]:
    """Rule 6 alone: the terminating pods whose finalizer can go now."""
    return [r for p in pods if (r := _release(desired, p)) is not None]


def plan(desired: Desired, observed: Iterable[ObservedPod]) -> list[Action]:
    """The actions that move the observed pods towards the desired pool."""
    pods: dict[int, ObservedPod] = {}
    for pod in observed:
        # Two objects for one index cannot exist (one name); keep the first seen.
        pods.setdefault(pod.index, pod)
    n = desired.slots
    actions: list[Action] = list(releases(desired, pods.values()))

    for index in sorted((i for i in pods if i >= n), reverse=True):
        extra = pods[index]
        if not extra.terminating:
            actions.append(Delete(index, extra.name, f"scale-down to {n} slots"))

    for index in range(n):
        found = pods.get(index)
        if found is None:
            actions.append(Create(index))
        elif found.phase in FINISHED_PHASES and not found.terminating:
            actions.append(Delete(index, found.name, f"pod {found.phase.lower()}"))

    unavailable = sum(1 for index in range(n) if not _available(pods.get(index)))
    budget = desired.max_unavailable - unavailable
    outdated = [
        pods[index]
        for index in range(n - 1, -1, -1)
        if index in pods
        and pods[index].template_hash != desired.template_hash
        and not pods[index].terminating
        and pods[index].phase not in FINISHED_PHASES
    ]
    for pod in outdated:
        if budget <= 0:
            break
        if not pod.ready:
            continue  # already counted as unavailable; replace it when its turn comes
        actions.append(Delete(pod.index, pod.name, TEMPLATE_CHANGED))
        budget -= 1
    # An out-of-date pod that is not ready is replaced at once: it gives no
    # capacity now, so replacing it costs none.
    for pod in outdated:
        if not pod.ready:
            actions.append(Delete(pod.index, pod.name, TEMPLATE_CHANGED))
    return actions
