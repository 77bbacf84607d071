"""The kopf handlers: the operator's I/O edge.

Every entry point (pool created, changed or resumed; a slot pod's event; the
self-healing timer) runs the same :func:`reconcile`: observe the pods, call the
pure ``plan``, apply its actions, reap the in-flight lists of removed slots,
and write the status. Reconciles of one pool never overlap in this process.

Error contract: an invalid spec sets the ``Degraded`` condition and posts an
Event, and is not retried (nothing to retry until the spec changes); a missing
Secret or an unreachable Redis are retried with back-off; errors of the
Kubernetes API are converted into ``kopf.TemporaryError``.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import logging
import threading
import time
from collections import deque
from collections.abc import Mapping
from typing import Any, cast

import kopf
import kubernetes
from kubernetes.client.exceptions import ApiException
from prometheus_client import Counter, Histogram, start_http_server
from redis.exceptions import RedisError

from ..errors import ApipoolError
from ..stats import PoolStats, read_stats, write_pool_config
from . import redis_ops
from .config import OperatorSettings
from .manifests import (
    BASE_LABELS,
    LABEL_HASH,
    LABEL_POOL,
    selector,
    slot_index,
    slot_pod,
    template_hash,
)
from .planning import Create, Delete, Desired, ObservedPod, plan
from .spec import GROUP, PLURAL, VERSION, InvalidSpec, PoolSpec, parse_spec
from .status import Problem, build_status

SETTINGS = OperatorSettings.from_env()
log = logging.getLogger("apipool.operator")

RECONCILES = Counter(
    "apipool_operator_reconciles", "Reconciles of pools, by result (ok, retry, error)", ["result"]
)
ACTIONS = Counter("apipool_operator_actions", "Slot pods created and deleted", ["action"])
RECONCILE_SECONDS = Histogram("apipool_operator_reconcile_seconds", "Time one reconcile takes")

_locks: dict[tuple[str, str], threading.Lock] = {}
_locks_guard = threading.Lock()
_busy_samples: dict[tuple[str, str], deque[tuple[float, int]]] = {}


def _lock(namespace: str, name: str) -> threading.Lock:
    with _locks_guard:
        return _locks.setdefault((namespace, name), threading.Lock())


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


_clients: dict[str, Any] = {}


def _core() -> kubernetes.client.CoreV1Api:
    """One client (and connection pool) for all reconciles, made after login."""
    if "core" not in _clients:
        _clients["core"] = kubernetes.client.CoreV1Api()
    return cast(kubernetes.client.CoreV1Api, _clients["core"])


def _custom() -> kubernetes.client.CustomObjectsApi:
    if "custom" not in _clients:
        _clients["custom"] = kubernetes.client.CustomObjectsApi()
    return cast(kubernetes.client.CustomObjectsApi, _clients["custom"])


def _body(obj: Mapping[str, Any]) -> kopf.Body:
    """kopf's posting and adoption helpers read plain mappings too; their types say Body."""
    return cast(kopf.Body, obj)


def _api_error(what: str, exc: ApiException) -> kopf.TemporaryError:
    return kopf.TemporaryError(
        f"{what}: Kubernetes API answered {exc.status} {exc.reason}", delay=5
    )


# -- startup --------------------------------------------------------------------


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    # Our status has a schema: keep kopf's own bookkeeping in annotations.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration"
    )
    settings.posting.level = logging.INFO
    settings.watching.server_timeout = 300  # re-list at least every 5 minutes
    settings.watching.client_timeout = 330
    _clients.clear()  # built again from the configuration loaded now
    try:
        kubernetes.config.load_incluster_config()  # type: ignore[no-untyped-call]
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config()  # type: ignore[no-untyped-call]
    if SETTINGS.metrics_port:
        start_http_server(SETTINGS.metrics_port)


# -- observation ----------------------------------------------------------------


def _is_ready(pod: Any) -> bool:
    for cond in (pod.status.conditions if pod.status else None) or []:
        if cond.type == "Ready":
            return bool(cond.status == "True")
    return False


def observe_pods(namespace: str, pool: str) -> list[ObservedPod]:
    label_selector = ",".join(f"{k}={v}" for k, v in selector(pool).items())
    try:
        pods = _core().list_namespaced_pod(namespace, label_selector=label_selector).items
    except ApiException as exc:
        raise _api_error(f"listing the slot pods of {namespace}/{pool}", exc) from exc
    observed: list[ObservedPod] = []
    for pod in pods:
        meta = pod.metadata
        if meta is None or meta.name is None:
            continue
        labels = meta.labels or {}
        index = slot_index(pool, meta.name)
        if index is None or labels.get(LABEL_POOL) != pool:
            continue  # not ours, whatever the API server's label filtering did
        observed.append(
            ObservedPod(
                index=index,
                name=meta.name,
                template_hash=labels.get(LABEL_HASH, ""),
                phase=(pod.status.phase if pod.status else None) or "Pending",
                ready=_is_ready(pod),
                terminating=meta.deletion_timestamp is not None,
            )
        )
    return sorted(observed, key=lambda p: p.index)


def redis_url(namespace: str, spec: PoolSpec) -> str:
    """The Redis URL from the pool's Secret; Problem-worthy errors raise ApipoolError."""
    try:
        secret = _core().read_namespaced_secret(spec.redis_secret, namespace)
    except ApiException as exc:
        if exc.status == 404:
            raise ApipoolError(
                f"Secret {namespace}/{spec.redis_secret} (spec.redis.secretRef) does not exist"
            ) from None
        raise _api_error(f"reading Secret {namespace}/{spec.redis_secret}", exc) from exc
    data = secret.data or {}
    if spec.redis_secret_key not in data:
        raise ApipoolError(
            f"Secret {namespace}/{spec.redis_secret} has no key {spec.redis_secret_key!r}"
        )
    try:
        return base64.b64decode(data[spec.redis_secret_key]).decode().strip()
    except (binascii.Error, UnicodeDecodeError):
        raise ApipoolError(
            f"Secret {namespace}/{spec.redis_secret} key {spec.redis_secret_key!r} "
            "is not a base64 text"
        ) from None


def _utilization(key: tuple[str, str], stats: PoolStats) -> float | None:
    """Busy slot-seconds / (N x seconds) over the last window, from the busy_ms counter."""
    now = time.monotonic()
    samples = _busy_samples.setdefault(key, deque())
    samples.append((now, stats.counters.get("busy_ms", 0)))
    while len(samples) > 2 and now - samples[1][0] >= SETTINGS.utilization_window:
        samples.popleft()
    then, busy_then = samples[0]
    if stats.slots <= 0:
        return None
    if now - then < 5.0:
        return stats.utilization  # too soon for a window: busy slots right now
    busy = (samples[-1][1] - busy_then) / 1000.0
    return max(0.0, min(1.0, busy / (stats.slots * (now - then))))


# -- actions ----------------------------------------------------------------------


def apply(body: Mapping[str, Any], spec: PoolSpec, action: Create | Delete) -> None:
    namespace, pool = body["metadata"]["namespace"], body["metadata"]["name"]
    if isinstance(action, Create):
        manifest = slot_pod(spec, pool, namespace, action.index)
        kopf.adopt(manifest, owner=_body(body))
        try:
            # The client serialises plain dicts as they are; its types say V1Pod.
            _core().create_namespaced_pod(namespace, cast(Any, manifest))
        except ApiException as exc:
            if exc.status == 409:
                return  # already there: creates are idempotent on the stable name
            raise _api_error(f"creating {manifest['metadata']['name']}", exc) from exc
        ACTIONS.labels("create").inc()
        kopf.info(
            _body(body), reason="SlotCreated", message=f"created {manifest['metadata']['name']}"
        )
    else:
        try:
            _core().delete_namespaced_pod(action.name, namespace)
        except ApiException as exc:
            if exc.status == 404:
                return
            raise _api_error(f"deleting {action.name}", exc) from exc
        ACTIONS.labels("delete").inc()
        kopf.info(
            _body(body), reason="SlotDeleted", message=f"deleted {action.name}: {action.reason}"
        )


def _write_status(namespace: str, name: str, status: dict[str, Any]) -> None:
    try:
        _custom().patch_namespaced_custom_object_status(
            GROUP, VERSION, namespace, PLURAL, name, {"status": status}
        )
    except ApiException as exc:
        if exc.status != 404:  # the pool is gone: nothing to report to
            raise _api_error(f"writing the status of {namespace}/{name}", exc) from exc


def _post_problem(body: Mapping[str, Any], problem: Problem | None) -> None:
    """An Event when a problem appears or changes, not on every reconcile."""
    previous = (body.get("status") or {}).get("conditions") or []
    before: Mapping[str, Any] = next((c for c in previous if c.get("type") == "Degraded"), {})
    if problem is None:
        return
    if before.get("status") == "True" and before.get("message") == problem.message:
        return
    kopf.warn(_body(body), reason=problem.reason, message=problem.message)


# -- the reconcile ----------------------------------------------------------------


def _latest(namespace: str, name: str) -> Mapping[str, Any] | None:
    """The pool as the API server has it now; None once it is gone."""
    try:
        return cast(
            Mapping[str, Any],
            _custom().get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name),
        )
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise _api_error(f"reading pool {namespace}/{name}", exc) from exc


def reconcile(namespace: str, name: str, *, retry_problems: bool = False) -> None:
    """Bring one pool's pods, Redis bookkeeping and status in line with its spec."""
    with _lock(namespace, name), RECONCILE_SECONDS.time():
        try:
            # Read the pool again under the lock: the body kopf hands over can predate
            # the status the previous reconcile wrote, and whether a problem is new
            # (an Event) or a condition flips is decided against that status.
            latest = _latest(namespace, name)
            if latest is not None and not latest["metadata"].get("deletionTimestamp"):
                _reconcile(latest, retry_problems=retry_problems)
        except kopf.TemporaryError:
            RECONCILES.labels("retry").inc()
            raise
        except Exception:
            RECONCILES.labels("error").inc()
            raise
        RECONCILES.labels("ok").inc()


def _reconcile(body: Mapping[str, Any], *, retry_problems: bool) -> None:
    meta = body["metadata"]
    namespace, name = meta["namespace"], meta["name"]
    generation = int(meta.get("generation") or 0)
    previous = (body.get("status") or {}).get("conditions") or []
    pods = observe_pods(namespace, name)
    label_selector = ",".join(f"{k}={v}" for k, v in selector(name).items())

    def report(problem: Problem | None, **figures: Any) -> dict[str, Any]:
        """Post an Event for a new problem; the status for these figures."""
        _post_problem(body, problem)
        return build_status(
            selector=label_selector,
            pods=pods,
            problem=problem,
            generation=generation,
            now=_now(),
            previous=previous,
            **figures,
        )

    try:
        spec = parse_spec(name, body.get("spec") or {})
    except InvalidSpec as exc:
        status = report(
            Problem("InvalidSpec", str(exc)),
            slots=len(pods),
            template_hash="",
            actions=[],
            stats=None,
            utilization=None,
        )
        status["desiredSlots"] = (body.get("spec") or {}).get("slots")
        _write_status(namespace, name, status)
        return  # invalid until the spec changes: existing slots are left as they are

    digest = template_hash(spec, name)
    problem: Problem | None = None
    url: str | None = None
    try:
        url = redis_url(namespace, spec)
    except ApipoolError as exc:
        problem = Problem("RedisSecretMissing", str(exc))

    actions = plan(Desired(spec.slots, digest, spec.max_unavailable), pods)
    for action in actions:
        # Without the Secret new pods could not start: create nothing, replace
        # nothing; scale-down still happens (fewer calls is always safe).
        if problem is None or (isinstance(action, Delete) and action.index >= spec.slots):
            apply(body, spec, action)

    stats: PoolStats | None = None
    utilization: float | None = None
    if url is not None:
        try:
            r = redis_ops.connect(url, SETTINGS.redis_timeout)
            try:
                write_pool_config(r, name, slots=spec.slots, max_queue_length=spec.max_queue_length)
                # Slots >= N will not come back: return their jobs. A slot < N
                # without a pod is recreated, and its new process recovers what
                # its predecessor left (never racing a live holder).
                live = {p.index for p in pods}
                gone = [i for i in redis_ops.orphaned_slots(r, name, live) if i >= spec.slots]
                for slot in gone:
                    redis_ops.reap(
                        r,
                        name,
                        slot,
                        max_attempts=spec.max_attempts,
                        result_ttl_seconds=spec.result_ttl_seconds,
                    )
                stats = read_stats(r, name, slots=spec.slots)
            finally:
                r.close()
            utilization = _utilization((namespace, name), stats)
        except (RedisError, ApipoolError) as exc:
            problem = Problem("RedisUnreachable", f"Redis of pool {name}: {exc}")

    status = report(
        problem,
        slots=spec.slots,
        template_hash=digest,
        actions=actions,
        stats=stats,
        utilization=utilization,
    )
    _write_status(namespace, name, status)
    if problem is not None and retry_problems:
        raise kopf.TemporaryError(problem.message, delay=15)


# -- entry points -----------------------------------------------------------------


@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL)
@kopf.on.resume(GROUP, VERSION, PLURAL)
def pool_changed(name: str, namespace: str | None, **_: Any) -> None:
    if namespace is not None:
        reconcile(namespace, name, retry_problems=True)


@kopf.timer(GROUP, VERSION, PLURAL, interval=SETTINGS.timer_interval, sharp=False)
def pool_timer(name: str, namespace: str | None, **_: Any) -> None:
    """Self-healing: catches whatever an event missed."""
    if namespace is not None:
        reconcile(namespace, name)


@kopf.on.event("", "v1", "pods", labels={**BASE_LABELS, LABEL_POOL: kopf.PRESENT})
def slot_pod_event(
    event: Mapping[str, Any], namespace: str | None, labels: Mapping[str, str], **_: Any
) -> None:
    """A slot pod changed or went away: reconcile its pool at once."""
    pool = labels.get(LABEL_POOL)
    if pool and namespace:
        reconcile(namespace, pool)  # reads the pool itself; gone or deleting: nothing


@kopf.on.delete(GROUP, VERSION, PLURAL, optional=True)
def pool_deleted(name: str, namespace: str | None, **_: Any) -> None:
    """Ownership lets the garbage collector remove the pods; this is quicker."""
    if namespace is None:
        return
    for pod in observe_pods(namespace, name):
        try:
            _core().delete_namespaced_pod(pod.name, namespace)
        except ApiException as exc:
            if exc.status != 404:
                raise _api_error(f"deleting {pod.name}", exc) from exc
    _busy_samples.pop((namespace, name), None)
