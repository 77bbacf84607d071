"""Authentication and authorization as the API server does them, for the emulator.

- Authentication: a bearer token maps to a user (a ServiceAccount's user is
  ``system:serviceaccount:<namespace>:<name>``); a request without a token is
  the cluster's admin (the tests' own client); an unknown token answers 401.
- Authorization (RBAC): Roles, ClusterRoles and their bindings, read from
  Kubernetes manifests (deploy/rbac.yaml, or the chart's rendered RBAC). A
  request is mapped to a verb, API group, resource, subresource, namespace and
  name, and allowed only if a bound rule grants it; else 403 Forbidden.
- Admission ``OwnerReferencesPermissionEnforcement``: changing an object's
  ownerReferences needs ``delete`` on the object, and setting
  ``blockOwnerDeletion: true`` needs ``update`` on the owner's
  ``<resource>/finalizers``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import attrs
import kmock
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY_RBAC = ROOT / "deploy" / "rbac.yaml"
CHART = ROOT / "charts" / "apipool"
OPERATOR_SA = ("apipool-system", "apipool-operator")
"""Namespace and name of the operator's ServiceAccount in deploy/rbac.yaml."""
OPERATOR_TOKEN = "operator-token"
"""The bearer token the operator presents in the tests (see conftest.write_kubeconfig)."""
ADMIN = "kubernetes-admin"


def sa_user(namespace: str, name: str) -> str:
    return f"system:serviceaccount:{namespace}:{name}"


@attrs.frozen
class Attributes:
    """What a request asks to do, in RBAC terms."""

    user: str
    verb: str
    group: str
    resource: str
    subresource: str | None = None
    namespace: str | None = None
    name: str | None = None

    def describe(self) -> str:
        what = self.resource + (f"/{self.subresource}" if self.subresource else "")
        where = (
            f' in the namespace "{self.namespace}"' if self.namespace else " at the cluster scope"
        )
        return (
            f'User "{self.user}" cannot {self.verb} resource "{what}" '
            f'in API group "{self.group}"{where}'
        )


def request_verb(request: kmock.Request) -> str:
    """The RBAC verb of a request (a DELETE of a collection is deletecollection)."""
    method = str(request.method.value if request.method else "").upper()
    if method == "GET":
        if request.params.get("watch") in ("true", "1"):
            return "watch"
        return "get" if request.name else "list"
    if method == "POST":
        return "create"
    if method == "PATCH":
        return "patch"
    if method == "PUT":
        return "update"
    if method == "DELETE":
        return "delete" if request.name else "deletecollection"
    return method.lower()


def _matches(allowed: Iterable[str], value: str) -> bool:
    return "*" in allowed or value in allowed


def _rule_allows(rule: Mapping[str, Any], attrs_: Attributes) -> bool:
    if not _matches(rule.get("verbs") or [], attrs_.verb):
        return False
    if not _matches(rule.get("apiGroups") or [], attrs_.group):
        return False
    combined = attrs_.resource + (f"/{attrs_.subresource}" if attrs_.subresource else "")
    resources = rule.get("resources") or []
    if not (
        "*" in resources
        or combined in resources
        or (attrs_.subresource is not None and f"*/{attrs_.subresource}" in resources)
    ):
        return False
    names = rule.get("resourceNames") or []
    return not names or (attrs_.name is not None and attrs_.name in names)


@attrs.define
class Rbac:
    """The RBAC objects of a cluster and the tokens of its users."""

    roles: dict[tuple[str | None, str], list[dict[str, Any]]] = attrs.field(factory=dict)
    """(namespace or None for a ClusterRole, name) -> rules."""
    bindings: list[dict[str, Any]] = attrs.field(factory=list)
    tokens: dict[str, str] = attrs.field(factory=dict)
    """Bearer token -> user name."""
    groups: dict[str, set[str]] = attrs.field(factory=dict)

    @classmethod
    def from_documents(cls, docs: Iterable[Mapping[str, Any]]) -> Rbac:
        rbac = cls()
        for doc in docs:
            if doc:
                rbac.add(doc)
        return rbac

    @classmethod
    def from_file(cls, path: Path = DEPLOY_RBAC) -> Rbac:
        return cls.from_documents(yaml.safe_load_all(path.read_text()))

    def add(self, doc: Mapping[str, Any]) -> None:
        kind, meta = doc.get("kind"), doc.get("metadata") or {}
        if kind == "ClusterRole":
            self.roles[None, meta["name"]] = list(doc.get("rules") or [])
        elif kind == "Role":
            self.roles[meta.get("namespace", "default"), meta["name"]] = list(
                doc.get("rules") or []
            )
        elif kind == "ClusterRoleBinding":
            self.bindings.append({**doc, "metadata": {**meta, "namespace": None}})
        elif kind == "RoleBinding":
            self.bindings.append({**doc, "metadata": {"namespace": "default", **meta}})

    def add_token(self, token: str, user: str, groups: Iterable[str] = ()) -> None:
        self.tokens[token] = user
        self.groups[user] = set(groups)

    def user_of(self, authorization: str | None) -> str:
        """The user a request's Authorization header names; 401 for an unknown token."""
        if not authorization:
            return ADMIN
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or token.strip() not in self.tokens:
            raise kmock.KubernetesError(
                status=401, reason="Unauthorized", message="Unauthorized", details={}
            )
        return self.tokens[token.strip()]

    def _subject_is(self, subject: Mapping[str, Any], user: str, binding_ns: str | None) -> bool:
        kind = subject.get("kind")
        if kind == "ServiceAccount":
            namespace = subject.get("namespace") or binding_ns
            return user == sa_user(str(namespace), str(subject.get("name")))
        if kind == "User":
            return user == subject.get("name")
        if kind == "Group":
            return subject.get("name") in self.groups.get(user, set())
        return False

    def allows(self, request: Attributes) -> bool:
        if request.user == ADMIN:
            return True
        for binding in self.bindings:
            binding_ns = binding["metadata"].get("namespace")
            if binding_ns is not None and binding_ns != request.namespace:
                continue  # a RoleBinding grants only in its own namespace
            subjects = binding.get("subjects") or []
            if not any(self._subject_is(s, request.user, binding_ns) for s in subjects):
                continue
            ref = binding.get("roleRef") or {}
            role_ns = binding_ns if ref.get("kind") == "Role" else None
            rules = self.roles.get((role_ns, str(ref.get("name"))), [])
            if any(_rule_allows(rule, request) for rule in rules):
                return True
        return False

    def check(self, request: Attributes, prefix: str = "") -> None:
        """403 Forbidden, worded as the API server words it, unless ``request`` is allowed."""
        if self.allows(request):
            return
        target = request.resource + (f' "{request.name}"' if request.name else "")
        message = f"{target} is forbidden: {prefix}{request.describe()}"
        raise kmock.KubernetesError(
            status=403,
            reason="Forbidden",
            message=message,
            details={"name": request.name or "", "kind": request.resource},
        )


def owner_reference_checks(
    user: str,
    old: Mapping[str, Any] | None,
    new: Mapping[str, Any],
    resource: kmock.resource,
    owner_resources: Mapping[tuple[str, str], tuple[str, str]],
) -> list[tuple[Attributes, str]]:
    """What OwnerReferencesPermissionEnforcement asks of a create or an update: a
    list of (permission, message prefix). ``owner_resources`` maps (apiVersion,
    kind) of an owner to (API group, plural)."""
    meta, old_meta = new.get("metadata") or {}, (old or {}).get("metadata") or {}
    refs = list(meta.get("ownerReferences") or [])
    old_refs = list(old_meta.get("ownerReferences") or [])
    if refs == old_refs:
        return []
    namespace = meta.get("namespace")
    name = meta.get("name")
    checks: list[tuple[Attributes, str]] = []
    if old is not None:
        delete = Attributes(user, "delete", resource.group or "", resource.plural or "", None)
        checks.append((attrs.evolve(delete, namespace=namespace, name=name), ""))
    blocking_before = {
        (r.get("apiVersion"), r.get("kind"), r.get("name"), r.get("uid"))
        for r in old_refs
        if r.get("blockOwnerDeletion")
    }
    for ref in refs:
        key = (ref.get("apiVersion"), ref.get("kind"), ref.get("name"), ref.get("uid"))
        if not ref.get("blockOwnerDeletion") or key in blocking_before:
            continue
        group, plural = owner_resources.get(
            (str(ref.get("apiVersion")), str(ref.get("kind"))), ("", "")
        )
        prefix = (
            "cannot set blockOwnerDeletion if an ownerReference refers to a resource "
            "you can't set finalizers on: "
        )
        finalizers = Attributes(
            user, "update", group, plural, "finalizers", namespace, str(ref.get("name"))
        )
        checks.append((finalizers, prefix))
    return checks


# -- the chart's RBAC ---------------------------------------------------------------


def chart_rbac_documents(
    namespace: str = OPERATOR_SA[0], values: Mapping[str, Any] | None = None
) -> list[dict[str, Any]]:
    """The RBAC objects (and ServiceAccount) of the chart, rendered in release
    ``apipool`` and ``namespace`` with a `helm` binary if there is one, else with
    the helm_python library."""
    import shutil
    import subprocess
    import tempfile

    values = dict(values or {"operator": {"watchNamespaces": ["default"]}})
    if binary := shutil.which("helm"):
        with tempfile.NamedTemporaryFile("w", suffix=".yaml") as file:
            yaml.safe_dump(values, file)
            file.flush()
            out = subprocess.run(
                [binary, "template", "apipool", str(CHART), "-n", namespace, "-f", file.name],
                capture_output=True,
                text=True,
                check=True,
                timeout=120,
            ).stdout
        texts = [out]
    else:
        import helm_python

        with helm_python.Chart.load(str(CHART)) as chart:
            rendered = chart.render(values, name="apipool", namespace=namespace)
            texts = [text for source, text in rendered.items() if source.endswith(".yaml")]
    kinds = {"Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding", "ServiceAccount"}
    docs = [doc for text in texts for doc in yaml.safe_load_all(text) if doc]
    return [doc for doc in docs if isinstance(doc, dict) and doc.get("kind") in kinds]


def chart_service_account(docs: Iterable[Mapping[str, Any]]) -> tuple[str, str]:
    """(namespace, name) of the ServiceAccount the chart's bindings name."""
    for doc in docs:
        if doc.get("kind") in ("RoleBinding", "ClusterRoleBinding"):
            for subject in doc.get("subjects") or []:
                if subject.get("kind") == "ServiceAccount":
                    return str(subject["namespace"]), str(subject["name"])
    raise LookupError("the chart binds no ServiceAccount")
