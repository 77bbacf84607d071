"""The pod status a kubelet writes, built from what the node knows (pure).

:class:`ContainerView` is one container's state as the node sees it;
:func:`pod_status` turns the views into the ``status`` of the pod: ``phase``,
the conditions ``PodScheduled``, ``Initialized``, ``ContainersReady`` and
``Ready`` (their ``lastTransitionTime`` kept while their value stays),
addresses, ``startTime`` and ``containerStatuses``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["ContainerView", "pod_phase", "pod_status"]


@dataclasses.dataclass
class ContainerView:
    name: str
    image: str
    restart_count: int = 0
    state: dict[str, Any] = dataclasses.field(
        default_factory=lambda: {"waiting": {"reason": "ContainerCreating"}}
    )
    last_state: dict[str, Any] = dataclasses.field(default_factory=dict)
    ready: bool = False
    started: bool = False
    container_id: str | None = None

    def as_api(self) -> dict[str, Any]:
        status: dict[str, Any] = {
            "name": self.name,
            "image": self.image,
            "imageID": f"local-node://{self.image}",
            "ready": self.ready,
            "started": self.started,
            "restartCount": self.restart_count,
            "state": self.state,
            "lastState": self.last_state,
        }
        if self.container_id:
            status["containerID"] = self.container_id
        return status


def pod_phase(views: Sequence[ContainerView], restart_policy: str, ended: bool) -> str:
    """``Pending`` until every container has started once; ``Running`` while any
    runs or will be restarted (``Always``; ``OnFailure`` after a failure);
    ``Succeeded``/``Failed`` once all have ended for good (``ended``: the pod is
    being torn down)."""
    states = [next(iter(v.state)) for v in views]
    if not ended:
        if all(s == "waiting" for s in states) and all(v.restart_count == 0 for v in views):
            return "Pending"
        if restart_policy == "Always" or any(s != "terminated" for s in states):
            return "Running"
    codes = [v.state.get("terminated", {}).get("exitCode", 1) for v in views]
    if all(c == 0 for c in codes):
        return "Succeeded"
    return "Running" if restart_policy == "OnFailure" and not ended else "Failed"


def _condition(
    kind: str, value: bool, previous: Mapping[str, Mapping[str, Any]], now: str
) -> dict[str, Any]:
    text = "True" if value else "False"
    before = previous.get(kind)
    since = before.get("lastTransitionTime") if before and before.get("status") == text else None
    return {"type": kind, "status": text, "lastTransitionTime": since or now}


def pod_status(
    views: Sequence[ContainerView],
    *,
    restart_policy: str,
    ended: bool,
    pod_ip: str,
    host_ip: str,
    start_time: str,
    previous: Mapping[str, Any],
    now: str,
) -> dict[str, Any]:
    """The pod's ``status`` (``previous``: the status the pod has now)."""
    before = {c.get("type"): c for c in previous.get("conditions") or []}
    ready = bool(views) and all(v.ready for v in views) and not ended
    conditions = [
        _condition("PodScheduled", True, before, now),
        _condition("Initialized", True, before, now),
        _condition("ContainersReady", ready, before, now),
        _condition("Ready", ready, before, now),
    ]
    return {
        "phase": pod_phase(views, restart_policy, ended),
        "conditions": conditions,
        "hostIP": host_ip,
        "hostIPs": [{"ip": host_ip}],
        "podIP": pod_ip,
        "podIPs": [{"ip": pod_ip}],
        "startTime": start_time,
        "containerStatuses": [v.as_api() for v in views],
    }
