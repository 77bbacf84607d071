"""The Helm chart charts/apipool: rendered for every optional feature and checked.

Rendering uses a `helm` binary when one is on PATH (`helm template`, `helm
lint`), else the `helm_python` library of the PyPI package helm-python-sdk
(Helm's Go code as a shared library, works offline). With neither, every test
here fails: the chart is part of the product and must not go untested quietly.

Every rendered manifest is validated against the Kubernetes OpenAPI schemas
(kubernetes-validate, strict: unknown fields are errors), except the KEDA
ScaledObject (a third-party CRD) and the ApiConcurrencyPool, which is checked
against the schema of crds/apiconcurrencypool.yaml.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import jsonschema
import pytest
import yaml

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "apipool"
RELEASE = "rel"
NAMESPACE = "apipool-system"
# The oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the newest
# schemas kubernetes-validate ships.
KUBE_VERSIONS = ("1.25.0", "latest")
NOT_KUBERNETES_KINDS = {"ScaledObject", "ApiConcurrencyPool"}
MISSING_BACKEND = (
    "cannot render the Helm chart: no `helm` binary on PATH and the Python package "
    "helm-python-sdk (import helm_python) is not installed; "
    "`pip install helm-python-sdk==0.2.2` (or install helm)"
)
EXCLUSIVE_MESSAGE = "worker.autoscaling.enabled and worker.keda.enabled are mutually exclusive"


class RenderError(Exception):
    """The chart failed to render (a template's `fail`, a schema error, ...)."""


# -- the two ways to run Helm --------------------------------------------------


class HelmBinary:
    """`helm` on PATH."""

    name = "helm binary"

    def __init__(self, helm: str) -> None:
        self.helm = helm

    def _run(self, *args: str, values: dict[str, Any] | None = None) -> str:
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [self.helm, *args]
            if values is not None:
                path = Path(tmp) / "values.yaml"
                path.write_text(yaml.safe_dump(values))
                cmd += ["--values", str(path)]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
        if proc.returncode != 0:
            raise RenderError(proc.stderr + proc.stdout)
        return proc.stdout

    def render(self, values: dict[str, Any]) -> dict[str, str]:
        out = self._run("template", RELEASE, str(CHART), "--namespace", NAMESPACE, values=values)
        files: dict[str, list[str]] = {}
        for chunk in out.split("\n---\n"):
            lines = chunk.strip("-\n").splitlines()
            source = next(
                (ln[len("# Source: ") :] for ln in lines if ln.startswith("# Source: ")), ""
            )
            files.setdefault(source, []).append(chunk)
        return {source: "\n---\n".join(chunks) for source, chunks in files.items()}

    def validate_schema(self, values: dict[str, Any]) -> None:
        # `helm lint` checks the values against values.schema.json.
        self._run("lint", str(CHART), values=values)

    def lint_errors(self) -> list[str]:
        proc = subprocess.run(
            [self.helm, "lint", str(CHART)], capture_output=True, text=True, check=False
        )
        errors = [ln for ln in proc.stdout.splitlines() if "[ERROR]" in ln]
        if proc.returncode != 0 and not errors:
            errors.append(proc.stderr or proc.stdout)
        return errors


class HelmPython:
    """The helm_python library (PyPI: helm-python-sdk)."""

    name = "helm_python"

    def __init__(self, module: ModuleType) -> None:
        self.helm = module

    def render(self, values: dict[str, Any]) -> dict[str, str]:
        with self.helm.Chart.load(str(CHART)) as chart:
            try:
                return dict(chart.render(values, name=RELEASE, namespace=NAMESPACE))
            except self.helm.HelmError as exc:
                raise RenderError(str(exc)) from exc

    def validate_schema(self, values: dict[str, Any]) -> None:
        with self.helm.Chart.load(str(CHART)) as chart:
            try:
                chart.validate_schema(values)
            except self.helm.HelmError as exc:
                raise RenderError(str(exc)) from exc

    def lint_errors(self) -> list[str]:
        report = self.helm.lint(str(CHART))
        errors = [m["error"] for m in report.get("messages", []) if m.get("severity") == 3]
        return errors + list(report.get("errors") or [])


def helm_backend() -> HelmBinary | HelmPython:
    """`helm` on PATH, else helm_python; the test fails without either."""
    binary = shutil.which("helm")
    if binary:
        return HelmBinary(binary)
    try:
        import helm_python
    except ImportError:
        pytest.fail(MISSING_BACKEND, pytrace=False)
    return HelmPython(helm_python)


@pytest.fixture(scope="session")
def helm() -> HelmBinary | HelmPython:
    return helm_backend()


def manifests(rendered: dict[str, str]) -> list[dict[str, Any]]:
    """The Kubernetes objects of a render (NOTES.txt and empty documents left out)."""
    docs = []
    for source, text in sorted(rendered.items()):
        if source.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                assert isinstance(doc, dict), f"{source}: not a mapping"
                docs.append(doc)
    return docs


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict[str, Any]], kind: str, suffix: str = "") -> dict[str, Any]:
    found = [d for d in by_kind(docs, kind) if d["metadata"]["name"].endswith(suffix)]
    assert len(found) == 1, f"expected one {kind} *{suffix}, found {len(found)}"
    return found[0]


# -- the scenarios -------------------------------------------------------------

WORKER = {"enabled": True, "targetUrl": "https://api.example/v1/x"}
SCENARIOS: dict[str, dict[str, Any]] = {
    "default": {},
    "internal-redis": {"redis": {"internal": {"enabled": True}}},
    "internal-redis-sized": {
        "redis": {"internal": {"enabled": True, "maxmemory": "1gb", "protoMaxBulkLen": "16mb"}}
    },
    "existing-secret-pool": {
        "redis": {"existingSecret": "my-redis", "existingSecretKey": "redis-url"},
        "pool": {"enabled": True, "name": "billing", "slots": 8},
    },
    "example-pool": {
        "redis": {"internal": {"enabled": True}},
        "pool": {
            "enabled": True,
            "handler": "billing=mymod:call",
            "extraHandlers": ["http"],
            "template": {"resources": {"requests": {"cpu": "100m", "memory": "64Mi"}}},
            "maxEnvelopeBytes": 65536,
            "maxResultBytes": 32768,
            "maxResponseBytes": 4194304,
            "maxDeadLetters": 0,
            "http": {
                "allowUrls": ["http://billing.team-a.svc:8080/", "https://api.example.com/v2/"],
                "followRedirects": True,
                "redactHeaders": ["X-Billing-Token"],
            },
            "allowRedisEviction": True,
        },
    },
    "worker-hpa": {
        "redis": {"internal": {"enabled": True}},
        "pool": {"enabled": True},
        "worker": {
            **WORKER,
            "inputList": "rq:queue:default",
            "autoscaling": {
                "enabled": True,
                "minReplicas": 2,
                "maxReplicas": 7,
                "external": {
                    "metricName": "redis_key_size",
                    "selector": {"matchLabels": {"key": "rq:queue:default"}},
                    "targetAverageValue": "20",
                },
            },
        },
    },
    "worker-keda": {
        "redis": {"internal": {"enabled": True}},
        "pool": {"enabled": True},
        "worker": {**WORKER, "inputList": "rq:queue:default", "keda": {"enabled": True}},
    },
    "worker-keda-existing-secret": {
        "redis": {"existingSecret": "my-redis"},
        "worker": {
            **WORKER,
            "pool": "billing",
            "inputList": "resque:queue:billing",
            "keda": {
                "enabled": True,
                "address": "redis.data.svc:6379",
                "passwordSecret": {"name": "redis-auth", "key": "password"},
            },
        },
    },
    "worker-fixed-replicas": {"redis": {"existingSecret": "my-redis"}, "worker": WORKER},
    "watch-namespaces": {"operator": {"watchNamespaces": ["team-a", "team-b"]}},
    "watch-all-namespaces": {"operator": {"watchAllNamespaces": True}},
}


@pytest.fixture(scope="module")
def rendered(helm: HelmBinary | HelmPython) -> dict[str, list[dict[str, Any]]]:
    return {name: manifests(helm.render(values)) for name, values in SCENARIOS.items()}


@pytest.fixture(scope="module")
def crd_validator() -> jsonschema.Draft4Validator:
    crd = yaml.safe_load((CHART / "crds" / "apiconcurrencypool.yaml").read_text())
    (version,) = crd["spec"]["versions"]
    schema = version["schema"]["openAPIV3Schema"]
    # The CRD's schema is OpenAPI v3.0 (draft 4 keywords, boolean exclusiveMinimum).
    jsonschema.Draft4Validator.check_schema(schema)
    return jsonschema.Draft4Validator(schema)


# -- every manifest is valid -----------------------------------------------------


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_manifests_validate_against_kubernetes_schemas(
    rendered: dict[str, list[dict[str, Any]]],
    crd_validator: jsonschema.Draft4Validator,
    scenario: str,
) -> None:
    import kubernetes_validate

    docs = rendered[scenario]
    assert docs
    for doc in docs:
        what = f"{scenario}: {doc['kind']}/{doc['metadata']['name']}"
        if doc["kind"] == "ApiConcurrencyPool":
            assert doc["apiVersion"] == "apipool.dev/v1alpha1"
            errors = [e.message for e in crd_validator.iter_errors(doc)]
            assert not errors, f"{what}: {errors}"
            continue
        if doc["kind"] in NOT_KUBERNETES_KINDS:
            continue
        for version in KUBE_VERSIONS:
            v = kubernetes_validate.latest_version() if version == "latest" else version
            try:
                kubernetes_validate.validate(doc, v, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{what} is invalid for Kubernetes {v}: {exc.message}")


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_names_are_unique_and_namespaced(
    rendered: dict[str, list[dict[str, Any]]], scenario: str
) -> None:
    cluster_scoped = {"ClusterRole", "ClusterRoleBinding"}
    seen = set()
    for doc in rendered[scenario]:
        meta = doc["metadata"]
        key = (doc["kind"], meta.get("namespace"), meta["name"])
        assert key not in seen, f"{scenario}: duplicate {key}"
        seen.add(key)
        assert len(meta["name"]) <= 63, meta["name"]
        if doc["kind"] in cluster_scoped:
            assert "namespace" not in meta
        else:
            assert meta.get("namespace"), (
                f"{scenario}: {doc['kind']}/{meta['name']} has no namespace"
            )


# -- operator ------------------------------------------------------------------


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_operator_is_one_replica_recreate(
    rendered: dict[str, list[dict[str, Any]]], scenario: str
) -> None:
    dep = one(rendered[scenario], "Deployment", "-operator")
    assert dep["spec"]["replicas"] == 1
    assert dep["spec"]["strategy"] == {"type": "Recreate"}
    pod = dep["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["args"] == ["operator"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    port = container["livenessProbe"]["httpGet"]["port"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports[port] == 8081
    assert (
        pod["serviceAccountName"]
        == one(rendered[scenario], "ServiceAccount", "-operator")["metadata"]["name"]
    )


def watch_env(docs: list[dict[str, Any]]) -> str:
    dep = one(docs, "Deployment", "-operator")
    env = {
        e["name"]: e.get("value") for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    return env["APIPOOL_WATCH_NAMESPACES"]


@pytest.mark.parametrize(
    ("scenario", "namespaces"),
    [
        ("default", [NAMESPACE]),
        ("watch-namespaces", ["team-a", "team-b"]),
        ("watch-all-namespaces", []),
    ],
)
def test_rbac_follows_the_watched_namespaces(
    rendered: dict[str, list[dict[str, Any]]], scenario: str, namespaces: list[str]
) -> None:
    docs = rendered[scenario]
    assert watch_env(docs) == ",".join(namespaces)
    sa = one(docs, "ServiceAccount", "-operator")["metadata"]
    subject = {"kind": "ServiceAccount", "name": sa["name"], "namespace": NAMESPACE}
    roles = by_kind(docs, "Role")
    bindings = by_kind(docs, "RoleBinding")
    assert sorted(r["metadata"]["namespace"] for r in roles) == sorted(namespaces)
    assert sorted(b["metadata"]["namespace"] for b in bindings) == sorted(namespaces)
    for binding in bindings:
        assert binding["subjects"] == [subject]
        assert binding["roleRef"]["kind"] == "Role"
    cluster_roles = {r["metadata"]["name"]: r for r in by_kind(docs, "ClusterRole")}
    framework = cluster_roles.pop(f"{RELEASE}-apipool-framework")
    assert {(r["apiGroups"][0], r["resources"][0]) for r in framework["rules"]} == {
        ("apiextensions.k8s.io", "customresourcedefinitions"),
        ("", "namespaces"),
    }
    for rule in framework["rules"]:
        assert rule["verbs"] == ["list", "watch"]
    reference = application_rules()
    if namespaces:
        assert not cluster_roles
        for role in roles:
            assert role["rules"] == reference
    else:
        assert list(cluster_roles) == [f"{RELEASE}-apipool-operator"]
        assert cluster_roles[f"{RELEASE}-apipool-operator"]["rules"] == reference
    for crb in by_kind(docs, "ClusterRoleBinding"):
        assert crb["subjects"] == [subject]
        assert crb["roleRef"]["name"] in {
            r["metadata"]["name"] for r in by_kind(docs, "ClusterRole")
        }


def application_rules() -> list[dict[str, Any]]:
    """The Role of deploy/rbac.yaml, the reference for the chart's rules."""
    for doc in yaml.safe_load_all((ROOT / "deploy" / "rbac.yaml").read_text()):
        if doc and doc["kind"] == "Role":
            return list(doc["rules"])
    raise AssertionError("deploy/rbac.yaml has no Role")


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_rbac_has_no_wildcard(rendered: dict[str, list[dict[str, Any]]], scenario: str) -> None:
    for doc in rendered[scenario]:
        if doc["kind"] not in {"Role", "ClusterRole"}:
            continue
        for rule in doc["rules"]:
            for field in ("apiGroups", "resources", "verbs", "resourceNames", "nonResourceURLs"):
                assert "*" not in rule.get(field, []), f"{doc['metadata']['name']}: {rule}"
            assert not {"escalate", "bind", "impersonate"} & set(rule["verbs"])
            if "update" in rule["verbs"]:
                # The one update the operator needs: blockOwnerDeletion on the
                # slot pods' ownerReferences (OwnerReferencesPermissionEnforcement).
                assert rule["resources"] == ["apiconcurrencypools/finalizers"], rule
                assert rule["verbs"] == ["update"], rule


# -- pods are hardened -----------------------------------------------------------


def pod_specs(docs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    for doc in docs:
        name = f"{doc['kind']}/{doc['metadata']['name']}"
        if doc["kind"] == "Pod":
            yield name, doc["spec"]
        elif doc["kind"] in {"Deployment", "StatefulSet"}:
            yield name, doc["spec"]["template"]["spec"]


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_every_container_is_hardened(
    rendered: dict[str, list[dict[str, Any]]], scenario: str
) -> None:
    for name, spec in pod_specs(rendered[scenario]):
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, name
        for container in spec["containers"]:
            sc = container["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True, name
            assert sc["allowPrivilegeEscalation"] is False, name
            assert sc["privileged"] is False, name
            assert sc["capabilities"] == {"drop": ["ALL"]}, name
            assert container["resources"]["limits"], name
            if not name.startswith("Pod/"):
                assert "livenessProbe" in container or name.endswith("-worker"), name


# -- redis -----------------------------------------------------------------------


def test_internal_redis(rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs = rendered["internal-redis"]
    sts = one(docs, "StatefulSet", "-redis")
    (container,) = sts["spec"]["template"]["spec"]["containers"]
    args = container["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert probe in container
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert {"name": "data", "mountPath": "/data"} in container["volumeMounts"]
    assert claim["metadata"]["name"] == "data"
    service = one(docs, "Service", "-redis")
    assert service["spec"]["selector"] == sts["spec"]["selector"]["matchLabels"]
    secret = one(docs, "Secret", "-redis")
    url = secret["stringData"]["url"]
    password = secret["stringData"]["password"]
    assert len(password) >= 32
    assert url == f"redis://:{password}@{RELEASE}-apipool-redis.{NAMESPACE}.svc:6379/0"


def test_existing_secret_feeds_the_pool(rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs = rendered["existing-secret-pool"]
    assert not by_kind(docs, "StatefulSet")
    assert not by_kind(docs, "Secret")
    pool = one(docs, "ApiConcurrencyPool")
    assert pool["metadata"]["name"] == "billing"
    assert pool["spec"]["slots"] == 8
    assert pool["spec"]["redis"] == {"secretRef": {"name": "my-redis", "key": "redis-url"}}


def test_example_pool_defaults_to_the_chart_image(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    docs = rendered["example-pool"]
    pool = one(docs, "ApiConcurrencyPool")
    operator = one(docs, "Deployment", "-operator")
    assert pool["spec"]["image"] == operator["spec"]["template"]["spec"]["containers"][0]["image"]
    assert pool["spec"]["redis"]["secretRef"] == {"name": f"{RELEASE}-apipool-redis", "key": "url"}
    assert pool["metadata"]["namespace"] == NAMESPACE
    assert pool["spec"]["template"]["resources"]["requests"]["cpu"] == "100m"


# -- worker ----------------------------------------------------------------------


def worker_container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    dep = one(docs, "Deployment", "-worker")
    (container,) = dep["spec"]["template"]["spec"]["containers"]
    return container


@pytest.mark.parametrize(
    "scenario",
    ["worker-hpa", "worker-keda", "worker-keda-existing-secret", "worker-fixed-replicas"],
)
def test_worker_runs_the_example_script(
    rendered: dict[str, list[dict[str, Any]]], scenario: str
) -> None:
    docs = rendered[scenario]
    container = worker_container(docs)
    assert container["command"] == ["python", "/app/general_worker.py"]
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == "/app")
    assert mount["readOnly"] is True
    config_map = one(docs, "ConfigMap", "-worker")
    script = (ROOT / "examples" / "python" / "general_worker.py").read_text()
    assert config_map["data"]["general_worker.py"].strip() == script.strip()
    env = {e["name"]: e for e in container["env"]}
    assert env["APIPOOL_REDIS_URL"]["valueFrom"]["secretKeyRef"]["name"]
    assert env["APIPOOL_TARGET_URL"]["value"] == WORKER["targetUrl"]
    assert env["APIPOOL_POOL"]["value"] == SCENARIOS[scenario]["worker"].get("pool", "example")


def test_worker_hpa(rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs = rendered["worker-hpa"]
    hpa = one(docs, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    dep = one(docs, "Deployment", "-worker")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": dep["metadata"]["name"],
    }
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 7)
    # The workers' own input backlog, not CPU (opt-in only) nor the pool's queue.
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "External"
    assert metric["external"]["metric"] == {
        "name": "redis_key_size",
        "selector": {"matchLabels": {"key": "rq:queue:default"}},
    }
    assert metric["external"]["target"] == {"type": "AverageValue", "averageValue": "20"}
    assert "replicas" not in dep["spec"]  # owned by the HPA
    assert worker_container(docs)["resources"]["requests"]["cpu"]
    assert not by_kind(docs, "ScaledObject")


@pytest.mark.parametrize(
    ("scenario", "pool", "input_list"),
    [
        ("worker-keda", "example", "rq:queue:default"),
        ("worker-keda-existing-secret", "billing", "resque:queue:billing"),
    ],
)
def test_worker_keda(
    rendered: dict[str, list[dict[str, Any]]], scenario: str, pool: str, input_list: str
) -> None:
    docs = rendered[scenario]
    so = one(docs, "ScaledObject")
    assert so["apiVersion"] == "keda.sh/v1alpha1"
    assert (
        so["spec"]["scaleTargetRef"]["name"]
        == one(docs, "Deployment", "-worker")["metadata"]["name"]
    )
    (trigger,) = so["spec"]["triggers"]
    assert trigger["type"] == "redis"
    # The workers' input backlog, never the pool's queue (their output).
    assert trigger["metadata"]["listName"] == input_list
    assert trigger["metadata"]["listName"] != f"apipool:{{{pool}}}:queue"
    assert all(isinstance(v, str) for v in trigger["metadata"].values())
    env = {e["name"] for e in worker_container(docs)["env"]}
    assert trigger["metadata"]["addressFromEnv"] in env
    assert trigger["metadata"]["passwordFromEnv"] in env
    assert not by_kind(docs, "HorizontalPodAutoscaler")
    assert "replicas" not in one(docs, "Deployment", "-worker")["spec"]


def test_queue_key_matches_the_library() -> None:
    from apipool.layout import PoolKeys

    assert PoolKeys("example").queue == "apipool:{example}:queue"


# -- failures and schema ---------------------------------------------------------


def test_hpa_and_keda_together_fail_with_a_clear_message(helm: HelmBinary | HelmPython) -> None:
    values = {
        "redis": {"internal": {"enabled": True}},
        "worker": {**WORKER, "autoscaling": {"enabled": True}, "keda": {"enabled": True}},
    }
    with pytest.raises(RenderError, match=EXCLUSIVE_MESSAGE):
        helm.render(values)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"pool": {"enabled": True}}, "need Redis"),
        ({"worker": WORKER}, "need Redis"),
        (
            {
                "redis": {"existingSecret": "r", "internal": {"enabled": True}},
                "pool": {"enabled": True},
            },
            "mutually exclusive",
        ),
        ({"redis": {"existingSecret": "r"}, "worker": {"enabled": True}}, "worker.targetUrl"),
        (
            {
                "redis": {"existingSecret": "r"},
                "worker": {**WORKER, "inputList": "q", "keda": {"enabled": True}},
            },
            "worker.keda.address",
        ),
    ],
)
def test_incomplete_values_fail_the_render(
    helm: HelmBinary | HelmPython, values: dict[str, Any], message: str
) -> None:
    with pytest.raises(RenderError, match=message):
        helm.render(values)


def test_schema_accepts_the_scenarios(helm: HelmBinary | HelmPython) -> None:
    for values in SCENARIOS.values():
        helm.validate_schema(values)


@pytest.mark.parametrize(
    "values",
    [
        {"pool": {"slots": -1}},
        {"pool": {"slots": "two"}},
        {"pool": {"name": "Not_A_DNS_Label"}},
        {"pool": {"handler": "not a handler"}},
        {"image": {"pullPolicy": "Sometimes"}},
        {"operator": {"watchAllNamespaces": "yes"}},
        {"worker": {"autoscaling": {"targetCPUUtilizationPercentage": 0}}},
        {"worker": {"keda": {"listLength": 0}}},
        {"redis": {"internal": {"enabled": True, "persistence": {"size": "lots"}}}},
        {"unknownTopLevelKey": 1},
        {"redis": {"internal": {"maxmemory": "lots"}}},
        {"redis": {"internal": {"maxmemory": 268435456}}},
        {"redis": {"internal": {"protoMaxBulkLen": "8 mb"}}},
        {"pool": {"maxEnvelopeBytes": 100}},
        {"pool": {"maxResponseBytes": 1 << 30}},
        {"pool": {"maxDeadLetters": -1}},
        {"pool": {"http": {"allowUrls": ["ftp://files.example.com/"]}}},
        {"pool": {"http": {"allowUrls": ["billing.team-a.svc"]}}},
        {"pool": {"http": {"redactHeaders": ["X Token"]}}},
        {"pool": {"http": {"followRedirects": "yes"}}},
        {"pool": {"http": {"allowedUrls": []}}},
        {"pool": {"allowRedisEviction": "no"}},
    ],
)
def test_schema_rejects_bad_values(helm: HelmBinary | HelmPython, values: dict[str, Any]) -> None:
    with pytest.raises(RenderError):
        helm.validate_schema(values)
    with pytest.raises(RenderError):
        helm.render(values)


def test_schema_is_valid_json_schema() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    jsonschema.Draft7Validator(schema).validate(defaults)


def test_helm_lint_finds_no_errors(helm: HelmBinary | HelmPython) -> None:
    assert helm.lint_errors() == []


# -- the chart's metadata, test hook and notes ------------------------------------


def test_chart_metadata() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2"
    assert chart["name"] == "apipool"
    assert str(chart["version"]) == "0.1.0"
    assert str(chart["appVersion"]) == "0.1.0"


def test_helm_test_hook_runs_the_image(rendered: dict[str, list[dict[str, Any]]]) -> None:
    pod = one(rendered["default"], "Pod", "-test-version")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    (container,) = pod["spec"]["containers"]
    assert container["args"] == ["--version"]
    assert (
        container["image"]
        == f"apipool:{yaml.safe_load((CHART / 'Chart.yaml').read_text())['appVersion']}"
    )
    assert pod["spec"]["restartPolicy"] == "Never"


def test_notes_tell_how_to_watch_pools(helm: HelmBinary | HelmPython) -> None:
    if isinstance(helm, HelmBinary):
        pytest.skip("helm template does not render NOTES.txt")
    notes = helm.render({})["apipool/templates/NOTES.txt"]
    assert "kubectl get acp" in notes
    assert ".status" in notes
    assert "kubectl apply -f charts/apipool/crds/" in notes


def test_readme_explains_crd_upgrades() -> None:
    readme = (CHART / "README.md").read_text()
    assert "never upgrade" in readme.lower() or "never upgrades" in readme.lower()
    assert "kubectl apply -f charts/apipool/crds/" in readme


# -- the chart's copies ------------------------------------------------------------


def load_sync_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("sync_crds", ROOT / "scripts" / "sync_crds.py")
    assert spec
    assert spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sync_crds_check_passes() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "sync_crds.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (CHART / "crds" / "apiconcurrencypool.yaml").read_bytes() == (
        ROOT / "crds" / "apiconcurrencypool.yaml"
    ).read_bytes()


def test_sync_crds_reports_and_repairs_a_stale_copy(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sync = load_sync_script()
    for source, copy in sync.PAIRS:
        (tmp_path / source).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / source).write_bytes((ROOT / source).read_bytes())
        (tmp_path / copy).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / copy).write_bytes((ROOT / source).read_bytes())
    crd_source, crd_copy = sync.PAIRS[0]
    (tmp_path / crd_copy).write_text(
        (ROOT / crd_source).read_text().replace("maximum: 1000", "maximum: 9")
    )
    assert sync.main(["--check"], root=tmp_path) == 1
    out = capsys.readouterr().out
    assert "-                  maximum: 9" in out
    assert "+                  maximum: 1000" in out
    assert sync.main([], root=tmp_path) == 0
    assert sync.main(["--check"], root=tmp_path) == 0
    assert (tmp_path / crd_copy).read_bytes() == (ROOT / crd_source).read_bytes()
