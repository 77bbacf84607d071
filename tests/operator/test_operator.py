"""The kopf operator end to end against the Kubernetes API emulator.

A pool's Secret points at the session's real redis-server, so the operator sees
a healthy Redis (the Redis side is checked in test_operator_redis.py). The
emulator plays the kubelet: by default a new pod is Running and Ready after
20 ms and a deleted pod stays Terminating for 50 ms; tests that need to hold a
pod in either state say so with ``pytest.mark.emulator(...)``.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from .conftest import NAMESPACE, PODS, TIMER_INTERVAL, Cluster, OperatorThread, wait_for
from .emulator import Emulator

pytestmark = pytest.mark.operator

HASH = "apipool.dev/template-hash"


def uids(cluster: Cluster, pool: str) -> dict[str, str]:
    return {name: pod["metadata"]["uid"] for name, pod in cluster.pods(pool).items()}


def is_ready(pod: dict[str, Any]) -> bool:
    conditions = (pod.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def degraded(cluster: Cluster, pool: str) -> bool:
    return cluster.condition(pool, "Degraded").get("status") == "True"


def settled(cluster: Cluster, pool: str, slots: int) -> bool:
    """Exactly the slots, all Ready and up to date, and a status that says so for
    this generation."""
    if not cluster.slots_are(pool, range(slots)):
        return False
    body = cluster.pool(pool)
    status = body.get("status") or {}
    ready = next((c for c in status.get("conditions") or [] if c["type"] == "Ready"), {})
    return (
        status.get("observedGeneration") == body["metadata"]["generation"]
        and status.get("readySlots") == slots
        and status.get("updatedSlots") == slots
        and ready.get("status") == "True"
    )


@pytest.mark.timeout(20)
def test_a_new_pool_gets_exactly_n_slot_pods(cluster: Cluster, operator: OperatorThread) -> None:
    pool = cluster.new_name()
    created = cluster.create_pool(pool, slots=3)
    wait_for(lambda: settled(cluster, pool, 3), 5, what="3 ready slots")

    pods = cluster.pods(pool)
    assert sorted(pods) == [f"{pool}-slot-{i}" for i in range(3)]
    hashes = set()
    for i in range(3):
        pod = pods[f"{pool}-slot-{i}"]
        meta = pod["metadata"]
        assert meta["ownerReferences"] == [
            {
                "apiVersion": "apipool.dev/v1alpha1",
                "kind": "ApiConcurrencyPool",
                "name": pool,
                "uid": created["metadata"]["uid"],
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]
        labels = meta["labels"]
        assert labels["app.kubernetes.io/name"] == "apipool"
        assert labels["app.kubernetes.io/component"] == "slot"
        assert labels["apipool.dev/pool"] == pool
        assert labels["apipool.dev/slot"] == str(i)
        assert labels[HASH] == meta["annotations"][HASH]
        hashes.add(labels[HASH])
        (container,) = pod["spec"]["containers"]
        assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert container["startupProbe"]["httpGet"]["path"] == "/healthz"
        assert container["image"] == "ghcr.io/example/apipool:0.1.0"
        assert ["--slot", str(i)] == container["args"][3:5]
    assert len(hashes) == 1

    status = cluster.status(pool)
    assert status["desiredSlots"] == 3
    assert status["readySlots"] == 3
    assert status["updatedSlots"] == 3
    assert status["selector"] == (
        f"app.kubernetes.io/name=apipool,app.kubernetes.io/component=slot,apipool.dev/pool={pool}"
    )
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["Ready"]["status"] == "True"
    assert conditions["Ready"]["reason"] == "AllSlotsReady"
    assert conditions["Progressing"]["status"] == "False"
    assert conditions["Degraded"]["status"] == "False"
    wait_for(lambda: len(cluster.events(pool, reason="SlotCreated")) == 3, 3, what="3 Events")
    assert {e["type"] for e in cluster.events(pool, reason="SlotCreated")} == {"Normal"}

    # Timer ticks and pod events later on change nothing: still the same three pods.
    before = uids(cluster, pool)
    cluster.wait_reconciles(pool, count=2, timeout=3 * TIMER_INTERVAL + 2)
    assert uids(cluster, pool) == before
    assert cluster.calls(0, method="POST", plural="pods") == sorted(before)


@pytest.mark.timeout(20)
def test_a_deleted_pod_is_recreated_within_a_second(
    cluster: Cluster, operator: OperatorThread
) -> None:
    pool = cluster.new_name()
    cluster.create_pool(pool, slots=3)
    wait_for(lambda: settled(cluster, pool, 3), 5, what="3 ready slots")
    victim = f"{pool}-slot-1"
    old_uid = uids(cluster, pool)[victim]

    started = time.monotonic()
    cluster.delete_pod(victim)
    wait_for(
        lambda: uids(cluster, pool).get(victim, old_uid) != old_uid,
        2,
        interval=0.005,
        what="the replacement pod",
    )
    took = time.monotonic() - started
    # 50 ms of emulated grace included; the timer (1 s) is not what brought it back.
    assert took < 1.0, f"recreated after {took:.3f} s"
    wait_for(lambda: settled(cluster, pool, 3), 3, what="3 ready slots again")
    assert cluster.calls(0, method="DELETE", plural="pods") == [victim]


@pytest.mark.timeout(20)
def test_scale_up_and_down_highest_slots_go_first(
    cluster: Cluster, operator: OperatorThread, max_slot_pods: Any
) -> None:
    pool = cluster.new_name()
    cluster.create_pool(pool, slots=3)
    wait_for(lambda: settled(cluster, pool, 3), 5, what="3 ready slots")
    kept = uids(cluster, pool)

    cluster.patch_spec(pool, slots=5)
    wait_for(lambda: settled(cluster, pool, 5), 5, what="5 ready slots")
    assert {k: v for k, v in uids(cluster, pool).items() if k in kept} == kept
    assert cluster.pool(pool)["metadata"]["generation"] == 2

    seen = max_slot_pods(pool)
    since = cluster.mark()
    cluster.patch_spec(pool, slots=2)
    wait_for(lambda: settled(cluster, pool, 2), 5, what="2 ready slots")
    deleted = cluster.calls(since, method="DELETE", plural="pods")
    assert deleted == [f"{pool}-slot-{i}" for i in (4, 3, 2)]
    assert seen[0] <= 5
    assert cluster.calls(since, method="POST", plural="pods") == []
    assert cluster.status(pool)["desiredSlots"] == 2


@pytest.mark.timeout(20)
def test_kubectl_scale_sets_the_slots(cluster: Cluster, operator: OperatorThread) -> None:
    pool = cluster.new_name()
    cluster.create_pool(pool, slots=2)
    wait_for(lambda: settled(cluster, pool, 2), 5, what="2 ready slots")
    scale = cluster.custom.get_namespaced_custom_object_scale(
        "apipool.dev", "v1alpha1", NAMESPACE, "apiconcurrencypools", pool
    )
    assert scale["spec"]["replicas"] == 2
    assert scale["status"] == {"replicas": 2, "selector": cluster.status(pool)["selector"]}

    answer = cluster.scale(pool, 4)
    assert answer["spec"]["replicas"] == 4
    body = cluster.pool(pool)
    assert body["spec"]["slots"] == 4
    assert body["metadata"]["generation"] == 2
    wait_for(lambda: settled(cluster, pool, 4), 5, what="4 ready slots")
    assert cluster.status(pool)["observedGeneration"] == 2


@pytest.mark.timeout(30)
@pytest.mark.emulator(pod_grace=None, auto_ready=None)
def test_a_template_change_replaces_one_pod_at_a_time(
    cluster: Cluster, kube: Any, operator: OperatorThread
) -> None:
    """Kill before replace, one slot at a time: never more than N slot pods exist
    (Terminating ones included) and never more than maxUnavailable (1) is down."""
    pool, n = cluster.new_name(), 3
    cluster.create_pool(pool, slots=n)
    wait_for(lambda: len(cluster.pods(pool)) == n, 5, what="3 pods")
    assert not any(is_ready(p) for p in cluster.pods(pool).values())
    wait_for(lambda: cluster.status(pool).get("desiredSlots") == n, 3, what="a status")
    assert cluster.status(pool)["readySlots"] == 0
    for name in cluster.pods(pool):
        kube.set_pod_status(name, phase="Running", ready=True)
    wait_for(lambda: settled(cluster, pool, n), 5, what="3 ready slots")
    old_hash = next(iter(cluster.pods(pool).values()))["metadata"]["labels"][HASH]

    most = {"pods": 0, "unavailable": 0}

    def check(emulator: Emulator) -> None:
        pods = [
            pod
            for _, pod in emulator.live(PODS)
            if (pod["metadata"].get("labels") or {}).get("apipool.dev/pool") == pool
        ]
        available = sum(
            1 for p in pods if is_ready(p) and not p["metadata"].get("deletionTimestamp")
        )
        most["pods"] = max(most["pods"], len(pods))
        most["unavailable"] = max(most["unavailable"], n - available)
        assert len(pods) <= n, f"{len(pods)} slot pods exist at once"

    kube.observe(check)
    cluster.patch_spec(pool, image="ghcr.io/example/apipool:0.2.0")

    replaced = []
    for _ in range(n):
        wait_for(
            lambda: cluster.pod_names(pool, terminating=True), 5, what="a Terminating slot pod"
        )
        (going,) = cluster.pod_names(pool, terminating=True)
        replaced.append(going)
        # While it terminates, its name is taken: no replacement, no other deletion.
        cluster.wait_reconciles(pool, count=1)
        assert cluster.pod_names(pool, terminating=True) == [going]
        assert len(cluster.pods(pool)) == n
        # No container of it is known to run: the operator lets its name go
        # (the slot-exit finalizer), and the object goes at the end of its grace.
        wait_for(
            lambda g=going: not cluster.pods(pool)[g]["metadata"].get("finalizers"),
            5,
            what=f"{going} released",
        )
        assert kube.finish_deletion(going)
        wait_for(
            lambda g=going: (
                g in cluster.pods(pool)
                and cluster.pods(pool)[g]["metadata"]["labels"][HASH] != old_hash
            ),
            5,
            what=f"the new {going}",
        )
        kube.set_pod_status(going, phase="Running", ready=True)

    assert replaced == [f"{pool}-slot-{i}" for i in (2, 1, 0)]
    wait_for(lambda: settled(cluster, pool, n), 5, what="the rollout to finish")
    hashes = {p["metadata"]["labels"][HASH] for p in cluster.pods(pool).values()}
    assert len(hashes) == 1
    assert old_hash not in hashes
    assert most == {"pods": n, "unavailable": 1}
    progressing = cluster.condition(pool, "Progressing")
    assert (progressing["status"], progressing["reason"]) == ("False", "Settled")
    assert cluster.status(pool)["updatedSlots"] == n


@pytest.mark.timeout(20)
@pytest.mark.emulator(auto_ready=None)
def test_status_counts_ready_slots_and_follows_the_generation(
    cluster: Cluster, kube: Any, operator: OperatorThread
) -> None:
    pool = cluster.new_name()
    cluster.create_pool(pool, slots=2)
    wait_for(lambda: len(cluster.pods(pool)) == 2, 5, what="2 pods")
    wait_for(lambda: cluster.status(pool).get("desiredSlots") == 2, 3, what="a status")
    ready = cluster.condition(pool, "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "SlotsNotReady")
    assert ready["message"] == "0/2 slots ready"

    kube.set_pod_status(f"{pool}-slot-0", phase="Running", ready=True)
    wait_for(lambda: cluster.status(pool).get("readySlots") == 1, 3, what="1 ready slot")
    assert cluster.condition(pool, "Ready")["message"] == "1/2 slots ready"
    kube.set_pod_status(f"{pool}-slot-1", phase="Running", ready=True)
    wait_for(lambda: cluster.condition(pool, "Ready").get("status") == "True", 3, what="Ready")
    assert cluster.status(pool)["observedGeneration"] == 1

    # A spec change that does not touch the pods still moves observedGeneration.
    cluster.patch_spec(pool, maxQueueLength=100)
    assert cluster.pool(pool)["metadata"]["generation"] == 2
    wait_for(lambda: cluster.status(pool).get("observedGeneration") == 2, 3, what="generation 2")
    assert cluster.condition(pool, "Ready")["observedGeneration"] == 2

    # A slot that stops being ready shows at once.
    kube.set_pod_status(f"{pool}-slot-1", ready=False)
    wait_for(lambda: cluster.status(pool).get("readySlots") == 1, 3, what="1 ready slot")
    assert cluster.condition(pool, "Ready")["status"] == "False"


@pytest.mark.timeout(20)
def test_an_invalid_spec_degrades_the_pool_and_leaves_its_slots(
    cluster: Cluster, operator: OperatorThread
) -> None:
    pool = cluster.new_name()
    cluster.create_pool(pool, slots=2)
    wait_for(lambda: settled(cluster, pool, 2), 5, what="2 ready slots")
    before = uids(cluster, pool)

    since = cluster.mark()
    # Valid for the CRD's schema (the API server stores it), not for parse_spec.
    cluster.patch_spec(pool, extraHandlers=["http"], slots=4)
    wait_for(lambda: degraded(cluster, pool), 3, what="Degraded")
    problem = cluster.condition(pool, "Degraded")
    assert problem["reason"] == "InvalidSpec"
    assert "handler name(s) given twice: http" in problem["message"]
    wait_for(lambda: cluster.events(pool, reason="InvalidSpec"), 3, what="a Warning Event")
    (event,) = cluster.events(pool, reason="InvalidSpec")
    assert event["type"] == "Warning"
    assert event["message"] == problem["message"]

    # Reconciles go on (timer, pod events) but touch no pod and post no second Event.
    cluster.wait_reconciles(pool, count=2, timeout=3 * TIMER_INTERVAL + 2)
    assert uids(cluster, pool) == before
    assert cluster.calls(since, method="POST", plural="pods") == []
    assert cluster.calls(since, method="DELETE", plural="pods") == []
    assert len(cluster.events(pool, reason="InvalidSpec")) == 1
    status = cluster.status(pool)
    assert status["desiredSlots"] == 4
    assert status["observedGeneration"] == 2
    assert cluster.condition(pool, "Ready")["status"] == "False"

    # Fixed: the pool is reconciled again.
    cluster.patch_spec(pool, extraHandlers=[])
    wait_for(lambda: settled(cluster, pool, 4), 5, what="4 ready slots")
    assert cluster.condition(pool, "Degraded")["status"] == "False"
    assert {k: v for k, v in uids(cluster, pool).items() if k in before} == before


@pytest.mark.timeout(20)
def test_a_pool_created_invalid_gets_no_pods(cluster: Cluster, operator: OperatorThread) -> None:
    pool = cluster.new_name()
    cluster.create_pool(pool, slots=2, extraHandlers=["http"])  # the CRD lets it in
    wait_for(lambda: degraded(cluster, pool), 3, what="Degraded")
    assert cluster.condition(pool, "Degraded")["reason"] == "InvalidSpec"
    assert "given twice: http" in cluster.condition(pool, "Degraded")["message"]
    cluster.wait_reconciles(pool, count=1, timeout=TIMER_INTERVAL + 2)
    assert cluster.pods(pool) == {}


@pytest.mark.timeout(20)
def test_a_missing_secret_is_reported_and_existing_pods_stay(
    cluster: Cluster, operator: OperatorThread
) -> None:
    pool = cluster.new_name()
    cluster.create_pool(pool, slots=2)
    wait_for(lambda: settled(cluster, pool, 2), 5, what="2 ready slots")
    before = uids(cluster, pool)

    since = cluster.mark()
    cluster.patch_spec(pool, redis={"secretRef": {"name": "elsewhere", "key": "url"}}, slots=3)
    wait_for(lambda: degraded(cluster, pool), 3, what="Degraded")
    problem = cluster.condition(pool, "Degraded")
    assert problem["reason"] == "RedisSecretMissing"
    assert f"Secret {NAMESPACE}/elsewhere" in problem["message"]
    wait_for(lambda: cluster.events(pool, reason="RedisSecretMissing"), 3, what="an Event")
    assert cluster.events(pool, reason="RedisSecretMissing")[0]["type"] == "Warning"
    ready = cluster.condition(pool, "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "RedisSecretMissing")
    cluster.wait_reconciles(pool, count=2, timeout=3 * TIMER_INTERVAL + 2)
    # The new template (another Secret) cannot start: the running pods are kept.
    assert uids(cluster, pool) == before
    assert cluster.calls(since, method="POST", plural="pods") == []
    assert cluster.calls(since, method="DELETE", plural="pods") == []
    assert len(cluster.events(pool, reason="RedisSecretMissing")) == 1

    # The Secret appears: the next reconcile (the timer) rolls the pool forward.
    cluster.put_secret("elsewhere", {"url": cluster.redis_url})
    wait_for(lambda: settled(cluster, pool, 3), 3 * TIMER_INTERVAL + 5, what="3 slots")
    wait_for(
        lambda: cluster.condition(pool, "Degraded").get("status") == "False", 3, what="healthy"
    )
    assert not set(uids(cluster, pool).values()) & set(before.values())


@pytest.mark.timeout(30)
def test_a_restarted_operator_resumes_without_duplicates(
    cluster: Cluster, operator: OperatorThread, max_slot_pods: Any
) -> None:
    pool = cluster.new_name()
    cluster.create_pool(pool, slots=3)
    wait_for(lambda: settled(cluster, pool, 3), 5, what="3 ready slots")
    seen = max_slot_pods(pool)
    before = uids(cluster, pool)

    operator.stop()
    # Nothing tends the pool while the operator is down: the deleted pod stays
    # Terminating (its slot-exit finalizer is the operator's to remove).
    cluster.patch_spec(pool, slots=4)
    cluster.delete_pod(f"{pool}-slot-1")
    wait_for(
        lambda: cluster.pod_names(pool, terminating=True) == [f"{pool}-slot-1"],
        3,
        what="the pod Terminating",
    )
    assert len(cluster.pods(pool)) == 3

    since = cluster.mark()
    operator.start()
    wait_for(lambda: settled(cluster, pool, 4), 5, what="4 ready slots")
    after = uids(cluster, pool)
    assert after[f"{pool}-slot-0"] == before[f"{pool}-slot-0"]
    assert after[f"{pool}-slot-2"] == before[f"{pool}-slot-2"]
    assert sorted(cluster.calls(since, method="POST", plural="pods")) == [
        f"{pool}-slot-1",
        f"{pool}-slot-3",
    ]
    assert seen[0] <= 4

    # A second restart with nothing to do changes nothing.
    operator.stop()
    since = cluster.mark()
    operator.start()
    cluster.wait_reconciles(pool, count=2, timeout=3 * TIMER_INTERVAL + 2)
    assert uids(cluster, pool) == after
    assert cluster.calls(since, method="POST", plural="pods") == []
    assert cluster.calls(since, method="DELETE", plural="pods") == []


@pytest.mark.timeout(20)
def test_the_timer_heals_a_missed_event(
    cluster: Cluster, kube: Any, operator: OperatorThread
) -> None:
    pool = cluster.new_name()
    cluster.create_pool(pool, slots=3)
    wait_for(lambda: settled(cluster, pool, 3), 5, what="3 ready slots")
    victim = f"{pool}-slot-2"
    old_uid = uids(cluster, pool)[victim]

    # Gone from the store without a watch event: only the timer can notice.
    assert kube.vanish(PODS, victim)
    assert victim not in cluster.pods(pool)
    started = time.monotonic()
    wait_for(
        lambda: uids(cluster, pool).get(victim, old_uid) != old_uid,
        2 * TIMER_INTERVAL + 2,
        what="the timer to recreate the pod",
    )
    assert time.monotonic() - started < 2 * TIMER_INTERVAL + 1
    wait_for(lambda: settled(cluster, pool, 3), 3, what="3 ready slots")


@pytest.mark.timeout(20)
def test_deleting_the_pool_removes_its_pods(cluster: Cluster, operator: OperatorThread) -> None:
    pool = cluster.new_name()
    other = cluster.new_name()
    cluster.create_pool(pool, slots=2)
    cluster.create_pool(other, slots=1)
    wait_for(lambda: settled(cluster, pool, 2) and settled(cluster, other, 1), 5, what="pools")

    cluster.delete_pool(pool)
    wait_for(lambda: cluster.pods(pool) == {}, 5, what="the pods gone")

    def pool_gone() -> bool:
        try:
            cluster.pool(pool)
        except cluster.ApiException as exc:
            return exc.status == 404
        return False

    wait_for(pool_gone, 5, what="the pool gone (finalizer released)")
    assert cluster.slots_are(other, range(1))

    # The operator forgets the deleted pool (its lock, its busy samples) and only it.
    states = operator.reconciler.states if operator.reconciler else None
    assert states is not None
    wait_for(lambda: (NAMESPACE, pool) not in states, 3, what="the deleted pool forgotten")
    cluster.wait_reconciles(other, count=1, timeout=TIMER_INTERVAL + 2)
    assert (NAMESPACE, other) in states
    assert (NAMESPACE, pool) not in states


@pytest.mark.timeout(20)
@pytest.mark.emulator(pod_grace=None, auto_ready=None)
def test_the_emulator_acts_as_an_api_server_where_the_operator_relies_on_it(
    cluster: Cluster, kube: Any
) -> None:
    """No operator here: what tests/operator/emulator.py adds to kmock's emulator."""
    group, version, plural = "apipool.dev", "v1alpha1", "apiconcurrencypools"
    pool = cluster.new_name()
    meta = cluster.create_pool(pool, slots=1)["metadata"]
    assert meta["uid"]
    assert meta["creationTimestamp"].endswith("Z")
    assert (meta["namespace"], meta["generation"]) == (NAMESPACE, 1)

    # The status subresource changes only the status; the object never the status.
    cluster.custom.patch_namespaced_custom_object_status(
        group, version, NAMESPACE, plural, pool, {"status": {"readySlots": 1}, "spec": {"slots": 9}}
    )
    cluster.patch_pool(pool, {"status": {"readySlots": 7}, "metadata": {"labels": {"a": "b"}}})
    body = cluster.pool(pool)
    assert (body["spec"]["slots"], body["status"]["readySlots"]) == (1, 1)
    assert body["metadata"]["labels"] == {"a": "b"}
    assert body["metadata"]["generation"] == 1
    assert int(body["metadata"]["resourceVersion"]) > int(meta["resourceVersion"])
    cluster.patch_spec(pool, slots=2)
    assert cluster.pool(pool)["metadata"]["generation"] == 2

    # kopf's optimistic JSON-patch: a stale resourceVersion fails with 422.
    def json_patch(version_seen: str) -> None:
        cluster.custom.patch_namespaced_custom_object(
            group,
            version,
            NAMESPACE,
            plural,
            pool,
            [
                {"op": "test", "path": "/metadata/resourceVersion", "value": version_seen},
                {"op": "add", "path": "/metadata/finalizers", "value": ["test/x"]},
            ],
            _content_type="application/json-patch+json",
        )

    with pytest.raises(cluster.ApiException) as failed:
        json_patch(meta["resourceVersion"])
    assert failed.value.status == 422
    json_patch(cluster.pool(pool)["metadata"]["resourceVersion"])
    assert cluster.pool(pool)["metadata"]["finalizers"] == ["test/x"]
    cluster.patch_pool(pool, {"metadata": {"finalizers": None}})

    # generateName, the namespace from the URL, label selectors.
    owner = {
        "apiVersion": f"{group}/{version}",
        "kind": "ApiConcurrencyPool",
        "name": pool,
        "uid": meta["uid"],
    }

    def pod(value: str) -> Any:
        body = {
            "metadata": {
                "generateName": "x-",
                "labels": {"k": value},
                "ownerReferences": [owner],
            },
            "spec": {"containers": [{"name": "c", "image": "i"}]},
        }
        return cluster.core.create_namespaced_pod(NAMESPACE, body)

    a, b = pod("v"), pod("w")
    assert a.metadata.name.startswith("x-")
    assert a.metadata.name != b.metadata.name
    assert a.metadata.namespace == NAMESPACE

    def selected(selector: str) -> list[str]:
        items = cluster.core.list_namespaced_pod(NAMESPACE, label_selector=selector).items
        return sorted(p.metadata.name for p in items)

    both = sorted([a.metadata.name, b.metadata.name])
    assert selected("k=v") == [a.metadata.name]
    assert selected("k!=v") == [b.metadata.name]
    assert selected("k") == both
    assert selected("k in (v, w)") == both
    assert selected("!k") == []
    with pytest.raises(cluster.ApiException) as failed:
        cluster.core.create_namespaced_pod(
            NAMESPACE, {"metadata": {"name": a.metadata.name}, "spec": {"containers": []}}
        )
    assert failed.value.status == 409

    # A deleted pod is Terminating until its grace ends.
    cluster.delete_pod(a.metadata.name)
    terminating = kube.get(PODS, NAMESPACE, a.metadata.name)
    assert terminating["metadata"]["deletionTimestamp"]
    assert kube.finish_deletion(a.metadata.name)
    assert kube.get(PODS, NAMESPACE, a.metadata.name) is None

    # Garbage collection: the owner is removed, its dependents are deleted.
    cluster.delete_pool(pool)
    wait_for(
        lambda: kube.get(PODS, NAMESPACE, b.metadata.name)["metadata"].get("deletionTimestamp"),
        2,
        what="the dependent pod to be deleted",
    )
    assert kube.finish_deletion(b.metadata.name)
    assert kube.get(PODS, NAMESPACE, b.metadata.name) is None
