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


@dataclass(frozen=True)
class ObservedPod:
    index: int
    name: str
    template_hash: str
    phase: str = "Pending"
    ready: bool = False
    terminating: bool = False


@dataclass(frozen=True)
class Create:
    index: int


@dataclass(frozen=True)
class Delete:
    index: int
    name: str
    reason: str


Action = Create | Delete


def _available(pod: ObservedPod | None) -> bool:
    return (
        pod is not None and pod.ready and not pod.terminating and pod.phase not in FINISHED_PHASES
    )


def plan(desired: Desired, observed: Iterable[ObservedPod]) -> list[Action]:
    """The actions that move the observed pods towards the desired pool."""
    pods: dict[int, ObservedPod] = {}
    for pod in observed:
        # Two objects for one index cannot exist (one name); keep the first seen.
        pods.setdefault(pod.index, pod)
    n = desired.slots
    actions: list[Action] = []

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
