"""Slot pod manifests, built as plain dicts from a PoolSpec (pure).

The slot container's command line is :meth:`SlotSettings.to_argv`, the one
function that builds an ``apipool slot`` command line. Ownership (an
ownerReference, without the pool's labels) is added at the edge, when the
reconcile creates the pod.

Resource quantities are written as strings: the CRD accepts ``cpu: 1`` (an
integer), the Kubernetes client's request validation does not.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from typing import Any

from .. import defaults
from ..layout import index_after
from ..settings import ENV_OWNER, ENV_REDIS_URL, Limits, SlotSettings, Timings
from .spec import PoolSpec

HEALTH_PORT = defaults.HEALTH_PORT
ENV_POD_UID = "APIPOOL_POD_UID"
OWNER = f"k8s-pod-$({ENV_POD_UID})"
"""The slot's owner: its pod (the kubelet expands the UID), so that a restarted
container of the same pod takes its predecessor's lease over at once."""
FINALIZER = "apipool.dev/slot-exit"
"""Every slot pod carries it: the pod's name stays taken until the operator knows
its process is gone (operator/quarantine.py)."""
LABEL_POOL = "apipool.dev/pool"
LABEL_SLOT = "apipool.dev/slot"
LABEL_HASH = "apipool.dev/template-hash"
ANNOTATION_HASH = "apipool.dev/template-hash"
BASE_LABELS = {"app.kubernetes.io/name": "apipool", "app.kubernetes.io/component": "slot"}
RUN_AS_USER = 10001
LIVENESS_KILL_GRACE = 2
"""Seconds between SIGTERM and SIGKILL when a probe kills a slot (the probe-level
terminationGracePeriodSeconds): a hung slot does not act on SIGTERM, so waiting
the pod's graceful-stop period would only keep the slot away longer."""
HEALTH_HOST = "::"
"""The slot's health server binds every address, IPv6 and IPv4 (dual stack; the
slot falls back to IPv4 alone where the node has no IPv6)."""
NO_SIDECAR = {"sidecar.istio.io/inject": "false", "linkerd.io/inject": "disabled"}
"""Service-mesh sidecars are not injected: a proxy would keep the upstream
connection open across a slot's restart, so more than N connections could be
open at once."""


def pod_name(pool: str, index: int) -> str:
    return f"{pool}-slot-{index}"


def slot_index(pool: str, name: str) -> int | None:
    """The slot index of a pod name of this pool, or None for other names."""
    return index_after(f"{pool}-slot-", name)


def selector(pool: str) -> dict[str, str]:
    """Labels that select every slot pod of a pool."""
    return {**BASE_LABELS, LABEL_POOL: pool}


def timings(spec: PoolSpec) -> Timings:
    return Timings(
        call_timeout=spec.call_timeout_seconds,
        heartbeat_interval=spec.heartbeat_interval_seconds,
        hang_window=spec.hang_window_seconds,
    )


def limits(spec: PoolSpec) -> Limits:
    return Limits(
        max_envelope_bytes=spec.max_envelope_bytes,
        max_result_bytes=spec.max_result_bytes,
        max_response_bytes=spec.max_response_bytes,
        max_dead_letters=spec.max_dead_letters,
    )


def grace_period(spec: PoolSpec) -> int:
    """terminationGracePeriodSeconds: longer than a graceful stop takes (the
    current call, bounded by its timeout, then releasing the lease)."""
    return math.ceil(timings(spec).shutdown_grace) + 5


def slot_settings(spec: PoolSpec, pool: str, index: int) -> SlotSettings:
    """What slot ``index`` of the pool runs with. Its Redis URL is not here: it
    reaches the process through ``APIPOOL_REDIS_URL``, from the pool's Secret."""
    return SlotSettings(
        pool=pool,
        slot=index,
        handlers=spec.handlers,
        timings=timings(spec),
        max_attempts=spec.max_attempts,
        result_ttl=spec.result_ttl_seconds,
        limits=limits(spec),
        http=spec.http,
        allow_eviction=spec.allow_redis_eviction,
        owner=OWNER,
        health_host=HEALTH_HOST,
        health_port=HEALTH_PORT,
        standby=spec.standby,
        adaptive=spec.adaptive,
        max_pause=spec.max_pause_seconds,
    )


def _env(spec: PoolSpec) -> list[dict[str, Any]]:
    return [
        {
            "name": ENV_REDIS_URL,
            "valueFrom": {
                "secretKeyRef": {"name": spec.redis_secret, "key": spec.redis_secret_key}
            },
        },
        # The pod's UID: a restarted container of the same pod is known to have
        # replaced a dead predecessor and takes the slot's lease over at once.
        {"name": ENV_POD_UID, "valueFrom": {"fieldRef": {"fieldPath": "metadata.uid"}}},
        {"name": ENV_OWNER, "value": OWNER},
        *spec.template.get("env", []),
    ]


def _probe(
    path: str, period: int, failures: int, timeout: int, *, kills: bool = True
) -> dict[str, Any]:
    """An httpGet probe; one that ``kills`` (liveness, startup) gets the short
    probe-level grace (readiness may not have one)."""
    probe: dict[str, Any] = {
        "httpGet": {"path": path, "port": "health"},
        "periodSeconds": period,
        "failureThreshold": failures,
        "timeoutSeconds": timeout,
    }
    if kills:
        probe["terminationGracePeriodSeconds"] = LIVENESS_KILL_GRACE
    return probe


def quantity(value: Any) -> Any:
    """A resource quantity as the API spells it: numbers become strings
    (``1`` -> ``"1"``, ``0.5`` -> ``"0.5"``); anything else is left as it is."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return value
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def resources(template: Mapping[str, Any]) -> dict[str, Any]:
    """The container's resources with every limit and request as a string quantity."""
    found = dict(template.get("resources") or {})
    for key in ("limits", "requests"):
        if isinstance(found.get(key), Mapping):
            found[key] = {name: quantity(v) for name, v in found[key].items()}
    return found


def _container(spec: PoolSpec, pool: str, index: int) -> dict[str, Any]:
    live = spec.liveness
    container: dict[str, Any] = {
        "name": "slot",
        "image": spec.image,
        "args": slot_settings(spec, pool, index).to_argv(),
        "env": _env(spec),
        "ports": [{"name": "health", "containerPort": HEALTH_PORT, "protocol": "TCP"}],
        "livenessProbe": _probe(
            "/healthz", live.period_seconds, live.failure_threshold, live.timeout_seconds
        ),
        "readinessProbe": _probe("/readyz", 1, 2, 1, kills=False),
        "startupProbe": _probe("/healthz", 1, 30, 1),
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUN_AS_USER,
            "readOnlyRootFilesystem": True,
            "allowPrivilegeEscalation": False,
            "privileged": False,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    }
    if "resources" in spec.template:
        container["resources"] = resources(spec.template)
    if "imagePullPolicy" in spec.template:
        container["imagePullPolicy"] = spec.template["imagePullPolicy"]
    return container


def _pod_spec(spec: PoolSpec, pool: str, index: int) -> dict[str, Any]:
    pod: dict[str, Any] = {
        "restartPolicy": "Always",
        "terminationGracePeriodSeconds": grace_period(spec),
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": {"runAsNonRoot": True, "fsGroup": RUN_AS_USER},
        "containers": [_container(spec, pool, index)],
    }
    for key in (
        "nodeSelector",
        "tolerations",
        "affinity",
        "serviceAccountName",
        "priorityClassName",
        "imagePullSecrets",
    ):
        if key in spec.template:
            pod[key] = spec.template[key]
    return pod


def template_hash(spec: PoolSpec, pool: str) -> str:
    """A short hash of what every slot pod is built from; a changed hash means
    the running pods are out of date. The slot index is left out."""
    doc = {
        "spec": _pod_spec(spec, pool, 0),
        "labels": spec.template.get("labels", {}),
        "annotations": spec.template.get("annotations", {}),
    }
    text = json.dumps(doc, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def slot_pod(spec: PoolSpec, pool: str, namespace: str, index: int) -> dict[str, Any]:
    """The pod for slot ``index`` of pool ``pool`` (without its ownerReference)."""
    digest = template_hash(spec, pool)
    labels = {
        **spec.template.get("labels", {}),
        **selector(pool),
        LABEL_SLOT: str(index),
        LABEL_HASH: digest,
    }
    annotations = {**spec.template.get("annotations", {}), **NO_SIDECAR, ANNOTATION_HASH: digest}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": pod_name(pool, index),
            "namespace": namespace,
            "labels": labels,
            "annotations": annotations,
            "finalizers": [FINALIZER],
        },
        "spec": _pod_spec(spec, pool, index),
    }
