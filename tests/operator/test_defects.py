"""What a real cluster does to the operator that a lenient API would not show:
RBAC with OwnerReferencesPermissionEnforcement, a status schema that prunes,
the client's own validation of quantities, refusals by admission, probe-level
grace, ownership without the pool's labels, stale Redis figures, sidecars, the
cost of pod events, and the slot's health server on IPv6."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import urllib.request
from collections.abc import Mapping
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from apipool.health import HealthServer
from apipool.ledger import SlotSeconds
from apipool.operator.config import OperatorSettings
from apipool.operator.manifests import grace_period, slot_pod
from apipool.operator.planning import ObservedPod
from apipool.operator.pool_state import PoolStates
from apipool.operator.reconcile import Reconciler
from apipool.operator.spec import parse_spec
from apipool.operator.status import REDIS_FIGURES, Problem, build_status
from apipool.stats import PoolStats

from ..chart.test_chart import helm_backend, manifests
from .conftest import NAMESPACE, Cluster, OperatorThread, wait_for
from .emulator_rbac import (
    OPERATOR_SA,
    OPERATOR_TOKEN,
    Attributes,
    Rbac,
    chart_service_account,
    sa_user,
)
from .emulator_schema import StructuralSchema, load_crd

SPEC: dict[str, Any] = {
    "slots": 2,
    "image": "ghcr.io/example/apipool:0.1.0",
    "redis": {"secretRef": {"name": "redis", "key": "url"}},
}


def spec(**changes: Any) -> Any:
    return parse_spec("billing", {**SPEC, **changes})


def degraded_reason(cluster: Cluster, pool: str) -> str | None:
    cond = cluster.condition(pool, "Degraded")
    return str(cond.get("reason")) if cond.get("status") == "True" else None


def uids(cluster: Cluster, pool: str) -> dict[str, str]:
    return {name: pod["metadata"]["uid"] for name, pod in cluster.pods(pool).items()}


def ready_pool(cluster: Cluster, pool: str, slots: int) -> bool:
    status = cluster.status(pool)
    return cluster.slots_are(pool, range(slots)) and status.get("readySlots") == slots


# -- 1. RBAC: blockOwnerDeletion needs update on the pools' finalizers --------------------


FINALIZERS: dict[str, Any] = {
    "verb": "update",
    "group": "apipool.dev",
    "resource": "apiconcurrencypools",
    "subresource": "finalizers",
    "namespace": NAMESPACE,
}


def chart_rbac() -> tuple[Rbac, str]:
    """The chart's RBAC (watching ``default``) and its ServiceAccount's user."""
    rendered = helm_backend().render({"operator": {"watchNamespaces": [NAMESPACE]}})
    kinds = {"Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding"}
    docs = [doc for doc in manifests(rendered) if doc["kind"] in kinds]
    return Rbac.from_documents(docs), sa_user(*chart_service_account(docs))


@pytest.mark.unit
def test_deploy_and_chart_rbac_grant_update_on_pool_finalizers() -> None:
    deploy = Rbac.from_file()
    assert deploy.allows(Attributes(user=sa_user(*OPERATOR_SA), **FINALIZERS))
    chart, user = chart_rbac()
    assert chart.allows(Attributes(user=user, **FINALIZERS))
    # Only the finalizers subresource: no update of the pools themselves.
    no_update = dict(FINALIZERS, subresource=None)
    assert not deploy.allows(Attributes(user=sa_user(*OPERATOR_SA), **no_update))


@pytest.mark.operator
@pytest.mark.timeout(20)
@pytest.mark.parametrize("rbac", ["deploy", "chart"])
def test_the_operator_creates_owned_pods_under_its_rbac(
    request: pytest.FixtureRequest, rbac: str
) -> None:
    if rbac == "chart":
        chart, user = chart_rbac()
        chart.add_token(OPERATOR_TOKEN, user)
        request.applymarker(pytest.mark.emulator(rbac=chart))
    else:
        request.applymarker(pytest.mark.emulator(rbac=rbac))
    cluster: Cluster = request.getfixturevalue("cluster")
    request.getfixturevalue("operator")
    pool = cluster.new_name()
    cluster.create_pool(pool, slots=2)
    wait_for(lambda: ready_pool(cluster, pool, 2), 8, what="2 ready slots")
    for pod in cluster.pods(pool).values():
        (ref,) = pod["metadata"]["ownerReferences"]
        assert ref["blockOwnerDeletion"] is True
        assert ref["controller"] is True


# -- 2. every status key is in the CRD's status schema -------------------------------------


def full_status(stats: PoolStats | None = None) -> dict[str, Any]:
    pods = [ObservedPod(0, "billing-slot-0", "h", "Running", ready=True)]
    return build_status(
        slots=2,
        selector="apipool.dev/pool=billing",
        pods=pods,
        template_hash="h",
        actions=[],
        stats=stats,
        utilization=0.5 if stats is not None else None,
        problem=Problem("RedisUnreachable", "down"),
        generation=3,
        now="2026-01-01T00:00:00Z",
        ledger=LEDGER if stats is not None else None,
    )


LEDGER = SlotSeconds(
    "billing", 0.0, 60.0, 2, 120.0, {"calling": 60.0, "waiting_for_work": 50.0, "fenced": 4.0}
)
STATS = PoolStats(
    pool="billing",
    slots=2,
    queued=5,
    inflight={0: 1},
    leases={0: "k8s-pod-x"},
    dead_letters=2,
    counters={},
    effective_slots=2,
)


@pytest.mark.unit
def test_every_key_build_status_writes_survives_the_crd_schema() -> None:
    crd = load_crd()
    schema = StructuralSchema.from_crd(crd)
    properties = schema.schema["properties"]["status"]["properties"]
    status = full_status(STATS)
    assert {"updatedSlots", *REDIS_FIGURES} <= set(status)
    assert status["largestLoss"] == {"cause": "waiting_for_work", "share": round(50 / 120, 4)}
    assert status["utilization"] == 0.5  # 60 s calling of 2 x 60 s
    assert set(status) <= set(properties), set(status) - set(properties)
    body = {
        "apiVersion": "apipool.dev/v1alpha1",
        "kind": "ApiConcurrencyPool",
        "metadata": {"name": "billing", "namespace": NAMESPACE},
        "spec": dict(SPEC),
        "status": status,
    }
    admitted = schema.admit(body)  # pruned and validated as the API server does
    assert admitted["status"] == status
    # Redis unreadable: the figures are null, and the schema allows that.
    unknown = full_status(None)
    assert all(unknown[key] is None for key in REDIS_FIGURES)
    for key in REDIS_FIGURES:
        assert properties[key].get("nullable") is True, key
    schema.admit({**body, "status": unknown})


# -- 3. whole-number quantities; the client's own validation ------------------------------


@pytest.mark.unit
def test_numeric_quantities_become_strings() -> None:
    resources = {"requests": {"cpu": 1, "memory": "64Mi"}, "limits": {"cpu": 2, "memory": 2.5}}
    (container,) = slot_pod(spec(template={"resources": resources}), "billing", "ns", 0)["spec"][
        "containers"
    ]
    assert container["resources"] == {
        "requests": {"cpu": "1", "memory": "64Mi"},
        "limits": {"cpu": "2", "memory": "2.5"},
    }


@pytest.mark.operator
@pytest.mark.timeout(20)
def test_a_whole_number_cpu_request_gives_running_pods(
    cluster: Cluster, operator: OperatorThread
) -> None:
    pool = cluster.new_name()
    cluster.create_pool(pool, slots=2, template={"resources": {"requests": {"cpu": 1}}})
    wait_for(lambda: ready_pool(cluster, pool, 2), 8, what="2 ready slots")
    for pod in cluster.pods(pool).values():
        assert pod["spec"]["containers"][0]["resources"]["requests"]["cpu"] == "1"
    assert degraded_reason(cluster, pool) is None


@pytest.mark.operator
@pytest.mark.timeout(20)
def test_a_pod_the_client_refuses_degrades_the_pool(
    cluster: Cluster, operator: OperatorThread
) -> None:
    """``resources`` keeps unknown members (CRD), the client's validation refuses a
    ``claims`` that is not a list: Degraded with an Event, not an endless retry."""
    pool = cluster.new_name()
    cluster.create_pool(pool, slots=2, template={"resources": {"claims": "gpu"}})
    wait_for(lambda: degraded_reason(cluster, pool) == "SlotPodRefused", 8, what="Degraded")
    assert "claims" in cluster.condition(pool, "Degraded")["message"]
    wait_for(lambda: cluster.events(pool, reason="SlotPodRefused"), 3, what="an Event")
    assert cluster.pods(pool) == {}


# -- 4. refused creates are Degraded; a rollout is tried before anything is deleted -------


@pytest.mark.operator
@pytest.mark.timeout(20)
@pytest.mark.parametrize("code", [400, 403, 422])
def test_a_refused_pod_create_degrades_the_pool_with_the_api_message(
    cluster: Cluster, operator: OperatorThread, code: int
) -> None:
    message = f"exceeded quota: compute-{code}, must specify limits.cpu"
    cluster.refuse("pods", code=code, message=message)
    pool = cluster.new_name()
    cluster.create_pool(pool, slots=2)
    wait_for(lambda: degraded_reason(cluster, pool) == "SlotPodRefused", 8, what="Degraded")
    assert message in cluster.condition(pool, "Degraded")["message"]
    wait_for(lambda: cluster.events(pool, reason="SlotPodRefused"), 3, what="an Event")
    (event,) = cluster.events(pool, reason="SlotPodRefused")
    assert message in event["message"]
    assert event["type"] == "Warning"


@pytest.mark.operator
@pytest.mark.timeout(25)
def test_a_rollout_to_a_refused_template_deletes_nothing(
    cluster: Cluster, operator: OperatorThread
) -> None:
    pool = cluster.new_name()
    cluster.create_pool(pool, slots=2)
    wait_for(lambda: ready_pool(cluster, pool, 2), 8, what="2 ready slots")
    before = uids(cluster, pool)

    def wants_missing_sa(obj: Mapping[str, Any]) -> bool:
        return (obj.get("spec") or {}).get("serviceAccountName") == "missing"

    refusal = cluster.refuse(
        "pods", code=403, message='serviceaccount "missing" not found', when=wants_missing_sa
    )
    mark = cluster.mark()
    cluster.patch_spec(pool, template={"serviceAccountName": "missing"})
    wait_for(lambda: degraded_reason(cluster, pool) == "SlotPodRefused", 8, what="Degraded")
    assert 'serviceaccount "missing" not found' in cluster.condition(pool, "Degraded")["message"]
    cluster.wait_reconciles(pool, count=2)
    assert uids(cluster, pool) == before
    assert cluster.calls(mark, method="DELETE", plural="pods") == []
    assert refusal.refused, "the new template was tried (a dry run)"

    cluster.allow(refusal)  # the ServiceAccount exists now: the rollout goes ahead
    wait_for(
        lambda: (
            ready_pool(cluster, pool, 2)
            and not set(uids(cluster, pool).values()) & set(before.values())
        ),
        10,
        what="both slots replaced",
    )
    assert degraded_reason(cluster, pool) is None


# -- 5. a hung slot is killed in seconds ---------------------------------------------------


@pytest.mark.unit
def test_probes_that_kill_have_a_short_grace_and_the_pod_keeps_its_own() -> None:
    s = spec(callTimeoutSeconds=30)
    pod = slot_pod(s, "billing", "ns", 0)["spec"]
    (container,) = pod["containers"]
    for probe in ("livenessProbe", "startupProbe"):
        assert 1 <= container[probe]["terminationGracePeriodSeconds"] <= 2
    assert "terminationGracePeriodSeconds" not in container["readinessProbe"]
    assert pod["terminationGracePeriodSeconds"] == grace_period(s) > 30


# -- 6a. ownership without the pool's labels ----------------------------------------------


@pytest.mark.operator
@pytest.mark.timeout(20)
def test_slot_pods_do_not_take_the_pools_labels(cluster: Cluster, operator: OperatorThread) -> None:
    pool = cluster.new_name()
    body = {
        "apiVersion": "apipool.dev/v1alpha1",
        "kind": "ApiConcurrencyPool",
        "metadata": {"name": pool, "namespace": NAMESPACE, "labels": {"team": "billing"}},
        "spec": cluster.pool_spec(2),
    }
    created = cluster.custom.create_namespaced_custom_object(
        "apipool.dev", "v1alpha1", NAMESPACE, "apiconcurrencypools", body
    )
    wait_for(lambda: ready_pool(cluster, pool, 2), 8, what="2 ready slots")
    for pod in cluster.pods(pool).values():
        assert "team" not in pod["metadata"]["labels"]
        (ref,) = pod["metadata"]["ownerReferences"]
        assert ref["uid"] == created["metadata"]["uid"]


# -- 6b. no stale Redis figures ------------------------------------------------------------


@pytest.mark.operator
@pytest.mark.timeout(25)
def test_redis_figures_are_cleared_while_redis_cannot_be_read(
    cluster: Cluster, operator: OperatorThread
) -> None:
    pool = cluster.new_name()
    cluster.create_pool(pool, slots=1, redis={"secretRef": {"name": "redis-b", "key": "url"}})
    cluster.put_secret("redis-b", {"url": cluster.redis_url})
    wait_for(lambda: "queueDepth" in cluster.status(pool), 8, what="Redis figures")
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        dead = f"redis://127.0.0.1:{probe.getsockname()[1]}/0"
    cluster.core.delete_namespaced_secret("redis-b", NAMESPACE)
    cluster.put_secret("redis-b", {"url": dead})
    wait_for(lambda: degraded_reason(cluster, pool) == "RedisUnreachable", 10, what="Degraded")
    status = cluster.status(pool)
    assert not set(REDIS_FIGURES) & {k for k, v in status.items() if v is not None}, status


# -- 6c. no service-mesh sidecar -----------------------------------------------------------


@pytest.mark.unit
def test_slot_pods_opt_out_of_sidecar_injection() -> None:
    s = spec(template={"annotations": {"sidecar.istio.io/inject": "true", "team": "a"}})
    annotations = slot_pod(s, "billing", "ns", 0)["metadata"]["annotations"]
    assert annotations["sidecar.istio.io/inject"] == "false"
    assert annotations["linkerd.io/inject"] == "disabled"
    assert annotations["team"] == "a"


# -- 6d. the pod watch is filtered by the server; pod events are coalesced ----------------


@pytest.mark.operator
@pytest.mark.timeout(20)
def test_the_pod_watch_carries_a_label_selector(cluster: Cluster, operator: OperatorThread) -> None:
    def pod_watches() -> list[str]:
        return [
            str(r.params.get("labelSelector", ""))
            for r in cluster.kube.requests()
            if r.resource is not None
            and r.resource.plural == "pods"
            and r.name is None
            and r.params.get("watch") == "true"
        ]

    wait_for(pod_watches, 5, what="a pod watch")
    for selector in pod_watches():
        assert "app.kubernetes.io/name=apipool" in selector
        assert "app.kubernetes.io/component=slot" in selector


class BlockingKube:
    """A KubeApi stand-in whose first read of the pool waits until released."""

    def __init__(self) -> None:
        self.reads = 0
        self.entered = threading.Event()
        self.release = threading.Event()

    def read_pool(self, namespace: str, name: str) -> None:
        self.reads += 1
        if self.reads == 1:
            self.entered.set()
            assert self.release.wait(10)
        return None  # gone: only its slot pods are looked at

    def slot_pods(self, namespace: str, pool: str) -> list[object]:
        return []


@pytest.mark.unit
@pytest.mark.timeout(20)
def test_pod_events_during_a_reconcile_cost_one_more_reconcile() -> None:
    kube = BlockingKube()
    reconciler = Reconciler(OperatorSettings(), kube=kube)  # type: ignore[arg-type]
    first = threading.Thread(target=reconciler.nudge, args=("ns", "billing"))
    first.start()
    assert kube.entered.wait(5)
    events = [threading.Thread(target=reconciler.nudge, args=("ns", "billing")) for _ in range(20)]
    for thread in events:
        thread.start()
    for thread in events:
        thread.join(5)  # none waits for the running reconcile
        assert not thread.is_alive()
    kube.release.set()
    first.join(5)
    assert kube.reads == 2
    reconciler.nudge("ns", "billing")  # idle again: an event reconciles at once
    assert kube.reads == 3


@pytest.mark.unit
def test_a_nudge_while_a_reconcile_waits_is_covered_by_it() -> None:
    states = PoolStates()
    with states.hold(("ns", "p")) as state:
        assert not states.coalesce(("ns", "p"))  # active: marked dirty
        assert states.rerun(state)
        assert not states.rerun(state)
    assert states.coalesce(("ns", "p"))


# -- 6e. the slot's health server on IPv6 and IPv4 -----------------------------------------


def get(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=5) as answer:
        return dict(json.loads(answer.read()))


def serve(host: str, check: Any) -> None:
    async def main() -> None:
        server = HealthServer(
            health=lambda: (True, "ok"),
            readiness=lambda: (True, "ok"),
            registry=CollectorRegistry(),
            host=host,
        )
        port = await server.start()
        try:
            await asyncio.get_running_loop().run_in_executor(None, check, port)
        finally:
            await server.stop()

    asyncio.run(main())


def has_ipv6() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.unit
@pytest.mark.timeout(20)
def test_the_slot_health_server_answers_on_ipv4_and_ipv6() -> None:
    (container,) = slot_pod(spec(), "billing", "ns", 0)["spec"]["containers"]
    args = container["args"]
    assert args[args.index("--health-host") + 1] == "::"

    def check(port: int) -> None:
        assert get(f"http://127.0.0.1:{port}/healthz")["ok"] is True
        if has_ipv6():
            assert get(f"http://[::1]:{port}/healthz")["ok"] is True

    serve("::", check)


@pytest.mark.unit
@pytest.mark.timeout(20)
def test_the_health_server_falls_back_to_ipv4(monkeypatch: pytest.MonkeyPatch) -> None:
    real = socket.socket

    def no_ipv6(family: int = socket.AF_INET, *args: Any, **kwargs: Any) -> socket.socket:
        if family == socket.AF_INET6:
            raise OSError(97, "Address family not supported by protocol")
        return real(family, *args, **kwargs)

    monkeypatch.setattr("apipool.health.socket.socket", no_ipv6)
    serve("::", lambda port: get(f"http://127.0.0.1:{port}/healthz"))


@pytest.mark.unit
@pytest.mark.timeout(20)
def test_the_health_server_on_loopback_stays_on_loopback() -> None:
    def check(port: int) -> None:
        assert get(f"http://127.0.0.1:{port}/healthz")["ok"] is True
        if has_ipv6():
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(("::1", port), timeout=2).close()

    serve("127.0.0.1", check)
