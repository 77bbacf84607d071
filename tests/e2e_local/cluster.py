"""A Kubernetes cluster on one machine, every part real but the container runtime.

:class:`LocalCluster` starts, in order, and stops in reverse:

- a pod network (:class:`~apipool.testing.node.PodNetwork`: a bridge, and per
  pod a network namespace and address);
- a redis-server listening on 127.0.0.1 and on the bridge's host address;
- the stand-in API with a hard connection limit, on the host address;
- the strict API emulator (schema, RBAC from the chart, admission) with
  ``node_runs_pods``: pods wait for a node, deletions for its kubelet;
- the Secret holding the Redis URL the pods use;
- the operator as its own process (``python -m apipool operator``), presenting
  the chart's ServiceAccount token, so the chart's RBAC is what it may do;
- one or more local nodes (kubelets running pods as processes).

Everything talks over real sockets; operator and nodes meet only through the API.
Its working directory (the operator's log, each pod's container logs, Redis's
files) is removed at the end unless ``APIPOOL_E2E_LOCAL_KEEP`` is set.
"""

from __future__ import annotations

import base64
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import kubernetes

from apipool.testing.node import NodeThread, PodNetwork
from apipool.testing.polling import wait_for
from apipool.testing.redis_server import RedisServer
from apipool.testing.standin import StandInApi
from apipool.testing.standin.server import StandInThread

from ..operator.conftest import make_rbac, write_kubeconfig
from ..operator.emulator import EVENTS, PODS, POOLS, EmulatorThread
from ..operator.emulator_rbac import OPERATOR_TOKEN

NAMESPACE = "default"
GROUP, VERSION, PLURAL = "apipool.dev", "v1alpha1", "apiconcurrencypools"
IMAGE = "registry.example/apipool:local"
"""Any image runs this Python's ``apipool`` on the local node."""


class LocalCluster:
    """The parts above; a context manager. ``limit`` is the stand-in's hard limit."""

    def __init__(
        self,
        limit: int,
        *,
        call_ms: float = 100.0,
        idle_timeout: float = 60.0,
        nodes: Mapping[str, Callable[[Mapping[str, Any]], bool] | None] | None = None,
    ) -> None:
        self.limit = limit
        self.call_ms = call_ms
        self.idle_timeout = idle_timeout
        self.node_claims = dict(nodes) if nodes is not None else {"node-a": None}
        self.workdir = Path(tempfile.mkdtemp(prefix="apipool-e2e-local-"))
        self._stack = contextlib.ExitStack()
        self.nodes: dict[str, NodeThread] = {}
        self.operator: subprocess.Popen[bytes] | None = None

    # -- start and stop -------------------------------------------------------------------

    def __enter__(self) -> LocalCluster:
        try:
            self._start()
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()
        if os.environ.get("APIPOOL_E2E_LOCAL_KEEP"):
            print(f"local cluster's logs kept in {self.workdir}")
        else:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def _start(self) -> None:
        stack = self._stack
        self.network = PodNetwork()
        stack.callback(self.network.close)
        self.redis = RedisServer(bind=(self.network.host_ip,), workdir=str(self.workdir / "redis"))
        self.redis.start()
        stack.callback(self.redis.close)
        standin = StandInThread(
            self.limit,
            host=self.network.host_ip,
            default_ms=self.call_ms,
            idle_timeout=self.idle_timeout,
        )
        self.api: StandInApi = standin.start()
        stack.callback(standin.stop)
        self.kube = EmulatorThread(node_runs_pods=True, auto_ready=None, rbac=make_rbac("chart"))
        self.kube.start()
        stack.callback(self.kube.stop)
        config = kubernetes.client.Configuration()
        config.host = self.kube.url
        self.client = kubernetes.client.ApiClient(config)
        stack.callback(self.client.close)
        self.core = kubernetes.client.CoreV1Api(self.client)
        self.custom = kubernetes.client.CustomObjectsApi(self.client)
        url = self.redis.url_at(self.network.host_ip)
        self.core.create_namespaced_secret(
            NAMESPACE,
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": "redis"},
                "data": {"url": base64.b64encode(url.encode()).decode()},
            },
        )
        self._start_operator()
        for name, claims in self.node_claims.items():
            self.add_node(name, claims)

    def _start_operator(self) -> None:
        kubeconfig = self.workdir / "kubeconfig"
        write_kubeconfig(self.kube.url, OPERATOR_TOKEN, path=kubeconfig)
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("APIPOOL_")},
            "KUBECONFIG": str(kubeconfig),
            "APIPOOL_WATCH_NAMESPACES": NAMESPACE,
            "APIPOOL_TIMER_INTERVAL": "2",
            "APIPOOL_LIVENESS_ENDPOINT": "",
            "APIPOOL_METRICS_PORT": "0",
        }
        self.operator_log = self.workdir / "operator.log"
        with self.operator_log.open("wb") as log:
            self.operator = subprocess.Popen(
                [sys.executable, "-m", "apipool", "operator"],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self._stack.callback(self._stop_operator)

    def _stop_operator(self) -> None:
        proc = self.operator
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)

    def add_node(
        self, name: str, claims: Callable[[Mapping[str, Any]], bool] | None = None
    ) -> NodeThread:
        node = NodeThread(
            self.kube.url,
            name=name,
            network=self.network,
            log_dir=self.workdir / "pods" / name,
            claims=claims,
        ).start()
        self.nodes[name] = node
        self._stack.callback(node.stop)
        return node

    # -- the pool -------------------------------------------------------------------------

    def pool_body(self, name: str, slots: int, **spec: Any) -> dict[str, Any]:
        return {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "ApiConcurrencyPool",
            "metadata": {"name": name},
            "spec": {
                "slots": slots,
                "image": IMAGE,
                "handler": "http",
                "http": {"allowUrls": [f"{self.api.url}/"]},
                "redis": {"secretRef": {"name": "redis"}},
                "callTimeoutSeconds": 5,
                "liveness": {"periodSeconds": 1, "failureThreshold": 2, "timeoutSeconds": 1},
                **spec,
            },
        }

    def create_pool(self, name: str, slots: int, **spec: Any) -> None:
        self.custom.create_namespaced_custom_object(
            GROUP, VERSION, NAMESPACE, PLURAL, self.pool_body(name, slots, **spec)
        )

    def patch_pool(self, name: str, spec: Mapping[str, Any]) -> None:
        self.custom.patch_namespaced_custom_object(
            GROUP, VERSION, NAMESPACE, PLURAL, name, {"spec": dict(spec)}
        )

    def pool(self, name: str) -> dict[str, Any] | None:
        return self.kube.get(POOLS, NAMESPACE, name)

    def pods(self, pool: str) -> list[dict[str, Any]]:
        prefix = f"{pool}-slot-"
        return [p for p in self.kube.objects(PODS) if p["metadata"]["name"].startswith(prefix)]

    def ready_pods(self, pool: str) -> list[dict[str, Any]]:
        def ready(pod: Mapping[str, Any]) -> bool:
            if pod["metadata"].get("deletionTimestamp"):
                return False
            conditions = (pod.get("status") or {}).get("conditions") or []
            return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)

        return [p for p in self.pods(pool) if ready(p)]

    def events(self) -> list[dict[str, Any]]:
        return self.kube.objects(EVENTS)

    def node_of(self, pod: str) -> NodeThread:
        for node in self.nodes.values():
            if node.pid(pod) is not None:
                return node
        raise LookupError(f"no node runs a container of {pod}")

    def wait_pool_ready(self, pool: str, slots: int, timeout: float = 60.0) -> None:
        wait_for(
            lambda: len(self.ready_pods(pool)) == slots,
            timeout,
            interval=0.1,
            what=f"{slots} ready slot pods of {pool} (operator log: {self.operator_log})",
        )

    def delete_pod(self, name: str, *, grace: int | None = None) -> None:
        body = kubernetes.client.V1DeleteOptions(grace_period_seconds=grace)
        self.core.delete_namespaced_pod(name, NAMESPACE, body=body)
