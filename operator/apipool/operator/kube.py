"""The Kubernetes API calls of a reconcile, on clients made once per login.

:class:`KubeApi` is the only place the operator talks to the API server through
the ``kubernetes`` client. Every call either succeeds, reports an expected
answer (a 404 or a 409 where that is a normal outcome) as its return value, or
raises: ``kopf.TemporaryError`` for any other answer of the API, so that kopf
retries with a delay, and :class:`ApipoolError` where the pool itself is at
fault (its Secret is missing or unusable), so that the reconcile can report it.
A slot pod that cannot be created as it is (the client's own validation, or
the API server answering 400, 403 or 422: an invalid field, a missing
ServiceAccount or PriorityClass, a quota, an admission webhook) raises
:class:`PodRefused` with the reason given.
"""

from __future__ import annotations

import base64
import binascii
import json
import threading
from collections.abc import Mapping
from typing import Any, cast

import kopf
import kubernetes
from kubernetes.client.exceptions import ApiException

from ..errors import ApipoolError
from .manifests import FINALIZER, LABEL_HASH, LABEL_POOL, selector, slot_index
from .planning import ObservedPod
from .spec import GROUP, PLURAL, VERSION, PoolSpec

API_RETRY_DELAY = 5.0
"""Seconds kopf waits before it retries a handler after an API error."""
REFUSED = frozenset({400, 403, 422})
"""Answers to a pod create that a retry of the same request cannot change."""


class PodRefused(ApipoolError):
    """A slot pod cannot be created as it is; the message says why."""


def api_message(exc: ApiException) -> str:
    """What the API server said: the ``message`` of its Status, else the reason."""
    try:
        body = json.loads(exc.body or "")
    except (TypeError, ValueError):
        body = None
    message = body.get("message") if isinstance(body, dict) else None
    return str(message or exc.reason or "no reason given")


def api_error(what: str, exc: ApiException) -> kopf.TemporaryError:
    """An API error as kopf's retry-later error, saying what was being done."""
    return kopf.TemporaryError(
        f"{what}: Kubernetes API answered {exc.status} {exc.reason}", delay=API_RETRY_DELAY
    )


def label_selector(pool: str) -> str:
    """The selector of every slot pod of a pool, as the API (and status.selector) spells it."""
    return ",".join(f"{k}={v}" for k, v in selector(pool).items())


def load_config() -> None:
    """Load the client's configuration: in-cluster when in a pod, else the kubeconfig."""
    try:
        kubernetes.config.load_incluster_config()  # type: ignore[no-untyped-call]
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config()  # type: ignore[no-untyped-call]


def _is_ready(pod: Any) -> bool:
    for cond in (pod.status.conditions if pod.status else None) or []:
        if cond.type == "Ready":
            return bool(cond.status == "True")
    return False


def _observed(pool: str, pod: Any) -> ObservedPod | None:
    """A listed pod as the planner sees it; None when it is not a slot of this pool."""
    meta = pod.metadata
    if meta is None or meta.name is None:
        return None
    labels = meta.labels or {}
    index = slot_index(pool, meta.name)
    if index is None or labels.get(LABEL_POOL) != pool:
        return None  # not ours, whatever the API server's label filtering did
    finalizers = list(meta.finalizers or [])
    statuses = (pod.status.container_statuses if pod.status else None) or []
    return ObservedPod(
        index=index,
        name=meta.name,
        template_hash=labels.get(LABEL_HASH, ""),
        phase=(pod.status.phase if pod.status else None) or "Pending",
        ready=_is_ready(pod),
        terminating=meta.deletion_timestamp is not None,
        uid=meta.uid or "",
        running=any(s.state is not None and s.state.running is not None for s in statuses),
        finalizer_index=finalizers.index(FINALIZER) if FINALIZER in finalizers else None,
        deleted_at=meta.deletion_timestamp.timestamp() if meta.deletion_timestamp else None,
    )


class KubeApi:
    """The API calls, on one client (and connection pool) per configuration.

    The clients are made on first use, after :func:`load_config`; :meth:`reset`
    drops them, so that the next call uses a configuration loaded since.
    Safe to use from several threads at once.
    """

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._core: kubernetes.client.CoreV1Api | None = None
        self._custom: kubernetes.client.CustomObjectsApi | None = None

    def reset(self) -> None:
        with self._guard:
            self._core = self._custom = None

    @property
    def core(self) -> kubernetes.client.CoreV1Api:
        with self._guard:
            if self._core is None:
                self._core = kubernetes.client.CoreV1Api()
            return self._core

    @property
    def custom(self) -> kubernetes.client.CustomObjectsApi:
        with self._guard:
            if self._custom is None:
                self._custom = kubernetes.client.CustomObjectsApi()
            return self._custom

    # -- pools -------------------------------------------------------------------------

    def read_pool(self, namespace: str, name: str) -> Mapping[str, Any] | None:
        """The pool as the API server has it now; None once it is gone."""
        try:
            return cast(
                Mapping[str, Any],
                self.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name),
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise api_error(f"reading pool {namespace}/{name}", exc) from exc

    def write_status(self, namespace: str, name: str, status: Mapping[str, Any]) -> None:
        """Replace the pool's status fields; a pool that is gone is not an error."""
        try:
            self.custom.patch_namespaced_custom_object_status(
                GROUP, VERSION, namespace, PLURAL, name, {"status": status}
            )
        except ApiException as exc:
            if exc.status != 404:  # the pool is gone: nothing to report to
                raise api_error(f"writing the status of {namespace}/{name}", exc) from exc

    def redis_url(self, namespace: str, spec: PoolSpec) -> str:
        """The Redis URL from the pool's Secret; a missing or unusable Secret
        raises ApipoolError (the pool's fault, reported in its status)."""
        where = f"Secret {namespace}/{spec.redis_secret}"
        try:
            secret = self.core.read_namespaced_secret(spec.redis_secret, namespace)
        except ApiException as exc:
            if exc.status == 404:
                raise ApipoolError(f"{where} (spec.redis.secretRef) does not exist") from None
            raise api_error(f"reading {where}", exc) from exc
        data = secret.data or {}
        key = spec.redis_secret_key
        if key not in data:
            raise ApipoolError(f"{where} has no key {key!r}")
        try:
            return base64.b64decode(data[key]).decode().strip()
        except (binascii.Error, UnicodeDecodeError):
            raise ApipoolError(f"{where} key {key!r} is not a base64 text") from None

    # -- slot pods ---------------------------------------------------------------------

    def slot_pods(self, namespace: str, pool: str) -> list[ObservedPod]:
        """Every slot pod of the pool (terminating ones too), by slot index."""
        try:
            pods = self.core.list_namespaced_pod(
                namespace, label_selector=label_selector(pool)
            ).items
        except ApiException as exc:
            raise api_error(f"listing the slot pods of {namespace}/{pool}", exc) from exc
        observed = [o for o in (_observed(pool, pod) for pod in pods) if o is not None]
        return sorted(observed, key=lambda p: p.index)

    def create_pod(self, namespace: str, manifest: Mapping[str, Any]) -> bool:
        """Create a pod; False when one of that name exists already (creates of
        the stable slot names are idempotent). Raises PodRefused when the pod
        cannot be created as it is."""
        name = manifest["metadata"]["name"]
        try:
            self._create(namespace, manifest, dry_run=False)
        except ApiException as exc:
            if exc.status == 409:
                return False
            raise api_error(f"creating {name}", exc) from exc
        return True

    def dry_run_pod(self, namespace: str, manifest: Mapping[str, Any]) -> None:
        """Ask the API server whether it would create this pod (server-side dry
        run: admission, quotas and webhooks included; nothing is stored). The
        pod gets a generated name, as its own is taken. Raises PodRefused when
        it would not."""
        meta = {k: v for k, v in manifest["metadata"].items() if k != "name"}
        meta["generateName"] = f"{manifest['metadata']['name']}-dry-run-"
        try:
            self._create(namespace, {**manifest, "metadata": meta}, dry_run=True)
        except ApiException as exc:
            raise api_error(f"trying {manifest['metadata']['name']} (dry run)", exc) from exc

    def _create(self, namespace: str, manifest: Mapping[str, Any], *, dry_run: bool) -> None:
        """Create (or dry-run) a pod; a refusal that a retry cannot change is
        PodRefused, other API errors are left to the caller."""
        name = manifest["metadata"].get("name") or manifest["metadata"].get("generateName")
        options: dict[str, Any] = {"dry_run": "All"} if dry_run else {}
        try:
            # The client serialises plain dicts as they are; its types say V1Pod.
            self.core.create_namespaced_pod(namespace, cast(Any, manifest), **options)
        except ApiException as exc:
            if exc.status in REFUSED:
                raise PodRefused(
                    f"pod {name} refused by the API server ({exc.status}): {api_message(exc)}"
                ) from exc
            raise
        except (ValueError, TypeError) as exc:  # the client's validation of the request
            raise PodRefused(f"pod {name} refused by the Kubernetes client: {exc}") from exc

    def release_pod(self, namespace: str, name: str, uid: str, index: int) -> bool:
        """Remove the slot-exit finalizer (at ``index`` of the pod's finalizers)
        of pod ``uid``; False when the pod is gone, is another pod now, or its
        finalizers changed meanwhile (the next reconcile looks again)."""
        patch = [
            {"op": "test", "path": "/metadata/uid", "value": uid},
            {"op": "test", "path": f"/metadata/finalizers/{index}", "value": FINALIZER},
            {"op": "remove", "path": f"/metadata/finalizers/{index}"},
        ]
        try:
            self.core.patch_namespaced_pod(name, namespace, patch)
        except ApiException as exc:
            if exc.status in (404, 409, 422):
                return False
            raise api_error(f"releasing {name}", exc) from exc
        return True

    def delete_pod(self, namespace: str, name: str) -> bool:
        """Delete a pod (gracefully); False when it was gone already."""
        try:
            self.core.delete_namespaced_pod(name, namespace)
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise api_error(f"deleting {name}", exc) from exc
        return True
