"""The Kubernetes API emulator is as strict as a real API server where the
operator's correctness depends on it: the CRD's structural schema (defaults,
pruning, validation, the status subresource), the Kubernetes OpenAPI schemas of
built-in kinds, RBAC with the OwnerReferencesPermissionEnforcement rule,
admission refusals and server-side dry-run. These tests use the emulator alone
(no operator)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from .conftest import (
    GROUP,
    IMAGE,
    NAMESPACE,
    PLURAL,
    VERSION,
    Cluster,
    OperatorThread,
    make_rbac,
    wait_for,
)
from .emulator import PODS, POOLS, SECRETS
from .emulator_admission import webhook_denial
from .emulator_rbac import OPERATOR_SA, OPERATOR_TOKEN, Attributes, Rbac, sa_user

pytestmark = pytest.mark.timeout(20)

USER = sa_user("ops", "bot")
TOKEN = "bot-token"


def rbac_with(*rules: dict[str, Any]) -> Rbac:
    """A Role in ``default`` with ``rules``, bound to ServiceAccount ops/bot (TOKEN)."""
    rbac = Rbac.from_documents(
        [
            {"kind": "Role", "metadata": {"name": "r", "namespace": NAMESPACE}, "rules": rules},
            {
                "kind": "RoleBinding",
                "metadata": {"name": "r", "namespace": NAMESPACE},
                "roleRef": {"kind": "Role", "name": "r"},
                "subjects": [{"kind": "ServiceAccount", "name": "bot", "namespace": "ops"}],
            },
        ]
    )
    rbac.add_token(TOKEN, USER)
    return rbac


POD_RULE = {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "create", "delete"]}
FINALIZERS_RULE = {
    "apiGroups": [GROUP],
    "resources": [f"{PLURAL}/finalizers"],
    "verbs": ["update"],
}


def pool_body(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "ApiConcurrencyPool",
        "metadata": {"name": name},
        "spec": {"slots": 2, "image": IMAGE, "redis": {"secretRef": {"name": "redis"}}, **spec},
    }


def pod_body(name: str, **container: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": "x"}},
        "spec": {"containers": [{"name": "slot", "image": IMAGE, **container}]},
    }


def owned_by(pod: dict[str, Any], pool: dict[str, Any], *, block: bool) -> dict[str, Any]:
    pod["metadata"]["ownerReferences"] = [
        {
            "apiVersion": pool["apiVersion"],
            "kind": pool["kind"],
            "name": pool["metadata"]["name"],
            "uid": pool["metadata"]["uid"],
            "controller": True,
            "blockOwnerDeletion": block,
        }
    ]
    return pod


def send(
    cluster: Cluster,
    path: str,
    body: dict[str, Any] | None = None,
    *,
    method: str = "POST",
    token: str | None = None,
    dry_run: bool = False,
) -> tuple[int, dict[str, Any]]:
    """(HTTP status, JSON answer) of a raw request: the kubernetes client checks
    bodies itself (e.g. an integer cpu quantity), a kubectl or the API does not."""
    url = cluster.kube.url + path + ("?dryRun=All" if dry_run else "")
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=5) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


PODS_PATH = f"/api/v1/namespaces/{NAMESPACE}/pods"


def create_pod(
    cluster: Cluster, body: dict[str, Any], **options: Any
) -> tuple[int, dict[str, Any]]:
    return send(cluster, PODS_PATH, body, **options)


def error_of(cluster: Cluster, call: Any) -> tuple[int, dict[str, Any]]:
    """(HTTP status, Status body) of a call that must fail."""
    with pytest.raises(cluster.ApiException) as info:
        call()
    return int(info.value.status), json.loads(info.value.body)


def create_pool(cluster: Cluster, body: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
    return dict(
        cluster.custom.create_namespaced_custom_object(
            GROUP, VERSION, NAMESPACE, PLURAL, body, **kwargs
        )
    )


def patch_status(cluster: Cluster, name: str, status: dict[str, Any]) -> dict[str, Any]:
    return dict(
        cluster.custom.patch_namespaced_custom_object_status(
            GROUP, VERSION, NAMESPACE, PLURAL, name, {"status": status}
        )
    )


@pytest.fixture
def as_bot(cluster: Cluster) -> Iterator[Any]:
    """CoreV1Api and CustomObjectsApi presenting TOKEN."""
    client = cluster.client_as(TOKEN)
    kubernetes = cluster._kubernetes
    yield kubernetes.client.CoreV1Api(client), kubernetes.client.CustomObjectsApi(client)
    client.close()


# -- 1. the CRD's structural schema ----------------------------------------------


def test_pool_defaults_are_applied_on_create(cluster: Cluster) -> None:
    pool = create_pool(cluster, pool_body("defaults"))
    spec = pool["spec"]
    assert spec["handler"] == "http"
    assert spec["callTimeoutSeconds"] == 10
    assert spec["maxAttempts"] == 3
    assert spec["redis"]["secretRef"] == {"name": "redis", "key": "url"}
    # An empty object default gets the defaults of its own fields.
    assert spec["liveness"] == {"periodSeconds": 1, "failureThreshold": 3, "timeoutSeconds": 1}
    assert cluster.kube.get(POOLS, NAMESPACE, "defaults")["spec"] == spec  # type: ignore[index]


def test_unknown_spec_fields_are_pruned_but_preserved_nodes_keep_theirs(cluster: Cluster) -> None:
    body = pool_body(
        "pruned",
        bogus=1,
        redis={"secretRef": {"name": "redis", "extra": "x"}, "more": True},
        template={"resources": {"requests": {"cpu": 1}, "claims": [{"name": "gpu"}]}, "nope": 1},
    )
    body["topLevel"] = "dropped"
    spec = create_pool(cluster, body)["spec"]
    assert "bogus" not in spec
    assert spec["redis"] == {"secretRef": {"name": "redis", "key": "url"}}
    # x-kubernetes-preserve-unknown-fields keeps `claims`; int-or-string takes 1.
    assert spec["template"] == {"resources": {"requests": {"cpu": 1}, "claims": [{"name": "gpu"}]}}
    assert "topLevel" not in cluster.pool("pruned")
    # A patch is pruned the same way.
    spec = cluster.patch_spec("pruned", bogus=2, slots=3)["spec"]
    assert (spec["slots"], "bogus" in spec) == (3, False)


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"slots": 1001}, "spec.slots"),
        ({"slots": "three"}, "spec.slots"),
        ({"callTimeoutSeconds": 0}, "spec.callTimeoutSeconds"),  # exclusiveMinimum: true
        ({"handler": "not a handler"}, "spec.handler"),
        ({"image": ""}, "spec.image"),
        ({"redis": {"secretRef": {"name": "Not_A_Name"}}}, "spec.redis.secretRef.name"),
        ({"template": {"imagePullPolicy": "Sometimes"}}, "spec.template.imagePullPolicy"),
    ],
)
def test_an_invalid_pool_is_refused_with_422(
    cluster: Cluster, spec: dict[str, Any], field: str
) -> None:
    status, body = error_of(cluster, lambda: create_pool(cluster, pool_body("bad", **spec)))
    assert (status, body["reason"]) == (422, "Invalid")
    assert body["message"].startswith('ApiConcurrencyPool.apipool.dev "bad" is invalid: ')
    assert field in body["message"]
    assert cluster.kube.get(POOLS, NAMESPACE, "bad") is None


def test_a_missing_required_field_and_a_bad_name_are_refused(cluster: Cluster) -> None:
    body = pool_body("no-image")
    del body["spec"]["image"]
    status, error = error_of(cluster, lambda: create_pool(cluster, body))
    assert status == 422
    assert "'image' is a required property" in error["message"]
    status, error = error_of(cluster, lambda: create_pool(cluster, pool_body("x" * 51)))
    assert (status, "metadata.name" in error["message"]) == (422, True)


def test_an_invalid_patch_is_refused_and_changes_nothing(cluster: Cluster) -> None:
    before = create_pool(cluster, pool_body("patched"))
    status, _ = error_of(cluster, lambda: cluster.patch_spec("patched", maxAttempts=0))
    assert status == 422
    after = cluster.pool("patched")
    assert after["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"]
    assert after["spec"]["maxAttempts"] == 3


def test_status_fields_the_crd_lacks_are_pruned(cluster: Cluster) -> None:
    create_pool(cluster, pool_body("st"))
    status = patch_status(cluster, "st", {"readySlots": 1, "notInTheCrd": 5})["status"]
    assert status == {"readySlots": 1}
    assert cluster.status("st") == {"readySlots": 1}
    conditions = [{"type": "Ready", "status": "True", "extra": "x"}]
    status = patch_status(cluster, "st", {"conditions": conditions})["status"]
    assert status["conditions"] == [{"type": "Ready", "status": "True"}]


def test_an_invalid_status_is_refused(cluster: Cluster) -> None:
    create_pool(cluster, pool_body("st"))
    status, body = error_of(cluster, lambda: patch_status(cluster, "st", {"readySlots": -1}))
    assert (status, "status.readySlots" in body["message"]) == (422, True)
    bad = [{"type": "Ready", "status": "Yes"}]
    status, _ = error_of(cluster, lambda: patch_status(cluster, "st", {"conditions": bad}))
    assert status == 422


def test_status_and_spec_are_isolated(cluster: Cluster) -> None:
    create_pool(cluster, pool_body("iso"))
    cluster.patch_pool("iso", {"status": {"readySlots": 2}, "spec": {"slots": 4}})
    assert cluster.status("iso") == {}
    assert cluster.pool("iso")["spec"]["slots"] == 4
    patched = cluster.custom.patch_namespaced_custom_object_status(
        GROUP,
        VERSION,
        NAMESPACE,
        PLURAL,
        "iso",
        {"spec": {"slots": 9}, "status": {"readySlots": 1}},
    )
    assert (patched["spec"]["slots"], patched["status"]) == (4, {"readySlots": 1})


def test_a_status_write_passes_over_a_spec_stored_before_the_schema(cluster: Cluster) -> None:
    """Ratcheting: an invalid value a write leaves unchanged does not refuse it."""
    cluster.kube.put(
        POOLS,
        {**pool_body("old", maxAttempts=0), "metadata": {"name": "old", "namespace": "default"}},
        admission=False,
    )
    assert patch_status(cluster, "old", {"readySlots": 0})["status"] == {"readySlots": 0}
    status, _ = error_of(cluster, lambda: cluster.patch_spec("old", slots=5000))
    assert status == 422
    assert cluster.patch_spec("old", slots=5)["spec"]["slots"] == 5


# -- 5. generation and resourceVersion ---------------------------------------------


def test_generation_moves_with_the_spec_only(cluster: Cluster) -> None:
    created = create_pool(cluster, pool_body("gen"))
    versions = [created["metadata"]["resourceVersion"]]
    assert created["metadata"]["generation"] == 1

    def step(result: dict[str, Any], generation: int) -> None:
        assert result["metadata"]["generation"] == generation
        assert result["metadata"]["resourceVersion"] not in versions
        versions.append(result["metadata"]["resourceVersion"])

    step(cluster.patch_spec("gen", slots=3), 2)
    step(cluster.patch_pool("gen", {"metadata": {"annotations": {"a": "b"}}}), 2)
    step(patch_status(cluster, "gen", {"readySlots": 1}), 2)
    step(cluster.scale("gen", 5) and cluster.pool("gen"), 3)
    # Nothing changes: no new version.
    same = cluster.patch_spec("gen", slots=5)
    assert same["metadata"]["resourceVersion"] == versions[-1]


def test_a_scale_beyond_the_schema_is_refused(cluster: Cluster) -> None:
    create_pool(cluster, pool_body("scaled"))
    status, _ = error_of(cluster, lambda: cluster.scale("scaled", 1001))
    assert status == 422
    assert cluster.pool("scaled")["spec"]["slots"] == 2


# -- 2. built-in kinds against the Kubernetes OpenAPI schemas ------------------------


def test_a_valid_pod_is_accepted_with_an_integer_quantity(cluster: Cluster) -> None:
    body = pod_body("ok", resources={"requests": {"cpu": 1, "memory": "64Mi"}})
    status, created = create_pod(cluster, body)
    assert status == 201, created
    assert created["metadata"]["uid"]
    assert cluster.kube.get(PODS, NAMESPACE, "ok") is not None


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (pod_body("p", bogus=1), "bogus"),
        (pod_body("p", resources={"requests": {"cpu": [1]}}), "spec.containers[0].resources"),
        (pod_body("p", ports=[{"containerPort": "http"}]), "containerPort"),
        (pod_body("p", image=""), "spec.containers[0].image"),
        (pod_body("P_bad"), "metadata.name"),
        ({**pod_body("p"), "spec": {"containers": []}}, "spec.containers"),
    ],
)
def test_an_invalid_pod_is_refused_with_422(
    cluster: Cluster, body: dict[str, Any], field: str
) -> None:
    name = body["metadata"]["name"]
    status, error = create_pod(cluster, body)
    assert (status, error["reason"]) == (422, "Invalid")
    assert error["message"].startswith(f'Pod "{name}" is invalid: ')
    assert field in error["message"]
    assert cluster.kube.get(PODS, NAMESPACE, name) is None


def test_a_bad_label_value_is_refused(cluster: Cluster) -> None:
    body = pod_body("labels")
    body["metadata"]["labels"] = {"apipool.dev/pool": "x" * 64}
    assert create_pod(cluster, body)[0] == 422


def test_secrets_are_validated_too(cluster: Cluster) -> None:
    body = {"metadata": {"name": "s"}, "data": {"k": "dg=="}, "bogus": 1}
    status, _ = send(cluster, f"/api/v1/namespaces/{NAMESPACE}/secrets", body)
    assert status == 422
    assert cluster.kube.get(SECRETS, NAMESPACE, "s") is None


# -- 3. RBAC --------------------------------------------------------------------------


@pytest.mark.emulator(rbac=rbac_with(POD_RULE))
def test_rbac_forbids_what_no_rule_grants(cluster: Cluster) -> None:
    assert create_pod(cluster, pod_body("mine"), token=TOKEN)[0] == 201
    assert send(cluster, f"{PODS_PATH}/mine", method="GET", token=TOKEN)[0] == 200
    status, body = send(cluster, PODS_PATH, method="GET", token=TOKEN)
    assert (status, body["reason"]) == (403, "Forbidden")
    assert body["message"] == (
        f'pods is forbidden: User "{USER}" cannot list resource "pods" '
        'in API group "" in the namespace "default"'
    )
    secret = f"/api/v1/namespaces/{NAMESPACE}/secrets/redis"
    assert send(cluster, secret, method="GET", token=TOKEN)[0] == 403
    other = "/api/v1/namespaces/other/pods"
    assert send(cluster, other, pod_body("x"), token=TOKEN)[0] == 403
    pools = f"/apis/{GROUP}/{VERSION}/namespaces/{NAMESPACE}/{PLURAL}"
    assert send(cluster, pools, method="GET", token=TOKEN)[0] == 403
    assert send(cluster, "/api/v1/namespaces", method="GET", token=TOKEN)[0] == 403
    # The admin (no token) may do anything.
    assert send(cluster, PODS_PATH, method="GET")[0] == 200


@pytest.mark.emulator(
    rbac=rbac_with({"apiGroups": [GROUP], "resources": [PLURAL], "verbs": ["patch"]})
)
def test_a_subresource_needs_its_own_rule(cluster: Cluster) -> None:
    create_pool(cluster, pool_body("sub"))
    client = cluster.client_as(TOKEN)
    try:
        custom = cluster._kubernetes.client.CustomObjectsApi(client)
        custom.patch_namespaced_custom_object(
            GROUP, VERSION, NAMESPACE, PLURAL, "sub", {"metadata": {"annotations": {"a": "b"}}}
        )
        status, body = error_of(
            cluster,
            lambda: custom.patch_namespaced_custom_object_status(
                GROUP, VERSION, NAMESPACE, PLURAL, "sub", {"status": {"readySlots": 1}}
            ),
        )
    finally:
        client.close()
    assert status == 403
    assert 'cannot patch resource "apiconcurrencypools/status"' in body["message"]


@pytest.mark.emulator(rbac=rbac_with(POD_RULE))
def test_block_owner_deletion_needs_update_on_the_owners_finalizers(cluster: Cluster) -> None:
    pool = create_pool(cluster, pool_body("owner"))
    status, body = create_pod(cluster, owned_by(pod_body("a"), pool, block=True), token=TOKEN)
    assert status == 403
    assert "cannot set blockOwnerDeletion" in body["message"]
    assert 'cannot update resource "apiconcurrencypools/finalizers"' in body["message"]
    assert cluster.kube.get(PODS, NAMESPACE, "a") is None
    # Without blockOwnerDeletion the same pod is fine; the admin may set it.
    assert create_pod(cluster, owned_by(pod_body("b"), pool, block=False), token=TOKEN)[0] == 201
    assert create_pod(cluster, owned_by(pod_body("c"), pool, block=True))[0] == 201


@pytest.mark.emulator(rbac=rbac_with(POD_RULE, FINALIZERS_RULE))
def test_the_finalizers_rule_lets_block_owner_deletion_through(cluster: Cluster) -> None:
    pool = create_pool(cluster, pool_body("owner"))
    status, _ = create_pod(cluster, owned_by(pod_body("a"), pool, block=True), token=TOKEN)
    assert status == 201
    assert cluster.kube.get(PODS, NAMESPACE, "a") is not None


def test_an_unknown_token_is_unauthorized(cluster: Cluster) -> None:
    status, body = send(cluster, PODS_PATH, method="GET", token="nobody")
    assert (status, body["reason"]) == (401, "Unauthorized")


@pytest.mark.parametrize("mode", ["deploy", "chart"])
def test_the_operators_rbac_grants_what_the_operator_does(mode: str) -> None:
    """The RBAC the operator runs under in these tests (deploy/rbac.yaml, or the
    chart's) grants each kind of request the operator makes, and not more."""
    rbac = make_rbac(mode)
    assert rbac is not None
    user = rbac.tokens[OPERATOR_TOKEN]
    if mode == "deploy":
        assert user == sa_user(*OPERATOR_SA)

    def can(
        verb: str, group: str, plural: str, sub: str | None = None, ns: str = NAMESPACE
    ) -> bool:
        return rbac.allows(Attributes(user, verb, group, plural, sub, ns))

    for verb in ("list", "watch", "get", "patch"):
        assert can(verb, GROUP, PLURAL), verb
    assert can("patch", GROUP, PLURAL, "status")
    # patch: only to remove a slot pod's own slot-exit finalizer
    for verb in ("list", "watch", "get", "create", "delete", "patch"):
        assert can(verb, "", "pods"), verb
    assert can("get", "", "secrets")
    assert can("create", "", "events")
    assert can("update", GROUP, PLURAL, "finalizers"), "slot pods set blockOwnerDeletion"
    assert can("list", "", "namespaces", ns=None)  # type: ignore[arg-type]
    assert not can("list", "", "secrets")
    assert not can("update", "", "pods")
    assert not can("create", "", "pods", ns="elsewhere")
    assert not can("delete", GROUP, PLURAL)


# -- 4. admission refusals and dry-run --------------------------------------------------


def test_a_registered_refusal_refuses_matching_creates(cluster: Cluster) -> None:
    refusal = cluster.refuse(
        "pods",
        code=403,
        message="exceeded quota: slots, requested: pods=1, used: pods=2, limited: pods=2",
        when=lambda pod: pod["metadata"]["name"].startswith("q-"),
        times=1,
    )
    status, body = create_pod(cluster, pod_body("q-1"))
    assert (status, body["reason"]) == (403, "Forbidden")
    assert body["message"] == (
        'pods "q-1" is forbidden: exceeded quota: slots, requested: pods=1, used: pods=2, '
        "limited: pods=2"
    )
    assert [p["metadata"]["name"] for p in refusal.refused] == ["q-1"]
    assert create_pod(cluster, pod_body("other"))[0] == 201  # no match
    assert create_pod(cluster, pod_body("q-2"))[0] == 201  # times=1 is used up
    assert cluster.kube.get(PODS, NAMESPACE, "q-1") is None


def test_a_webhook_style_denial_until_withdrawn(cluster: Cluster) -> None:
    refusal = cluster.refuse("pods", **webhook_denial("policy.example.com", "no root"))
    status, body = create_pod(cluster, pod_body("w"))
    assert (status, body["reason"]) == (400, "BadRequest")
    assert body["message"] == 'admission webhook "policy.example.com" denied the request: no root'
    cluster.allow(refusal)
    assert create_pod(cluster, pod_body("w"))[0] == 201


def test_a_refusal_can_cover_patches_of_pools(cluster: Cluster) -> None:
    create_pool(cluster, pool_body("guarded"))
    cluster.refuse(PLURAL, verbs=("patch",), code=422, when=lambda pool: pool["spec"]["slots"] > 5)
    assert cluster.patch_spec("guarded", slots=5)["spec"]["slots"] == 5
    status, _ = error_of(cluster, lambda: cluster.patch_spec("guarded", slots=6))
    assert status == 422
    assert cluster.pool("guarded")["spec"]["slots"] == 5


def test_a_dry_run_create_validates_admits_and_stores_nothing(cluster: Cluster) -> None:
    before = cluster.kube.objects(PODS)
    status, answer = create_pod(cluster, pod_body("dry"), dry_run=True)
    assert status == 201
    assert answer["metadata"]["name"] == "dry"
    assert answer["metadata"]["uid"]
    assert cluster.kube.objects(PODS) == before
    # The same checks as a real create: the schema...
    assert create_pod(cluster, pod_body("dry", bogus=1), dry_run=True)[0] == 422
    # ... and admission.
    cluster.refuse("pods", code=422, message="denied")
    assert create_pod(cluster, pod_body("dry"), dry_run=True)[0] == 422
    # A pool's dry run comes back defaulted and pruned.
    pool = create_pool(cluster, pool_body("drypool", bogus=1), dry_run="All")
    assert pool["spec"]["handler"] == "http"
    assert "bogus" not in pool["spec"]
    assert cluster.kube.get(POOLS, NAMESPACE, "drypool") is None


@pytest.mark.emulator(rbac=rbac_with({"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]}))
def test_a_dry_run_needs_the_same_permission(cluster: Cluster) -> None:
    status, _ = create_pod(cluster, pod_body("dry"), dry_run=True, token=TOKEN)
    assert status == 403


def test_a_dry_run_commits_nothing(cluster: Cluster) -> None:
    """No new resourceVersion and no change of the store (so no watch event)."""
    commits: list[int] = []
    cluster.kube.observe(lambda emulator: commits.append(1))
    commits.clear()
    version = send(cluster, PODS_PATH, method="GET")[1]["metadata"]["resourceVersion"]
    assert create_pod(cluster, pod_body("quiet"), dry_run=True)[0] == 201
    assert send(cluster, PODS_PATH, method="GET")[1]["metadata"]["resourceVersion"] == version
    assert commits == []
    assert create_pod(cluster, pod_body("loud"))[0] == 201
    assert commits == [1]


def test_a_dry_run_patch_and_delete_change_nothing(cluster: Cluster) -> None:
    create_pool(cluster, pool_body("drypatch"))
    path = f"/apis/{GROUP}/{VERSION}/namespaces/{NAMESPACE}/{PLURAL}/drypatch"
    url_body = {"spec": {"slots": 7}}
    request = urllib.request.Request(
        cluster.kube.url + path + "?dryRun=All",
        data=json.dumps(url_body).encode(),
        method="PATCH",
        headers={"Content-Type": "application/merge-patch+json"},
    )
    with urllib.request.urlopen(request, timeout=5) as answer:
        assert json.loads(answer.read())["spec"]["slots"] == 7
    assert cluster.pool("drypatch")["spec"]["slots"] == 2
    assert send(cluster, path, method="DELETE", dry_run=True)[0] == 200
    assert cluster.kube.get(POOLS, NAMESPACE, "drypatch") is not None


def test_a_spec_can_be_forced_past_the_schema(cluster: Cluster) -> None:
    """For the operator's own checks: what the API would refuse, stored anyway."""
    created = cluster.create_invalid_pool("forced", slots=2, maxAttempts=0)
    assert created["spec"]["maxAttempts"] == 0
    assert created["metadata"]["generation"] == 1
    forced = cluster.force_spec("forced", handler="not a handler")
    assert forced["spec"]["handler"] == "not a handler"
    assert forced["metadata"]["generation"] == 2
    assert cluster.pool("forced")["spec"]["handler"] == "not a handler"


# -- the operator under RBAC -------------------------------------------------------------


def deploy_rbac_without_finalizers() -> Rbac:
    """deploy/rbac.yaml with any grant on apiconcurrencypools/finalizers taken out."""
    import yaml

    from .emulator_rbac import DEPLOY_RBAC

    docs = [d for d in yaml.safe_load_all(DEPLOY_RBAC.read_text()) if d]
    for doc in docs:
        doc["rules"] = [
            {**rule, "resources": [r for r in rule["resources"] if not r.endswith("/finalizers")]}
            for rule in doc.get("rules") or []
        ]
    rbac = Rbac.from_documents(docs)
    rbac.add_token(OPERATOR_TOKEN, sa_user(*OPERATOR_SA))
    return rbac


def test_the_operator_presents_its_service_accounts_token(
    cluster: Cluster, operator: OperatorThread
) -> None:
    mark = cluster.mark()
    cluster.create_pool("tokened", slots=1)
    wait_for(lambda: cluster.slots_are("tokened", range(1)), 5, what="1 slot pod")
    creates = [
        r
        for r in cluster.kube.requests()[mark:]
        if r.method.value == "POST" and r.resource is not None and r.resource.plural == "pods"
    ]
    assert creates
    headers = {k.lower(): v for k, v in creates[0].headers.items()}
    assert headers.get("authorization") == f"Bearer {OPERATOR_TOKEN}"


@pytest.mark.emulator(rbac=deploy_rbac_without_finalizers())
def test_without_the_finalizers_rule_the_operator_cannot_create_slot_pods(
    cluster: Cluster, operator: OperatorThread
) -> None:
    """What a cluster with OwnerReferencesPermissionEnforcement does to an operator
    that sets blockOwnerDeletion without the rule: every slot-pod create is 403."""
    mark = cluster.mark()
    cluster.create_pool("unowned", slots=2)
    wait_for(
        lambda: cluster.calls(mark, method="POST", plural="pods"), 5, what="a pod create attempt"
    )
    cluster.wait_reconciles("unowned", count=1, timeout=5)
    assert cluster.pods("unowned") == {}
