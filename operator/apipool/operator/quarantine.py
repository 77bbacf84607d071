"""How long a deleted slot pod's name stays taken: until its process is known
to be gone (pure).

"The pod object is gone" normally means "its processes are dead": the kubelet
kills the containers, writes their terminated status, and only then removes
the object. A force deletion (or the garbage collection of pods on a lost
node) removes the object while the container may still run, on a node the
control plane cannot reach: a process that keeps its TCP connection to the
external API open, or is frozen with its machine and wakes up later. Its
replacement must not open a connection of its own before the API has closed
the old one.

So every slot pod carries the finalizer :data:`FINALIZER`: its object stays,
Terminating, until the operator removes it, which it does (``planning.plan``,
rule 6) as soon as the pod's last status shows no container running (the
kubelet confirmed the end: the usual case, graceful or forced), or else once
:func:`hold_seconds` (lease TTL + ``spec.apiIdleTimeoutSeconds``) have passed
since the pod's ``deletionTimestamp``: by then a cut-off old process calls
nothing (its lease is gone) and the API has closed its connection. Such a slot
is *quarantined*: ``status.quarantinedSlots`` lists it and a Warning Event says
so. The state lives in the pod object itself, so an operator restart (or a
missed watch event) changes nothing.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable
from typing import Any

from .manifests import FINALIZER, timings
from .planning import ObservedPod
from .spec import PoolSpec

__all__ = ["FINALIZER", "hold_seconds", "quarantined", "to_status"]


def hold_seconds(spec: PoolSpec) -> float:
    """Lease TTL + the API's idle timeout."""
    return timings(spec).lease_ttl + spec.api_idle_timeout_seconds


def quarantined(pods: Iterable[ObservedPod], now: float) -> list[ObservedPod]:
    """Slot pods past their deletion time whose container still runs, held by the
    finalizer: their slot waits."""
    return [
        p
        for p in pods
        if p.terminating
        and p.finalizer_index is not None
        and p.running
        and p.deleted_at is not None
        and p.deleted_at <= now
    ]


def _text(when: float) -> str:
    moment = datetime.datetime.fromtimestamp(when, datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def to_status(pods: Iterable[ObservedPod], hold: float) -> list[dict[str, Any]]:
    """``status.quarantinedSlots``: slot, pod (name/uid) and when it is released."""
    return [
        {"slot": p.index, "pod": f"{p.name}/{p.uid}", "until": _text((p.deleted_at or 0) + hold)}
        for p in sorted(pods, key=lambda p: p.index)
    ]
