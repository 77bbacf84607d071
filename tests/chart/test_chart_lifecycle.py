"""Install and uninstall: the in-chart Redis password, the pre-delete hook that
removes the in-chart pool while the operator runs, and what NOTES and README tell."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from .test_chart import (
    CHART,
    KUBE_VERSIONS,
    NAMESPACE,
    RELEASE,
    HelmBinary,
    HelmPython,
    RenderError,
    by_kind,
    helm_backend,
    manifests,
    one,
)

pytestmark = pytest.mark.unit

REDIS = {"redis": {"internal": {"enabled": True}}}
POOL: dict[str, Any] = {**REDIS, "pool": {"enabled": True, "name": "billing"}}
HOOK = f"{RELEASE}-apipool-pool-cleanup"


@pytest.fixture(scope="module")
def chart() -> HelmBinary | HelmPython:
    return helm_backend()


def redis_secret(chart: HelmBinary | HelmPython, values: dict[str, Any]) -> dict[str, str]:
    secret = one(manifests(chart.render(values)), "Secret", "-redis")
    return dict(secret["stringData"])


# -- the in-chart Redis password ------------------------------------------------------


def test_a_given_password_is_used_and_stable(chart: HelmBinary | HelmPython) -> None:
    password = "s3cret-Pass.word_0123"
    values = {"redis": {"internal": {"enabled": True, "password": password}}}
    first, second = redis_secret(chart, values), redis_secret(chart, values)
    assert first == second
    assert first["password"] == password
    assert first["url"] == f"redis://:{password}@{RELEASE}-apipool-redis.{NAMESPACE}.svc:6379/0"


def test_without_a_password_or_live_secret_one_is_generated(
    chart: HelmBinary | HelmPython,
) -> None:
    """Rendered without a cluster the lookup finds nothing: a fresh random password."""
    first, second = redis_secret(chart, REDIS), redis_secret(chart, REDIS)
    for secret in (first, second):
        assert re.fullmatch(r"[A-Za-z0-9]{32}", secret["password"])
        assert f":{secret['password']}@" in secret["url"]
    assert first["password"] != second["password"]


def test_the_live_secrets_password_is_reused() -> None:
    """The template looks the live Secret up and prefers it to a new random one;
    an explicit value wins over both."""
    text = (CHART / "templates" / "redis.yaml").read_text()
    given = text.index("$password := $r.password")
    looked_up = text.index('lookup "v1" "Secret" .Release.Namespace $name')
    generated = text.index("randAlphaNum 32")
    assert given < looked_up < generated
    assert 'dig "data" "password"' in text


@pytest.mark.parametrize("password", ["short", "has space in it 0123", "with@sign-012345678"])
def test_schema_rejects_bad_passwords(chart: HelmBinary | HelmPython, password: str) -> None:
    with pytest.raises(RenderError):
        chart.validate_schema({"redis": {"internal": {"enabled": True, "password": password}}})


# -- the pre-delete hook ----------------------------------------------------------


@pytest.fixture(scope="module")
def hook_render(chart: HelmBinary | HelmPython) -> dict[str, str]:
    return chart.render(POOL)


def test_uninstall_hook_deletes_the_pool_before_the_operator(
    hook_render: dict[str, str],
) -> None:
    docs = manifests(hook_render)
    job = one(docs, "Job", "-pool-cleanup")
    annotations = job["metadata"]["annotations"]
    assert annotations["helm.sh/hook"] == "pre-delete"
    assert "hook-succeeded" in annotations["helm.sh/hook-delete-policy"]
    pod = job["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == HOOK
    assert pod["restartPolicy"] == "Never"
    (container,) = pod["containers"]
    assert container["command"] == ["python", "-c"]
    script, namespace, pool, timeout = container["args"]
    assert (namespace, pool, timeout) == (NAMESPACE, "billing", "120")
    assert script.strip() == (CHART / "files" / "delete_pool.py").read_text().strip()
    compile(script, "delete_pool.py", "exec")
    assert job["spec"]["activeDeadlineSeconds"] > int(timeout)
    # Its RBAC is created first, as hooks of the same event.
    for kind in ("ServiceAccount", "Role", "RoleBinding"):
        obj = one(docs, kind, "-pool-cleanup")["metadata"]
        assert obj["annotations"]["helm.sh/hook"] == "pre-delete"
        assert int(obj["annotations"]["helm.sh/hook-weight"]) < int(
            annotations["helm.sh/hook-weight"]
        )
        assert obj["namespace"] == NAMESPACE


def test_uninstall_hook_rbac_is_minimal_and_separate(hook_render: dict[str, str]) -> None:
    docs = manifests(hook_render)
    role = one(docs, "Role", "-pool-cleanup")
    assert role["rules"] == [
        {
            "apiGroups": ["apipool.dev"],
            "resources": ["apiconcurrencypools"],
            "verbs": ["get", "delete"],
        }
    ]
    binding = one(docs, "RoleBinding", "-pool-cleanup")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": HOOK,
    }
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": HOOK, "namespace": NAMESPACE}]
    rbac = yaml.safe_load_all(hook_render.get("apipool/templates/rbac.yaml", ""))
    assert all(HOOK not in str(doc) for doc in rbac)
    assert "pool-cleanup" in hook_render["apipool/templates/pool-cleanup-rbac.yaml"]


def test_uninstall_hook_manifests_are_valid(hook_render: dict[str, str]) -> None:
    import kubernetes_validate

    docs = [d for d in manifests(hook_render) if d["metadata"]["name"] == HOOK]
    assert sorted(d["kind"] for d in docs) == ["Job", "Role", "RoleBinding", "ServiceAccount"]
    for doc in docs:
        for version in KUBE_VERSIONS:
            v = kubernetes_validate.latest_version() if version == "latest" else version
            kubernetes_validate.validate(doc, v, strict=True)


@pytest.mark.parametrize(
    "values", [REDIS, {**POOL, "poolCleanup": {"enabled": False, "timeoutSeconds": 120}}]
)
def test_no_hook_without_an_in_chart_pool(
    chart: HelmBinary | HelmPython, values: dict[str, Any]
) -> None:
    docs = manifests(chart.render(values))
    assert not [d for d in docs if d["metadata"]["name"] == HOOK]
    assert not by_kind(docs, "Job")


def load_delete_pool() -> ModuleType:
    path = CHART / "files" / "delete_pool.py"
    spec = importlib.util.spec_from_file_location("delete_pool", path)
    assert spec
    assert spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class FakePools:
    """CustomObjectsApi for one pool that disappears after `polls` reads."""

    def __init__(self, exists: bool, polls: int) -> None:
        self.exists = exists
        self.polls = polls
        self.calls: list[tuple[str, ...]] = []

    def delete_namespaced_custom_object(self, *args: str) -> None:
        self.calls.append(("delete", *args))
        if not self.exists:
            raise self.missing()

    def get_namespaced_custom_object(self, *args: str) -> dict[str, Any]:
        self.calls.append(("get", *args))
        self.polls -= 1
        if self.polls < 0:
            raise self.missing()
        return {}

    @staticmethod
    def missing() -> Exception:
        from kubernetes.client.exceptions import ApiException

        return ApiException(status=404)


@pytest.mark.parametrize(
    ("exists", "polls", "timeout", "code"),
    [(True, 2, 60.0, 0), (False, 0, 60.0, 0), (True, 10**6, 0.05, 1)],
)
def test_delete_pool_waits_until_the_pool_is_gone(
    monkeypatch: pytest.MonkeyPatch, exists: bool, polls: int, timeout: float, code: int
) -> None:
    module = load_delete_pool()
    api = FakePools(exists, polls)
    monkeypatch.setattr(module.kubernetes.config, "load_incluster_config", lambda: None)
    monkeypatch.setattr(module.kubernetes.client, "CustomObjectsApi", lambda: api)
    monkeypatch.setattr(module.time, "sleep", lambda _: None)
    assert module.main("ns", "billing", timeout) == code
    assert api.calls[0] == (
        "delete",
        "apipool.dev",
        "v1alpha1",
        "ns",
        "apiconcurrencypools",
        "billing",
    )
    if exists and code == 0:
        assert [c[0] for c in api.calls] == ["delete", "get", "get", "get"]


# -- NOTES and README ----------------------------------------------------------------


def notes(chart: HelmBinary | HelmPython, values: dict[str, Any]) -> str:
    if isinstance(chart, HelmBinary):
        pytest.skip("helm template does not render NOTES.txt")
    return " ".join(chart.render(values)["apipool/templates/NOTES.txt"].split())


def test_notes_say_how_to_get_the_image(chart: HelmBinary | HelmPython) -> None:
    text = notes(chart, {})
    assert "docker build -t apipool:0.1.0 ." in text
    assert "kind load docker-image apipool:0.1.0" in text
    assert "image.repository" in text
    own = notes(
        chart, {"image": {"repository": "registry.example/apipool", "pullPolicy": "Always"}}
    )
    assert "docker build" not in own


def test_notes_say_to_scale_the_pool_through_values(chart: HelmBinary | HelmPython) -> None:
    text = notes(chart, POOL)
    assert "--set pool.slots=N" in text
    assert "kubectl scale" in text
    assert "reverted by the next helm upgrade" in text
    assert "pre-delete hook" in text


def test_readme_covers_the_image_uninstall_and_autoscaling() -> None:
    readme = " ".join((CHART / "README.md").read_text().split())
    for phrase in (
        "docker build -t apipool:0.1.0 .",
        "kind load docker-image apipool:0.1.0",
        "image.repository",
        "pre-delete hook",
        "redis.internal.password",
        "worker.inputList",
        "autoscaling.external.metricName",
        "reverted by the next `helm upgrade`",
    ):
        assert phrase in readme, phrase
    assert "redis list `apipool:{POOL}:queue`" not in readme


def test_values_keep_the_pool_cleanup_defaults() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["poolCleanup"] == {"enabled": True, "timeoutSeconds": 120}
    assert values["redis"]["internal"]["password"] == ""
    assert Path(CHART / "templates" / "pool-cleanup-rbac.yaml").exists()
