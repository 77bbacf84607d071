"""A Kubernetes API emulator for the operator tests: kmock's emulator plus what
kopf and the operator rely on.

Plain ``kmock.KubernetesEmulator`` (0.8) stores objects as plain JSON and
merges patches. :class:`Emulator` keeps that store (``emulator.objects``) and
adds what an API server does and the operator's behaviour depends on:

- ``metadata.uid``, ``creationTimestamp``, ``generation`` and a
  ``resourceVersion`` that moves on every change (lists carry the current one;
  a watch started from a version replays the changes after it, as a real
  watch does, instead of the whole store);
- JSON-patch (a failed ``test`` op, e.g. kopf's check of the resourceVersion,
  answers 422), RFC 7386 merge-patch (strategic merge is taken as a merge), a
  stale ``metadata.resourceVersion`` in a merge-patch answers 409, and no-op
  patches change nothing and send no event;
- ``metadata.namespace`` from the URL, ``generateName``;
- ``labelSelector`` (``k=v``, ``k==v``, ``k!=v``, ``k``, ``!k``, ``k in (a,b)``,
  ``k notin (a,b)``) and ``fieldSelector`` (``path=v``, ``path!=v``) on lists
  and watches;
- ``generation`` bumped when ``spec`` changes;
- the ``status`` subresource: a PATCH of ``.../status`` changes only the
  status, a PATCH of the object itself never changes it, and a create drops it;
- the ``scale`` subresource of custom resources (``kubectl scale``), mapped
  onto the paths given in :attr:`Emulator.scale_paths`;
- graceful deletion of pods: a DELETE sets ``deletionTimestamp`` (the pod is
  Terminating) and the pod goes away after ``pod_grace`` seconds, or, with
  ``pod_grace=None``, only when the test calls :meth:`Emulator.finish_deletion`
  (``pod_grace=0`` or ``gracePeriodSeconds: 0`` removes it at once); other
  kinds go at once unless they have finalizers;
- garbage collection of dependents (``ownerReferences`` by uid) when their
  owner is removed;
- a stand-in kubelet: a new pod becomes Running and Ready ``auto_ready``
  seconds after its creation (``None``: it stays Pending until the test calls
  :meth:`Emulator.set_pod_status`).

As strict as an API server where the operator's correctness depends on it
(see tests/operator/README.md for what it still does not do):

- custom resources are defaulted, pruned and validated with the CRD's
  structural schema, read from crds/ (:mod:`.emulator_schema`), on create,
  patch, ``/status`` and ``/scale`` alike (422 Invalid);
- built-in kinds are validated against the strict Kubernetes OpenAPI schemas of
  kubernetes-validate (422 Invalid; ``validate_builtins=False`` turns it off);
- with :attr:`Emulator.rbac`, bearer tokens name users and RBAC rules decide
  (401, 403), and the OwnerReferencesPermissionEnforcement rule holds
  (:mod:`.emulator_rbac`); a request without a token is the admin;
- refusals registered in :attr:`Emulator.refusals` act as validating admission
  (:mod:`.emulator_admission`);
- ``?dryRun=All`` runs all of the above and stores nothing.

Every committed change calls the functions in :attr:`Emulator.observers` (under
the store's lock), so a test can check an invariant at every moment of the
store, not only at the moments it happens to look.

The emulator runs on its own event loop; :class:`EmulatorThread` runs it in a
thread behind a real HTTP port and offers blocking helpers to the tests.
"""

from __future__ import annotations

import asyncio
import copy
import datetime
import json
import re
import secrets
import string
import uuid
import warnings
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Mapping
from typing import Any, TypeVar

import aiohttp.web
import attrs
import jsonpatch
import jsonpointer
import kmock

from apipool.testing.loop_thread import LoopThread

from .emulator_admission import Refusal, admit
from .emulator_rbac import ADMIN, Attributes, Rbac, owner_reference_checks, request_verb
from .emulator_schema import StructuralSchema, crd_schemas, validate_builtin

T = TypeVar("T")
Key = tuple[kmock.resource, str | None, str]

PODS = kmock.resource("", "v1", "pods")
EVENTS = kmock.resource("", "v1", "events")
SECRETS = kmock.resource("", "v1", "secrets")
NAMESPACES = kmock.resource("", "v1", "namespaces")
POOLS = kmock.resource("apipool.dev", "v1alpha1", "apiconcurrencypools")

POOL_INFO = kmock.ResourceInfo(
    kind="ApiConcurrencyPool",
    singular="apiconcurrencypool",
    namespaced=True,
    shortnames={"acp"},
    subresources={"status", "scale"},
    verbs={"create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"},
)
MUTATING = {kmock.action.CREATE, kmock.action.UPDATE, kmock.action.DELETE}
# What a PATCH can never change (the API server owns these).
SERVER_FIELDS = (
    "uid",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "generation",
    "name",
    "namespace",
)
LOG_LIMIT = 20_000  # watch events kept for watches that resume from a version
GONE = {
    "type": "ERROR",
    "object": {
        "apiVersion": "v1",
        "kind": "Status",
        "status": "Failure",
        "reason": "Expired",
        "code": 410,
        "message": "too old resource version",
    },
}


def now_text(after: float = 0.0) -> str:
    """The time (``after`` seconds from now) as the API writes it."""
    moment = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=after)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386: dicts merge recursively, ``null`` removes a key, the rest replaces."""
    if not isinstance(patch, Mapping):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, Mapping) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


JSON_PATCH = "application/json-patch+json"
MERGE_PATCHES = ("application/merge-patch+json", "application/strategic-merge-patch+json")


def apply_patch(request: kmock.Request, doc: Mapping[str, Any]) -> dict[str, Any]:
    """Apply the request's patch as its Content-Type says (strategic merge is taken
    as a plain merge); a failed JSON-patch op, e.g. a ``test``, answers 422."""
    headers = {k.lower(): v for k, v in request.headers.items()}
    kind = headers.get("content-type", "").split(";")[0].strip().lower()
    patch = request.data
    if kind == JSON_PATCH:
        if not isinstance(patch, list):
            raise _error(400, "BadRequest", "a JSON-patch is a list of operations")
        try:
            result = jsonpatch.apply_patch(copy.deepcopy(dict(doc)), patch, in_place=False)
        except (jsonpatch.JsonPatchException, jsonpointer.JsonPointerException) as exc:
            raise _error(422, "Invalid", f"the JSON-patch cannot be applied: {exc}") from None
    elif kind in MERGE_PATCHES:
        if not isinstance(patch, Mapping):
            raise _error(400, "BadRequest", "a merge-patch is a JSON object")
        result = merge_patch(doc, patch)
    else:
        raise _error(415, "UnsupportedMediaType", f"the patch type {kind!r} is not supported")
    if not isinstance(result, dict):
        raise _error(422, "Invalid", "the patch does not leave an object")
    return result


def is_dry_run(request: kmock.Request) -> bool:
    """``?dryRun=All``: the request is validated and admitted, and nothing is stored."""
    value = request.params.get("dryRun")
    if value is None:
        return False
    if value != "All":
        raise _error(400, "BadRequest", f"unsupported dryRun value {value!r}; only All")
    return True


def _error(status: int, reason: str, message: str) -> kmock.KubernetesError:
    return kmock.KubernetesError(status=status, reason=reason, message=message, details={})


def status_body(exc: kmock.KubernetesError) -> dict[str, Any]:
    """The ``Status`` object of an error, as the API server sends it."""
    return {
        "apiVersion": "v1",
        "kind": "Status",
        "metadata": {},
        "status": "Failure",
        "message": exc.message,
        "reason": exc.reason,
        "details": exc.details,
        "code": exc.status,
    }


def _get_path(doc: Mapping[str, Any], path: str) -> Any:
    value: Any = doc
    for part in path.strip(".").split("."):
        if not isinstance(value, Mapping):
            return None
        value = value.get(part)
    return value


def _set_path(doc: dict[str, Any], path: str, value: Any) -> None:
    parts = path.strip(".").split(".")
    node = doc
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


# -- selectors ---------------------------------------------------------------------

_NAME = r"[A-Za-z0-9][-A-Za-z0-9_./]*"
_REQUIREMENT = re.compile(
    rf"""^\s*(?:
        !\s*(?P<absent>{_NAME})
      | (?P<set_key>{_NAME})\s+(?P<set_op>in|notin)\s*\((?P<values>[^)]*)\)
      | (?P<key>{_NAME})\s*(?P<op>==|=|!=)\s*(?P<value>[-A-Za-z0-9_.]*)
      | (?P<present>{_NAME})
    )\s*$""",
    re.X,
)

Matcher = Callable[[Mapping[str, str]], bool]


def parse_label_selector(text: str) -> list[Matcher]:
    """The requirements of a label selector, each a predicate on a label dict."""
    matchers: list[Matcher] = []
    for part in re.findall(r"(?:[^,(]|\([^)]*\))+", text or ""):
        if not part.strip():
            continue
        m = _REQUIREMENT.match(part)
        if m is None:
            raise _error(400, "BadRequest", f"unable to parse requirement: {part!r}")
        if m["absent"]:
            key = m["absent"]
            matchers.append(lambda labels, key=key: key not in labels)
        elif m["set_key"]:
            key, values = m["set_key"], {v.strip() for v in m["values"].split(",") if v.strip()}
            if m["set_op"] == "in":
                matchers.append(lambda labels, k=key, vs=values: labels.get(k) in vs)
            else:
                matchers.append(lambda labels, k=key, vs=values: labels.get(k) not in vs)
        elif m["key"]:
            key, value = m["key"], m["value"]
            if m["op"] == "!=":
                matchers.append(lambda labels, k=key, v=value: labels.get(k) != v)
            else:
                matchers.append(lambda labels, k=key, v=value: labels.get(k) == v)
        else:
            key = m["present"]
            matchers.append(lambda labels, key=key: key in labels)
    return matchers


def parse_field_selector(text: str) -> list[Callable[[Mapping[str, Any]], bool]]:
    matchers: list[Callable[[Mapping[str, Any]], bool]] = []
    for part in (text or "").split(","):
        if not part.strip():
            continue
        m = re.match(r"^\s*([\w.]+)\s*(==|=|!=)\s*(.*?)\s*$", part)
        if m is None:
            raise _error(400, "BadRequest", f"invalid field selector: {part!r}")
        path, op, value = m.groups()
        if op == "!=":
            matchers.append(lambda obj, p=path, v=value: str(_get_path(obj, p) or "") != v)
        else:
            matchers.append(lambda obj, p=path, v=value: str(_get_path(obj, p) or "") == v)
    return matchers


# -- the emulator ------------------------------------------------------------------


@attrs.define(kw_only=True)
class Emulator(kmock.KubernetesEmulator):
    pod_grace: float | None = 0.0
    """Seconds a deleted pod stays Terminating; None: until finish_deletion()."""
    auto_ready: float | None = 0.0
    """Seconds until a new pod is Running and Ready; None: never by itself."""
    node_runs_pods: bool = False
    """A node (``apipool.testing.node``) runs the pods, as on a cluster: a pod
    is bound to it (``pods/binding``), the node writes its status, and a
    graceful delete keeps a bound pod Terminating (its ``deletionGracePeriodSeconds``
    the request's or the pod's ``terminationGracePeriodSeconds``) until the node
    has killed its containers and deletes it with grace 0; an unbound pod goes at
    once. ``pod_grace`` and ``auto_ready`` do not apply."""
    scale_paths: dict[kmock.resource, tuple[str, str, str]] = attrs.field(
        factory=lambda: {POOLS: (".spec.slots", ".status.readySlots", ".status.selector")}
    )
    """specReplicasPath, statusReplicasPath, labelSelectorPath of a scale subresource."""
    observers: list[Callable[[Emulator], None]] = attrs.field(factory=list)
    """Called after every committed change, with the store locked."""
    schemas: dict[kmock.resource, StructuralSchema] = attrs.field(factory=crd_schemas)
    """The structural schemas of the custom resources (from crds/), applied on writes."""
    validate_builtins: bool = True
    """Validate built-in kinds (pods, ...) against the Kubernetes OpenAPI schemas."""
    rbac: Rbac | None = None
    """Authentication and RBAC; None: every request is the admin's."""
    refusals: list[Refusal] = attrs.field(factory=list)
    """Admission refusals registered by the test (see emulator_admission)."""

    _version: int = attrs.field(default=0, init=False)
    _log: list[tuple[int, kmock.resource, dict[str, Any]]] = attrs.field(factory=list, init=False)
    _log_floor: int = attrs.field(default=0, init=False)  # the newest version trimmed off
    _answers: dict[int, dict[str, Any]] = attrs.field(factory=dict, init=False)
    _in_grace: set[Key] = attrs.field(factory=set, init=False)
    _tasks: set[asyncio.Task[None]] = attrs.field(factory=set, init=False)
    observer_errors: list[BaseException] = attrs.field(factory=list, init=False)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        with warnings.catch_warnings():  # kmock 0.8 reads its bundle with a deprecated call
            warnings.simplefilter("ignore", DeprecationWarning)
            self.resources.load_bundled()
        self.resources[POOLS] = POOL_INFO
        self.objects[NAMESPACES, None, "default"] = {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {
                "name": "default",
                "uid": str(uuid.uuid4()),
                "resourceVersion": "0",
                "creationTimestamp": now_text(),
            },
            "status": {"phase": "Active"},
        }

    # -- reading the store (call with the lock held or from the emulator's loop) --

    def current(self, resource: kmock.resource, namespace: str | None, name: str) -> Any:
        key = (resource, namespace, name)
        if key not in self.objects or self.objects[key].deleted:
            return None
        return self.objects[key].raw

    def live(self, resource: kmock.resource) -> Iterator[tuple[Key, dict[str, Any]]]:
        for key, obj in list(self.objects.items()):
            if key[0] == resource and not obj.deleted:
                yield key, obj.raw

    def _info(self, resource: kmock.resource) -> kmock.ResourceInfo:
        if resource not in self.resources:
            raise kmock.KubernetesResourceNotFoundError()
        return self.resources[resource]

    # -- committing changes --------------------------------------------------------

    def _next_version(self) -> str:
        self._version += 1
        return str(self._version)

    async def _publish(self, resource: kmock.resource, kind: str, obj: dict[str, Any]) -> None:
        event = {"type": kind, "object": obj}
        self._log.append((int(obj["metadata"]["resourceVersion"]), resource, event))
        if len(self._log) > LOG_LIMIT:
            self._log_floor = self._log[-LOG_LIMIT - 1][0]
            del self._log[:-LOG_LIMIT]
        await self._buses[resource].put(event)
        for observer in list(self.observers):
            try:
                observer(self)
            except BaseException as exc:  # reported to the test, never to the client
                self.observer_errors.append(exc)

    async def _store(self, key: Key, new: dict[str, Any], kind: str) -> dict[str, Any]:
        new = copy.deepcopy(new)
        new.setdefault("metadata", {})["resourceVersion"] = self._next_version()
        if key in self.objects:
            self.objects[key].history.append(new)
        else:
            self.objects[key] = new
        await self._publish(key[0], kind, copy.deepcopy(new))
        return new

    async def _remove(self, key: Key) -> dict[str, Any]:
        last = copy.deepcopy(self.objects[key].raw)
        last["metadata"]["resourceVersion"] = self._next_version()
        self.objects[key].history[-1] = last
        self.objects[key].delete()
        self._in_grace.discard(key)
        await self._publish(key[0], "DELETED", copy.deepcopy(last))
        uid = last["metadata"].get("uid")
        if uid:
            await self._collect_dependents(uid)
        return last

    async def _collect_dependents(self, owner_uid: str) -> None:
        """Background propagation: dependents of a removed owner are deleted."""
        for key, obj in list(self.live_all()):
            refs = obj.get("metadata", {}).get("ownerReferences") or []
            if any(ref.get("uid") == owner_uid for ref in refs):
                await self._delete(key, grace=None)

    def live_all(self) -> Iterator[tuple[Key, dict[str, Any]]]:
        for key, obj in list(self.objects.items()):
            if not obj.deleted:
                yield key, obj.raw

    async def _settle(self, key: Key) -> dict[str, Any] | None:
        """Remove an object whose deletion is no longer held back; None if removed."""
        obj = self.current(*key)
        if obj is None:
            return None
        meta = obj.get("metadata", {})
        if (
            meta.get("deletionTimestamp")
            and not meta.get("finalizers")
            and key not in self._in_grace
        ):
            await self._remove(key)
            return None
        return obj

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _later(self, delay: float, fn: Callable[[], Coroutine[Any, Any, None]]) -> None:
        await asyncio.sleep(delay)
        async with self._lock:
            await fn()

    # -- create / patch / delete -------------------------------------------------------

    async def _create(
        self, request: kmock.Request, *, user: str = ADMIN, admission: bool = True
    ) -> dict[str, Any]:
        resource = request.resource
        assert resource is not None
        info = self._info(resource)
        body = request.data
        if not isinstance(body, Mapping):
            raise _error(400, "BadRequest", "the body of a create must be an object")
        obj = copy.deepcopy(dict(body))
        meta = obj.setdefault("metadata", {})
        namespace = request.namespace or meta.get("namespace")
        if info.namespaced:
            if not namespace:
                raise _error(400, "BadRequest", "a namespaced object needs a namespace")
            if meta.get("namespace") not in (None, namespace):
                raise _error(400, "BadRequest", "the namespace of the object and the URL differ")
            meta["namespace"] = namespace
        else:
            namespace = None
            meta.pop("namespace", None)
        if not meta.get("name"):
            if not meta.get("generateName"):
                raise _error(422, "Invalid", "metadata.name or metadata.generateName is required")
            alphabet = string.ascii_lowercase + string.digits
            for _ in range(100):
                suffix = "".join(secrets.choice(alphabet) for _ in range(5))
                if self.current(resource, namespace, meta["generateName"] + suffix) is None:
                    break
            meta["name"] = meta["generateName"] + suffix
        key: Key = (resource, namespace, meta["name"])
        if self.current(*key) is not None:
            raise _error(409, "AlreadyExists", f"{resource.plural} {meta['name']!r} already exists")
        for field in ("deletionTimestamp", "deletionGracePeriodSeconds", "resourceVersion"):
            meta.pop(field, None)
        if "status" in info.subresources:
            obj.pop("status", None)
        if admission:
            obj = self.admit(resource, None, obj, "create", user)
            meta = obj["metadata"]
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = now_text()
        meta["generation"] = 1
        if resource == PODS:
            obj["status"] = {"phase": "Pending"}
        if is_dry_run(request):
            return obj  # validated and admitted, never stored
        stored = await self._store(key, obj, "ADDED")
        if resource == PODS and self.auto_ready is not None and not self.node_runs_pods:
            uid = meta["uid"]

            async def kubelet() -> None:
                await self._pod_status(key, uid, phase="Running", ready=True)

            self._spawn(self._later(self.auto_ready, kubelet))
        return stored

    def admit(
        self,
        resource: kmock.resource,
        old: dict[str, Any] | None,
        new: dict[str, Any],
        verb: str,
        user: str = ADMIN,
    ) -> dict[str, Any]:
        """What the API server does between authorization and storage: the
        ownerReferences admission, the schema (defaults, pruning, validation) and the
        refusals the test registered. Returns the object as it would be stored."""
        if self.rbac is not None and user != ADMIN:
            owners = {
                (
                    "/".join(p for p in (res.group, res.version) if p),
                    str(res_info.kind),
                ): (res.group or "", res.plural or "")
                for res, res_info in self.resources.items()
                if res_info.kind
            }
            for check, prefix in owner_reference_checks(user, old, new, resource, owners):
                self.rbac.check(check, prefix)
        if resource in self.schemas:
            new = self.schemas[resource].admit(new, old)
        elif self.validate_builtins:
            validate_builtin(resource, self._info(resource).kind or "", new)
        admit(self.refusals, verb, resource, new)
        return new

    async def _patch(self, request: kmock.Request, *, user: str = ADMIN) -> dict[str, Any]:
        resource, name = request.resource, request.name
        assert resource is not None
        assert name is not None
        info = self._info(resource)
        key: Key = (resource, request.namespace, name)
        old = self.current(*key)
        if old is None:
            raise _error(404, "NotFound", f"{resource.plural} {name!r} not found")
        sub = request.subresource
        if sub == "scale":
            return await self._patch_scale(key, old, request, user)
        if sub not in (None, "status"):
            raise _error(404, "NotFound", f"the subresource {sub!r} cannot be patched here")
        patch = request.data
        if isinstance(patch, Mapping):
            wanted = (patch.get("metadata") or {}).get("resourceVersion")
            if wanted is not None and str(wanted) != old["metadata"]["resourceVersion"]:
                raise _error(409, "Conflict", "the object has been modified; apply to the latest")
        patched = apply_patch(request, old)
        new: dict[str, Any]
        if sub == "status":
            new = copy.deepcopy(old)
            if "status" in patched:
                new["status"] = patched["status"]
            else:
                new.pop("status", None)
        else:
            new = patched
            new_meta = new.setdefault("metadata", {})
            for field in SERVER_FIELDS:
                if field in old["metadata"]:
                    new_meta[field] = old["metadata"][field]
                else:
                    new_meta.pop(field, None)
            if "status" in info.subresources:
                if "status" in old:
                    new["status"] = old["status"]
                else:
                    new.pop("status", None)
        new = self.admit(resource, old, new, "patch", user)
        if sub is None and new.get("spec") != old.get("spec"):
            new["metadata"]["generation"] = int(old["metadata"].get("generation") or 0) + 1
        new["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"]
        if new == old:
            return old  # a no-op: no new version, no event
        if is_dry_run(request):
            return new
        stored = await self._store(key, new, "MODIFIED")
        return await self._settle(key) or stored

    def _scale_doc(self, resource: kmock.resource, obj: Mapping[str, Any]) -> dict[str, Any]:
        spec_path, status_path, selector_path = self.scale_paths[resource]
        meta = obj["metadata"]
        return {
            "apiVersion": "autoscaling/v1",
            "kind": "Scale",
            "metadata": {
                k: meta[k]
                for k in ("name", "namespace", "uid", "resourceVersion", "creationTimestamp")
                if k in meta
            },
            "spec": {"replicas": _get_path(obj, spec_path) or 0},
            "status": {
                "replicas": _get_path(obj, status_path) or 0,
                "selector": _get_path(obj, selector_path) or "",
            },
        }

    async def _patch_scale(
        self, key: Key, old: dict[str, Any], request: kmock.Request, user: str = ADMIN
    ) -> dict[str, Any]:
        resource = key[0]
        if resource not in self.scale_paths:
            raise _error(404, "NotFound", f"{resource.plural} have no scale subresource")
        doc = apply_patch(request, self._scale_doc(resource, old))
        replicas = (doc.get("spec") or {}).get("replicas")
        if not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 0:
            raise _error(422, "Invalid", f"spec.replicas must be a whole number, not {replicas!r}")
        new = copy.deepcopy(old)
        _set_path(new, self.scale_paths[resource][0], replicas)
        new = self.admit(resource, old, new, "patch", user)
        if is_dry_run(request):
            return self._scale_doc(resource, new)
        if new != old:
            new["metadata"]["generation"] = int(old["metadata"].get("generation") or 0) + 1
            old = await self._store(key, new, "MODIFIED")
        return self._scale_doc(resource, old)

    async def _delete(self, key: Key, *, grace: float | None) -> dict[str, Any]:
        old = self.current(*key)
        if old is None:
            raise _error(404, "NotFound", f"{key[0].plural} {key[2]!r} not found")
        meta = old["metadata"]
        if meta.get("deletionTimestamp"):
            if grace == 0 and key in self._in_grace:  # a forced delete cuts the grace short
                self._in_grace.discard(key)
                return await self._settle(key) or old
            return old
        if key[0] == PODS and self.node_runs_pods:
            if grace is None:
                grace = float((old.get("spec") or {}).get("terminationGracePeriodSeconds", 30))
            if not (old.get("spec") or {}).get("nodeName"):
                grace = 0.0  # no kubelet to wait for
            if (old.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
                grace = 0.0  # nothing left running (the pod strategy's rule)
            return await self._delete_on_node(key, old, grace)
        if grace is None:
            grace = self.pod_grace if key[0] == PODS else 0.0
            if grace is None:
                grace = -1.0  # held until finish_deletion()
        if grace == 0 and not meta.get("finalizers"):
            return await self._remove(key)
        new = copy.deepcopy(old)
        # A pod's deletionTimestamp is when it should be gone: now + its grace.
        after = max(0.0, grace) if key[0] == PODS else 0.0
        new["metadata"]["deletionTimestamp"] = now_text(after)
        if key[0] == PODS and grace != 0:
            self._in_grace.add(key)
            new["metadata"]["deletionGracePeriodSeconds"] = max(0, int(grace))
            if grace > 0:
                uid = meta.get("uid")

                async def end_of_grace() -> None:
                    await self._finish(key, uid)

                self._spawn(self._later(grace, end_of_grace))
        stored = await self._store(key, new, "MODIFIED")
        return await self._settle(key) or stored

    async def _delete_on_node(self, key: Key, old: dict[str, Any], grace: float) -> dict[str, Any]:
        """A pod's deletion when a node runs it: Terminating until the node deletes
        it with grace 0 (or someone forces it). A deletion with grace 0 takes the
        API server's two steps: the object is marked (``deletionGracePeriodSeconds``
        0: a kubelet that still runs it kills with its minimum grace), then removed."""
        if grace == 0 and not old["metadata"].get("finalizers"):
            marked = copy.deepcopy(old)
            marked["metadata"]["deletionTimestamp"] = now_text()
            marked["metadata"]["deletionGracePeriodSeconds"] = 0
            await self._store(key, marked, "MODIFIED")
            return await self._remove(key)
        new = copy.deepcopy(old)
        new["metadata"]["deletionTimestamp"] = now_text(grace)
        new["metadata"]["deletionGracePeriodSeconds"] = max(0, int(grace))
        if grace != 0:
            self._in_grace.add(key)  # until the kubelet confirms; finalizers aside
        stored = await self._store(key, new, "MODIFIED")
        return await self._settle(key) or stored

    async def _bind(self, request: kmock.Request) -> dict[str, Any]:
        """``POST pods/<name>/binding``: assign the pod to a node, once."""
        assert request.resource is not None
        assert request.name is not None
        key: Key = (request.resource, request.namespace, request.name)
        old = self.current(*key)
        if old is None:
            raise _error(404, "NotFound", f'pods "{request.name}" not found')
        body = request.data if isinstance(request.data, Mapping) else {}
        node = (body.get("target") or {}).get("name")
        if not node:
            raise _error(400, "BadRequest", "a Binding needs target.name")
        if (old.get("spec") or {}).get("nodeName"):
            raise _error(
                409,
                "Conflict",
                f'Operation cannot be fulfilled on pods/binding "{request.name}": '
                f"pod {request.name} is already assigned to node "
                f'"{old["spec"]["nodeName"]}"',
            )
        if old["metadata"].get("deletionTimestamp"):
            raise _error(
                409, "Conflict", f"pod {request.name} is being deleted, cannot be assigned"
            )
        new = copy.deepcopy(old)
        new["spec"]["nodeName"] = node
        status = new.setdefault("status", {})
        conditions = [c for c in status.get("conditions") or [] if c.get("type") != "PodScheduled"]
        conditions.append(
            {"type": "PodScheduled", "status": "True", "lastTransitionTime": now_text()}
        )
        status["conditions"] = conditions
        await self._store(key, new, "MODIFIED")
        return {"apiVersion": "v1", "kind": "Status", "status": "Success", "code": 201}

    async def _finish(self, key: Key, uid: str | None = None) -> bool:
        obj = self.current(*key)
        if obj is None or (uid is not None and obj["metadata"].get("uid") != uid):
            return False
        if not obj["metadata"].get("deletionTimestamp"):
            return False
        self._in_grace.discard(key)
        return await self._settle(key) is None

    async def _pod_status(
        self,
        key: Key,
        uid: str | None,
        *,
        phase: str | None = None,
        ready: bool | None = None,
    ) -> dict[str, Any] | None:
        obj = self.current(*key)
        if obj is None or (uid is not None and obj["metadata"].get("uid") != uid):
            return None
        if obj["metadata"].get("deletionTimestamp") and ready:
            return obj  # a terminating pod does not become ready
        new = copy.deepcopy(obj)
        status = new.setdefault("status", {})
        if phase is not None:
            status["phase"] = phase
        if ready is not None:
            conditions = [c for c in status.get("conditions") or [] if c.get("type") != "Ready"]
            conditions.append(
                {
                    "type": "Ready",
                    "status": "True" if ready else "False",
                    "lastTransitionTime": now_text(),
                }
            )
            status["conditions"] = conditions
        if new == obj:
            return obj
        return await self._store(key, new, "MODIFIED")

    # -- serving -------------------------------------------------------------------------

    async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        # kmock 0.8 cannot parse the URL of the namespace list (kopf lists and watches it).
        if raw_request.method == "GET" and raw_request.path.rstrip("/") == "/api/v1/namespaces":
            try:
                self.authorize(
                    kmock.Request(
                        method=raw_request.method,
                        params=dict(raw_request.query),
                        headers=dict(raw_request.headers),
                        resource=NAMESPACES,
                    )
                )
            except kmock.KubernetesError as exc:
                return aiohttp.web.json_response(status_body(exc), status=exc.status or 500)
            return await self._serve_namespaces(raw_request)
        return await super().__call__(raw_request)

    async def _serve_namespaces(self, raw_request: aiohttp.web.BaseRequest) -> Any:
        async with self._lock:
            items = [copy.deepcopy(obj) for _, obj in self.live(NAMESPACES)]
            version = str(self._version)
        if raw_request.query.get("watch") != "true":
            return aiohttp.web.json_response(
                {
                    "apiVersion": "v1",
                    "kind": "NamespaceList",
                    "metadata": {"resourceVersion": version},
                    "items": items,
                }
            )
        response = aiohttp.web.StreamResponse()
        await response.prepare(raw_request)
        if not raw_request.query.get("resourceVersion", "").isdigit():
            for item in items:
                await response.write(json.dumps({"type": "ADDED", "object": item}).encode() + b"\n")
        async for event in self._buses[NAMESPACES]:  # nothing creates namespaces: wait
            await response.write(json.dumps(event).encode() + b"\n")
        return response

    def authorize(self, request: kmock.Request) -> str:
        """The user of the request (401 for an unknown token); 403 unless RBAC allows
        what it asks. Requests outside any resource (discovery) are allowed."""
        if self.rbac is None:
            return ADMIN
        headers = {k.lower(): v for k, v in request.headers.items()}
        user = self.rbac.user_of(headers.get("authorization"))
        if request.resource is not None and request.resource.plural:  # else discovery
            self.rbac.check(
                Attributes(
                    user,
                    request_verb(request),
                    request.resource.group or "",
                    request.resource.plural or "",
                    request.subresource,
                    request.namespace,
                    request.name,
                )
            )
        return user

    async def _handle(self, request: kmock.Request) -> Any:
        user = self.authorize(request)
        if (
            request.resource == PODS
            and request.name is not None
            and request.subresource == "binding"
            and str(request.method).upper().endswith("POST")
        ):
            async with self._lock:
                bound = await self._bind(request)
            return await kmock.Response(status=201, payload=bound)(request)
        if request.resource is not None and request.action in MUTATING:
            async with self._lock:
                if request.action == kmock.action.CREATE:
                    answer = await self._create(request, user=user)
                elif request.action == kmock.action.UPDATE:
                    answer = await self._patch(request, user=user)
                else:
                    assert request.name is not None
                    options = request.data if isinstance(request.data, Mapping) else {}
                    grace = options.get("gracePeriodSeconds")
                    if grace is None:  # DeleteOptions may come as query parameters too
                        grace = request.params.get("gracePeriodSeconds")
                    key: Key = (request.resource, request.namespace, request.name)
                    self._check_preconditions(key, options)
                    if is_dry_run(request):
                        answer = self.current(*key)
                        if answer is None:
                            raise _error(404, "NotFound", f"{key[0].plural} {key[2]!r} not found")
                    else:
                        grace_s = None if grace is None else float(grace)
                        answer = await self._delete(key, grace=grace_s)
            self._answers[request.id] = answer
        # Serve through kmock's reactions and fallbacks, skipping the parent's own bookkeeping.
        return await super(kmock.KubernetesEmulator, self)._handle(request)

    def _check_preconditions(self, key: Key, options: Mapping[str, Any]) -> None:
        """DeleteOptions.preconditions: a UID or resourceVersion that no longer
        matches answers 409 Conflict (the object is someone else now)."""
        wanted = options.get("preconditions") or {}
        current = self.current(*key)
        if current is None or not wanted:
            return
        meta = current["metadata"]
        for field in ("uid", "resourceVersion"):
            if wanted.get(field) not in (None, meta.get(field)):
                raise _error(
                    409,
                    "Conflict",
                    f'Operation cannot be fulfilled on {key[0].plural} "{key[2]}": '
                    f"Precondition failed: {field} in precondition: {wanted[field]}, "
                    f"{field} in object meta: {meta.get(field)}",
                )

    def _take_answer(self, request: kmock.Request) -> dict[str, Any]:
        return self._answers.pop(request.id)

    async def _serve_create(self, request: kmock.Request) -> kmock.Payload:
        return kmock.Response(status=201, payload=self._take_answer(request))

    async def _serve_update(self, request: kmock.Request) -> kmock.Payload:
        return self._take_answer(request)

    async def _serve_delete(self, request: kmock.Request) -> kmock.Payload:
        return self._take_answer(request)

    async def _serve_fetch(self, request: kmock.Request) -> kmock.Payload:
        assert request.resource is not None
        assert request.name is not None
        self._info(request.resource)
        async with self._lock:
            obj = self.current(request.resource, request.namespace, request.name)
        if obj is None:
            raise _error(404, "NotFound", f"{request.resource.plural} {request.name!r} not found")
        if request.subresource == "scale":
            if request.resource not in self.scale_paths:
                raise _error(404, "NotFound", f"{request.resource.plural} have no scale")
            return self._scale_doc(request.resource, obj)
        return obj

    def _selects(self, request: kmock.Request) -> Callable[[Mapping[str, Any]], bool]:
        labels = parse_label_selector(request.params.get("labelSelector", ""))
        fields = parse_field_selector(request.params.get("fieldSelector", ""))

        def selects(obj: Mapping[str, Any]) -> bool:
            meta = obj.get("metadata") or {}
            if request.namespace is not None and meta.get("namespace") != request.namespace:
                return False
            if request.name is not None and meta.get("name") != request.name:
                return False
            obj_labels = meta.get("labels") or {}
            return all(m(obj_labels) for m in labels) and all(m(obj) for m in fields)

        return selects

    async def _serve_list(self, request: kmock.Request) -> kmock.Payload:
        assert request.resource is not None
        info = self._info(request.resource)
        selects = self._selects(request)
        async with self._lock:
            items = [copy.deepcopy(obj) for _, obj in self.live(request.resource) if selects(obj)]
            version = str(self._version)
        kind = info.kind or (request.resource.plural or "").capitalize()
        group_version = "/".join(p for p in (request.resource.group, request.resource.version) if p)
        return {
            "apiVersion": group_version,
            "kind": f"{kind}List",
            "metadata": {"resourceVersion": version},
            "items": items,
        }

    async def _serve_watch(self, request: kmock.Request) -> AsyncIterator[kmock.Payload]:
        yield b""  # send the headers at once
        assert request.resource is not None
        resource = request.resource
        self._info(resource)
        selects = self._selects(request)
        since = request.params.get("resourceVersion", "")
        bus = self._buses[resource]
        async with self._lock:
            mark = await bus.mark()  # under the lock: no change slips between replay and stream
            if since.isdigit() and 0 < int(since) < self._log_floor:
                first = [GONE]  # too old to resume from: the client lists again
            elif since.isdigit() and int(since) > 0:
                first = [ev for v, res, ev in self._log if res == resource and v > int(since)]
            else:
                first = [{"type": "ADDED", "object": obj} for _, obj in self.live(resource)]
            first = copy.deepcopy(first)
        try:
            for event in first:
                if event["type"] == "ERROR":
                    yield event
                    return
                if selects(event["object"]):
                    yield event
            async for event in bus.stream(since=mark):
                if selects(event["object"]):
                    yield event
        finally:
            await bus.unmark(mark)

    # -- helpers for the tests (coroutines on the emulator's loop) -----------------------

    async def finish_deletion(self, namespace: str, name: str) -> bool:
        """End a Terminating pod's grace: it is removed (True) unless finalizers hold it."""
        async with self._lock:
            return await self._finish((PODS, namespace, name))

    async def set_pod_status(
        self, namespace: str, name: str, *, phase: str | None = None, ready: bool | None = None
    ) -> dict[str, Any] | None:
        """What the kubelet would write: the pod's phase and Ready condition."""
        async with self._lock:
            return await self._pod_status((PODS, namespace, name), None, phase=phase, ready=ready)

    async def put_object(
        self, resource: kmock.resource, obj: Mapping[str, Any], *, admission: bool = True
    ) -> dict[str, Any]:
        """Create an object as the admin would (uid, version, ADDED event);
        ``admission=False`` stores it without schema or admission (as if written by an
        older API server, or straight into etcd)."""
        namespace = (obj.get("metadata") or {}).get("namespace")
        request = kmock.Request(resource=resource, namespace=namespace, data=dict(obj))
        async with self._lock:
            return await self._create(request, admission=admission)

    async def force_merge(
        self, resource: kmock.resource, namespace: str | None, name: str, patch: Mapping[str, Any]
    ) -> dict[str, Any]:
        """Merge ``patch`` into a stored object past schema and admission (a MODIFIED
        event; generation bumped when the spec changes): an object the API would
        refuse today, e.g. one stored before its CRD got stricter."""
        async with self._lock:
            key: Key = (resource, namespace, name)
            old = self.current(*key)
            if old is None:
                raise KeyError(key)
            new = merge_patch(old, patch)
            if new.get("spec") != old.get("spec"):
                new["metadata"]["generation"] = int(old["metadata"].get("generation") or 0) + 1
            return await self._store(key, new, "MODIFIED")

    async def vanish(self, resource: kmock.resource, namespace: str | None, name: str) -> bool:
        """Remove an object from the store without any watch event (a missed event)."""
        async with self._lock:
            key: Key = (resource, namespace, name)
            if self.current(*key) is None:
                return False
            self.objects[key].delete()
            self._in_grace.discard(key)
            return True

    async def snapshot(self, resource: kmock.resource) -> list[dict[str, Any]]:
        async with self._lock:
            return [copy.deepcopy(obj) for _, obj in self.live(resource)]

    async def observe(self, observer: Callable[[Emulator], None]) -> None:
        """Add an observer and call it once on the current store."""
        async with self._lock:
            self.observers.append(observer)
            observer(self)

    async def shutdown(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


class EmulatorThread(LoopThread):
    """An :class:`Emulator` behind an HTTP server on 127.0.0.1, in its own thread and
    event loop, with blocking helpers for the tests."""

    what = "the Kubernetes emulator"

    def __init__(self, *, emulator_class: type[Emulator] | None = None, **options: Any) -> None:
        super().__init__("kube-emulator")
        self.emulator_class = emulator_class or Emulator
        """The emulator served (a subclass that counts, say)."""
        self.options = options
        self.emulator: Emulator | None = None
        self.port = 0
        self._stop: asyncio.Event | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        async with (
            self.emulator_class(**self.options) as emulator,
            kmock.Server(emulator) as server,
        ):
            self.emulator = emulator
            self.port = server.port
            self._serving()
            try:
                await self._stop.wait()
            finally:
                await emulator.shutdown()

    def _stopping(self) -> None:
        if self._stop is not None:
            self._stop.set()

    def call(self, fn: Callable[[Emulator], Coroutine[Any, Any, T]], timeout: float = 5.0) -> T:
        """Run ``fn(emulator)`` on the emulator's loop and wait for its result."""
        assert self.emulator is not None
        return self.run_on_loop(fn(self.emulator), timeout)

    # Blocking shortcuts ----------------------------------------------------------------

    def objects(self, resource: kmock.resource) -> list[dict[str, Any]]:
        return self.call(lambda e: e.snapshot(resource))

    def get(self, resource: kmock.resource, namespace: str, name: str) -> dict[str, Any] | None:
        for obj in self.objects(resource):
            meta = obj["metadata"]
            if meta.get("namespace") == namespace and meta.get("name") == name:
                return obj
        return None

    def put(
        self, resource: kmock.resource, obj: Mapping[str, Any], *, admission: bool = True
    ) -> dict[str, Any]:
        return self.call(lambda e: e.put_object(resource, obj, admission=admission))

    def force_merge(
        self,
        resource: kmock.resource,
        name: str,
        patch: Mapping[str, Any],
        namespace: str | None = "default",
    ) -> dict[str, Any]:
        return self.call(lambda e: e.force_merge(resource, namespace, name, patch))

    def refuse(self, **options: Any) -> Refusal:
        """Register a :class:`Refusal` (see emulator_admission) and return it."""
        refusal = Refusal(**options)

        async def add(e: Emulator) -> Refusal:
            e.refusals.append(refusal)
            return refusal

        return self.call(add)

    def allow(self, refusal: Refusal) -> None:
        """Withdraw a refusal."""

        async def remove(e: Emulator) -> None:
            if refusal in e.refusals:
                e.refusals.remove(refusal)

        self.call(remove)

    def finish_deletion(self, name: str, namespace: str = "default") -> bool:
        return self.call(lambda e: e.finish_deletion(namespace, name))

    def set_pod_status(
        self,
        name: str,
        *,
        phase: str | None = None,
        ready: bool | None = None,
        namespace: str = "default",
    ) -> dict[str, Any] | None:
        return self.call(lambda e: e.set_pod_status(namespace, name, phase=phase, ready=ready))

    def vanish(self, resource: kmock.resource, name: str, namespace: str = "default") -> bool:
        return self.call(lambda e: e.vanish(resource, namespace, name))

    def observe(self, observer: Callable[[Emulator], None]) -> None:
        self.call(lambda e: e.observe(observer))

    def requests(self) -> list[kmock.Request]:
        async def collect(e: Emulator) -> list[kmock.Request]:
            return list(e)

        return self.call(collect)
