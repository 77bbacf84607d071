"""Slot pod manifests, built as plain dicts from a PoolSpec (pure).

Ownership (``kopf.adopt``) is added at the edge, by the handlers.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

from ..settings import Timings
from .spec import PoolSpec

HEALTH_PORT = 8080
LABEL_POOL = "apipool.dev/pool"
LABEL_SLOT = "apipool.dev/slot"
LABEL_HASH = "apipool.dev/template-hash"
ANNOTATION_HASH = "apipool.dev/template-hash"
BASE_LABELS = {"app.kubernetes.io/name": "apipool", "app.kubernetes.io/component": "slot"}
RUN_AS_USER = 10001


def pod_name(pool: str, index: int) -> str:
    return f"{pool}-slot-{index}"


def slot_index(pool: str, name: str) -> int | None:
    """The slot index of a pod name of this pool, or None for other names."""
    prefix = f"{pool}-slot-"
    tail = name[len(prefix) :] if name.startswith(prefix) else ""
    return int(tail) if tail.isdigit() and str(int(tail)) == tail else None


def selector(pool: str) -> dict[str, str]:
    """Labels that select every slot pod of a pool."""
    return {**BASE_LABELS, LABEL_POOL: pool}


def timings(spec: PoolSpec) -> Timings:
    return Timings(
        call_timeout=spec.call_timeout_seconds,
        heartbeat_interval=spec.heartbeat_interval_seconds,
    )


def grace_period(spec: PoolSpec) -> int:
    """terminationGracePeriodSeconds: longer than a graceful stop takes (the
    current call, bounded by its timeout, then releasing the lease)."""
    return math.ceil(timings(spec).shutdown_grace) + 5


def _container(spec: PoolSpec, pool: str, index: int) -> dict[str, Any]:
    t = timings(spec)
    args = [
        "slot",
        "--pool", pool,
        "--slot", str(index),
        "--call-timeout", f"{t.call_timeout:g}",
        "--heartbeat-interval", f"{t.heartbeat_interval:g}",
        "--max-attempts", str(spec.max_attempts),
        "--result-ttl", str(spec.result_ttl_seconds),
        "--health-host", "0.0.0.0",
        "--health-port", str(HEALTH_PORT),
    ]  # fmt: skip
    for handler in spec.handlers:
        args += ["--handler", handler]
    env: list[dict[str, Any]] = [
        {
            "name": "APIPOOL_REDIS_URL",
            "valueFrom": {
                "secretKeyRef": {"name": spec.redis_secret, "key": spec.redis_secret_key}
            },
        },
        # The pod's UID: a restarted container of the same pod is known to have
        # replaced a dead predecessor and takes the slot's lease over at once.
        {"name": "APIPOOL_POD_UID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.uid"}}},
        {"name": "APIPOOL_OWNER", "value": "k8s-pod-$(APIPOOL_POD_UID)"},
        *spec.template.get("env", []),
    ]
    probe = spec.liveness
    container: dict[str, Any] = {
        "name": "slot",
        "image": spec.image,
        "args": args,
        "env": env,
        "ports": [{"name": "health", "containerPort": HEALTH_PORT, "protocol": "TCP"}],
        "livenessProbe": {
            "httpGet": {"path": "/healthz", "port": "health"},
            "periodSeconds": probe.period_seconds,
            "failureThreshold": probe.failure_threshold,
            "timeoutSeconds": probe.timeout_seconds,
        },
        "readinessProbe": {
            "httpGet": {"path": "/readyz", "port": "health"},
            "periodSeconds": 1,
            "failureThreshold": 2,
            "timeoutSeconds": 1,
        },
        "startupProbe": {
            "httpGet": {"path": "/healthz", "port": "health"},
            "periodSeconds": 1,
            "failureThreshold": 30,
            "timeoutSeconds": 1,
        },
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
    for key in ("resources", "imagePullPolicy"):
        if key in spec.template:
            container[key] = spec.template[key]
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
    annotations = {**spec.template.get("annotations", {}), ANNOTATION_HASH: digest}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": pod_name(pool, index),
            "namespace": namespace,
            "labels": labels,
            "annotations": annotations,
        },
        "spec": _pod_spec(spec, pool, index),
    }
