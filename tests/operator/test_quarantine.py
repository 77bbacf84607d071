"""A deleted slot pod keeps its name until its process is known gone.

Every slot pod carries the slot-exit finalizer. Pure rules first (planning rule
6, ``apipool.operator.quarantine``), then the operator against the emulator: a
pod whose last status shows a running container is force-deleted; it stays
Terminating, its slot quarantined (``status.quarantinedSlots``, a Warning
Event), until the lease TTL plus ``apiIdleTimeoutSeconds`` have passed since its
deletion; a pod whose containers the kubelet reported stopped is released at
once; the pods of a deleted pool never stay stuck.
"""

from __future__ import annotations

from typing import Any

import pytest

from apipool.operator.manifests import FINALIZER
from apipool.operator.planning import Create, Desired, ObservedPod, Release, plan
from apipool.operator.quarantine import hold_seconds, quarantined, to_status
from apipool.operator.spec import parse_spec

from .conftest import EVENTS, NAMESPACE, PODS, POOLS, Cluster, OperatorThread, wait_for

RUNNING = {"running": {"startedAt": "2026-01-01T00:00:00Z"}}
TERMINATED = {"terminated": {"exitCode": 0, "reason": "Completed"}}


def terminating(*, running: bool, deleted_at: float = 100.0, finalizer: bool = True) -> ObservedPod:
    return ObservedPod(
        1,
        "p-slot-1",
        "h",
        "Running",
        terminating=True,
        uid="u1",
        running=running,
        finalizer_index=0 if finalizer else None,
        deleted_at=deleted_at,
    )


@pytest.mark.unit
def test_a_terminating_pod_whose_containers_stopped_is_released() -> None:
    actions = plan(Desired(2, "h", now=100.0, exit_hold=60.0), [terminating(running=False)])
    assert actions == [Release(1, "p-slot-1", "u1", 0, "no container running"), Create(0)]


@pytest.mark.unit
def test_a_terminating_pod_still_running_keeps_its_name_for_the_hold() -> None:
    pod = terminating(running=True, deleted_at=100.0)
    assert plan(Desired(2, "h", now=159.0, exit_hold=60.0), [pod]) == [Create(0)]
    released = plan(Desired(2, "h", now=160.0, exit_hold=60.0), [pod])
    assert released == [Release(1, "p-slot-1", "u1", 0, "held 60 s past its deletion"), Create(0)]


@pytest.mark.unit
def test_only_terminating_pods_with_the_finalizer_are_released() -> None:
    without = terminating(running=False, finalizer=False)
    assert plan(Desired(2, "h", now=1e9, exit_hold=0.0), [without]) == [Create(0)]
    live = ObservedPod(1, "p-slot-1", "h", "Running", ready=True, finalizer_index=0)
    assert plan(Desired(2, "h", now=1e9, exit_hold=0.0), [live]) == [Create(0)]


@pytest.mark.unit
def test_quarantined_means_running_past_its_deletion_time() -> None:
    pods = [
        terminating(running=True, deleted_at=100.0),
        terminating(running=True, deleted_at=200.0),  # still in its grace
        terminating(running=False, deleted_at=50.0),  # the kubelet confirmed its end
    ]
    assert quarantined(pods, now=150.0) == [pods[0]]
    assert to_status(quarantined(pods, now=150.0), 30.0) == [
        {"slot": 1, "pod": "p-slot-1/u1", "until": "1970-01-01T00:02:10Z"}
    ]


@pytest.mark.unit
def test_the_hold_is_lease_ttl_plus_the_idle_timeout() -> None:
    spec = parse_spec(
        "p",
        {
            "slots": 2,
            "image": "i",
            "redis": {"secretRef": {"name": "r"}},
            "callTimeoutSeconds": 5,
            "apiIdleTimeoutSeconds": 30,
        },
    )
    assert hold_seconds(spec) == pytest.approx(9.5 + 30)


# -- the operator ---------------------------------------------------------------------


def report_container(cluster: Cluster, pod: str, state: dict[str, Any]) -> None:
    """What the kubelet reports of a pod's container."""
    container = {
        "name": "slot",
        "image": "i",
        "imageID": "i",
        "ready": "running" in state,
        "restartCount": 0,
        "state": state,
    }
    cluster.kube.force_merge(PODS, pod, {"status": {"containerStatuses": [container]}})


def force_delete(cluster: Cluster, pod: str) -> None:
    cluster.core.delete_namespaced_pod(pod, NAMESPACE, grace_period_seconds=0)


def reasons(cluster: Cluster) -> list[str]:
    return [e.get("reason", "") for e in cluster.kube.objects(EVENTS)]


def uid_of(cluster: Cluster, pool: str, pod: str) -> str | None:
    found = cluster.pods(pool).get(pod)
    return None if found is None else str(found["metadata"]["uid"])


@pytest.mark.operator
@pytest.mark.timeout(40)
def test_slot_pods_carry_the_slot_exit_finalizer(
    cluster: Cluster, operator: OperatorThread
) -> None:
    pool = cluster.new_name()
    cluster.create_pool(pool, slots=2)
    wait_for(lambda: cluster.slots_are(pool, range(2)), 5, what="2 slot pods")
    assert all(p["metadata"]["finalizers"] == [FINALIZER] for p in cluster.pods(pool).values())


@pytest.mark.operator
@pytest.mark.timeout(40)
def test_a_force_deleted_running_slot_is_quarantined_until_its_hold_ends(
    cluster: Cluster, operator: OperatorThread
) -> None:
    pool = cluster.new_name()
    # Lease TTL 1 + 1 + 0.5 + 3 x 1 = 5.5 s, plus 2 s of idle timeout.
    cluster.create_pool(pool, slots=2, callTimeoutSeconds=1, apiIdleTimeoutSeconds=2)
    victim = f"{pool}-slot-1"
    wait_for(lambda: cluster.slots_are(pool, range(2)), 5, what="2 slot pods")
    old_uid = uid_of(cluster, pool, victim)
    report_container(cluster, victim, RUNNING)
    force_delete(cluster, victim)

    held = wait_for(
        lambda: cluster.status(pool).get("quarantinedSlots"), 5, what="slot 1 in quarantine"
    )
    assert held[0]["slot"] == 1
    assert held[0]["pod"] == f"{victim}/{old_uid}"
    # kopf posts Events from a queue of its own: it may land after the status.
    wait_for(lambda: "SlotQuarantined" in reasons(cluster), 5, what="the Warning Event")
    # Well inside the hold the old object stays, Terminating, and nothing replaces it ...
    cluster.wait_reconciles(pool, count=2)
    pod = cluster.pods(pool)[victim]
    assert pod["metadata"]["uid"] == old_uid
    assert pod["metadata"]["deletionTimestamp"]
    # ... and the slot comes back once the hold has ended.
    wait_for(
        lambda: uid_of(cluster, pool, victim) not in (None, old_uid), 15, what="slot 1 recreated"
    )
    wait_for(lambda: cluster.status(pool).get("quarantinedSlots") == [], 5, what="cleared")


@pytest.mark.operator
@pytest.mark.timeout(20)
def test_a_pod_whose_end_the_kubelet_reported_is_replaced_at_once(
    cluster: Cluster, operator: OperatorThread
) -> None:
    pool = cluster.new_name()
    cluster.create_pool(pool, slots=2, apiIdleTimeoutSeconds=600)
    victim = f"{pool}-slot-1"
    wait_for(lambda: cluster.slots_are(pool, range(2)), 5, what="2 slot pods")
    old_uid = uid_of(cluster, pool, victim)
    report_container(cluster, victim, TERMINATED)
    force_delete(cluster, victim)
    wait_for(
        lambda: uid_of(cluster, pool, victim) not in (None, old_uid), 5, what="slot 1 recreated"
    )
    assert cluster.status(pool).get("quarantinedSlots") == []
    assert "SlotQuarantined" not in reasons(cluster)


@pytest.mark.operator
@pytest.mark.timeout(20)
def test_the_pods_of_a_deleted_pool_do_not_stay_stuck(
    cluster: Cluster, operator: OperatorThread
) -> None:
    pool = cluster.new_name()
    cluster.create_pool(pool, slots=2, apiIdleTimeoutSeconds=600)
    wait_for(lambda: cluster.slots_are(pool, range(2)), 5, what="2 slot pods")
    for name in cluster.pods(pool):
        report_container(cluster, name, RUNNING)  # as far as the API knows, still running
    cluster.custom.delete_namespaced_custom_object(
        POOLS.group, POOLS.version, NAMESPACE, POOLS.plural, pool
    )
    wait_for(lambda: not cluster.pods(pool), 10, what="every slot pod gone")


@pytest.mark.operator
@pytest.mark.timeout(20)
def test_a_deleted_pod_of_a_pool_with_an_invalid_spec_is_released(
    cluster: Cluster, operator: OperatorThread
) -> None:
    """An invalid spec stops creates, not the release of a pod known to be gone."""
    pool = cluster.new_name()
    cluster.create_pool(pool, slots=2)
    victim = f"{pool}-slot-1"
    wait_for(lambda: cluster.slots_are(pool, range(2)), 5, what="2 slot pods")
    cluster.force_spec(pool, maxAttempts=0)
    wait_for(
        lambda: cluster.condition(pool, "Degraded").get("reason") == "InvalidSpec",
        5,
        what="Degraded: InvalidSpec",
    )
    report_container(cluster, victim, TERMINATED)
    force_delete(cluster, victim)
    wait_for(lambda: victim not in cluster.pods(pool), 5, what="the pod released and gone")
    assert cluster.pod_names(pool) == [f"{pool}-slot-0"]  # no create while the spec is invalid
