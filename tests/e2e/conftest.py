"""Fixtures of the e2e suite: a kind cluster with the image, Redis, the stand-in
API and the operator deployed in it, and port-forwards into it.

Everything here shells out to ``docker``, ``kind`` and ``kubectl``. Every call
has a timeout and every wait is a poll with a deadline; a wait that runs out
fails with what the cluster looked like at that moment.

Nothing here runs unless the ``e2e`` marker is selected (``make e2e``): the
project's pytest configuration deselects it by default.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
import redis
import yaml

from apipool.testing.polling import WaitTimeout, wait_for
from apipool.testing.redis_server import free_port

T = TypeVar("T")

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = Path(__file__).resolve().parent / "manifests"

CLUSTER = "apipool-e2e"
CONTEXT = f"kind-{CLUSTER}"
NAMESPACE = "apipool-e2e"
OPERATOR_NAMESPACE = "apipool-system"
OPERATOR_DEPLOYMENT = "apipool-operator"
CRD = "apiconcurrencypools.apipool.dev"
REDIS_URL_IN_CLUSTER = f"redis://redis.{NAMESPACE}.svc:6379/0"
STANDIN_URL_IN_CLUSTER = f"http://standin.{NAMESPACE}.svc:8080"
NEEDS = "make e2e needs Docker (with a running daemon), kind and kubectl on PATH"


def log(message: str) -> None:
    """Progress lines: shown on failure, or live with ``make e2e PYTEST_ARGS=-s``."""
    print(f"[e2e {time.strftime('%H:%M:%S')}] {message}", flush=True)


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


@dataclass(frozen=True)
class E2EConfig:
    """The knobs of the suite, from the environment (documented in README.md here)."""

    image: str
    skip_build: bool
    keep: bool
    node_image: str | None
    load_seconds: float

    @classmethod
    def from_env(cls) -> E2EConfig:
        return cls(
            image=os.environ.get("APIPOOL_E2E_IMAGE", "").strip() or "apipool:dev",
            skip_build=_env_flag("APIPOOL_E2E_SKIP_BUILD"),
            keep=_env_flag("APIPOOL_E2E_KEEP"),
            node_image=os.environ.get("APIPOOL_E2E_NODE_IMAGE", "").strip() or None,
            load_seconds=float(os.environ.get("APIPOOL_E2E_LOAD_SECONDS", "") or 60),
        )


# -- running commands -------------------------------------------------------------


class CommandFailed(AssertionError):
    """A command exited non-zero or ran out of time; the message has its output."""


def _tail(text: str, limit: int = 4000) -> str:
    return text if len(text) <= limit else "...\n" + text[-limit:]


def run(
    argv: Sequence[str],
    *,
    timeout: float,
    input: str | None = None,
    check: bool = True,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a command to completion within ``timeout`` seconds, capturing its output."""
    try:
        proc = subprocess.run(
            list(argv),
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=cwd,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else ""
        raise CommandFailed(
            f"`{' '.join(argv)}` did not finish within {timeout:g} s\n{_tail(out)}"
        ) from None
    if check and proc.returncode != 0:
        raise CommandFailed(
            f"`{' '.join(argv)}` exited {proc.returncode}\n"
            f"stdout:\n{_tail(proc.stdout)}\nstderr:\n{_tail(proc.stderr)}"
        )
    return proc


def wait_until(
    predicate: Callable[[], T | None],
    *,
    timeout: float,
    what: str,
    interval: float = 1.0,
    diagnostics: Callable[[], str] | None = None,
) -> T:
    """Poll ``predicate`` (with the suite's one helper, ``wait_for``) until it
    returns something truthy; fail at the deadline.

    A predicate that raises CommandFailed counts as "not yet" (the API server
    may be busy); the last such error is part of the failure message.
    """
    last_error = ""

    def attempt() -> T | None:
        nonlocal last_error
        try:
            return predicate()
        except CommandFailed as exc:
            last_error = str(exc)
            return None

    try:
        return wait_for(attempt, timeout, interval=interval, what=what)  # type: ignore[return-value]
    except WaitTimeout as exc:
        message = str(exc)
        if last_error:
            message += f"\nlast error: {_tail(last_error, 1500)}"
        if diagnostics is not None:
            message += "\n" + diagnostics()
        pytest.fail(message, pytrace=False)


# -- kubectl ----------------------------------------------------------------------


class Kube:
    """kubectl bound to the e2e cluster through its own kubeconfig file, so that
    neither the developer's current context nor another cluster is ever used."""

    def __init__(self, kubeconfig: Path) -> None:
        self.kubeconfig = kubeconfig

    def argv(self, *args: str) -> list[str]:
        return ["kubectl", "--kubeconfig", str(self.kubeconfig), "--context", CONTEXT, *args]

    def __call__(
        self, *args: str, timeout: float = 60, input: str | None = None, check: bool = True
    ) -> str:
        return run(self.argv(*args), timeout=timeout, input=input, check=check).stdout

    def json(self, *args: str, timeout: float = 60) -> Any:
        return json.loads(self(*args, "-o", "json", timeout=timeout))

    def apply(self, docs: Sequence[Mapping[str, Any]], *, timeout: float = 120) -> None:
        self("apply", "-f", "-", input=yaml.safe_dump_all(docs, sort_keys=False), timeout=timeout)

    def get(self, kind: str, name: str, namespace: str | None = NAMESPACE) -> dict[str, Any] | None:
        """One object, or None when it does not exist."""
        ns = ["-n", namespace] if namespace else []
        out = self("get", kind, name, *ns, "--ignore-not-found", "-o", "json")
        return json.loads(out) if out.strip() else None

    def pods(self, selector: str, namespace: str = NAMESPACE) -> dict[str, dict[str, Any]]:
        items = self.json("get", "pods", "-n", namespace, "-l", selector)["items"]
        return {pod["metadata"]["name"]: pod for pod in items}

    def events(self, kind: str, name: str, namespace: str = NAMESPACE) -> list[dict[str, Any]]:
        selector = f"involvedObject.kind={kind},involvedObject.name={name}"
        items: list[dict[str, Any]] = self.json(
            "get", "events", "-n", namespace, "--field-selector", selector
        )["items"]
        return items

    def rollout(self, deployment: str, namespace: str, timeout: float) -> None:
        self(
            "rollout",
            "status",
            f"deployment/{deployment}",
            "-n",
            namespace,
            f"--timeout={int(timeout)}s",
            timeout=timeout + 30,
        )

    def diagnostics(self) -> str:
        """What the cluster looks like now, for a failure message; never raises."""
        parts: list[str] = []
        commands: list[tuple[str, list[str]]] = [
            ("pods", ["get", "pods", "-A", "-o", "wide"]),
            ("pools", ["get", "acp", "-n", NAMESPACE, "-o", "yaml"]),
            ("events", ["get", "events", "-n", NAMESPACE, "--sort-by=.lastTimestamp"]),
            (
                "operator log",
                [
                    "logs",
                    f"deployment/{OPERATOR_DEPLOYMENT}",
                    "-n",
                    OPERATOR_NAMESPACE,
                    "--tail=60",
                ],
            ),
        ]
        for title, args in commands:
            try:
                proc = run(self.argv(*args), timeout=20, check=False)
                text = proc.stdout + proc.stderr
            except CommandFailed as exc:
                text = str(exc)
            parts.append(f"--- {title}:\n{_tail(text, 3000)}")
        return "\n".join(parts)


def pod_ready(pod: Mapping[str, Any]) -> bool:
    if pod["metadata"].get("deletionTimestamp"):
        return False
    conditions = (pod.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def load_manifest(name: str) -> list[dict[str, Any]]:
    with open(MANIFESTS / name) as f:
        return [doc for doc in yaml.safe_load_all(f) if doc]


# -- port-forwards ------------------------------------------------------------------


class PortForward:
    """``kubectl port-forward`` to a Service, as a managed subprocess on a fixed
    local port. ``ensure()`` starts it again should it have died (kubectl ends
    a port-forward when the connection to the pod breaks)."""

    def __init__(
        self, kube: Kube, target: str, remote_port: int, log_path: Path, namespace: str = NAMESPACE
    ) -> None:
        self.kube = kube
        self.target = target
        self.remote_port = remote_port
        self.namespace = namespace
        self.log_path = log_path
        self.local_port = free_port()
        self.restarts = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()

    def _listening(self) -> bool:
        with (
            contextlib.suppress(OSError),
            socket.create_connection(("127.0.0.1", self.local_port), timeout=1),
        ):
            return True
        return False

    def _start(self) -> None:
        with open(self.log_path, "ab") as out:
            self._proc = subprocess.Popen(
                self.kube.argv(
                    "port-forward",
                    "-n",
                    self.namespace,
                    self.target,
                    f"{self.local_port}:{self.remote_port}",
                    "--address",
                    "127.0.0.1",
                ),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 30
        while not self._listening():
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self._stop()
                pytest.fail(
                    f"kubectl port-forward {self.target} did not start:\n"
                    + _tail(self.log_path.read_text(errors="replace"), 2000),
                    pytrace=False,
                )
            time.sleep(0.2)

    def _stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)

    def start(self) -> PortForward:
        with self._lock:
            self._start()
        return self

    def ensure(self) -> None:
        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                log(f"port-forward {self.target} is gone; starting it again")
                self.restarts += 1
                self._start()

    def close(self) -> None:
        with self._lock:
            self._stop()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.local_port}"


# -- the deploy/ manifests, adapted to the e2e namespace and image -------------------


def operator_manifests(image: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """deploy/rbac.yaml and deploy/operator.yaml as shipped, except that the
    per-namespace Role and RoleBinding go to the e2e namespace, the operator
    watches that namespace, and it runs the image under test."""
    with open(ROOT / "deploy" / "rbac.yaml") as f:
        rbac = [doc for doc in yaml.safe_load_all(f) if doc]
    with open(ROOT / "deploy" / "operator.yaml") as f:
        operator = [doc for doc in yaml.safe_load_all(f) if doc]

    roles = [doc for doc in rbac if doc.get("kind") in {"Role", "RoleBinding"}]
    if not roles:
        pytest.fail("deploy/rbac.yaml has no Role/RoleBinding to adapt", pytrace=False)
    for doc in roles:
        doc["metadata"]["namespace"] = NAMESPACE

    deployments = [
        doc
        for doc in operator
        if doc.get("kind") == "Deployment" and doc["metadata"]["name"] == OPERATOR_DEPLOYMENT
    ]
    if len(deployments) != 1:
        pytest.fail(
            f"deploy/operator.yaml: expected one Deployment {OPERATOR_DEPLOYMENT}", pytrace=False
        )
    deployment = deployments[0]
    if deployment["metadata"].get("namespace") != OPERATOR_NAMESPACE:
        pytest.fail(
            f"deploy/operator.yaml: the operator is expected in {OPERATOR_NAMESPACE}",
            pytrace=False,
        )
    for container in deployment["spec"]["template"]["spec"]["containers"]:
        container["image"] = image
        container["imagePullPolicy"] = "IfNotPresent"  # loaded into the node, never pulled
        env = [e for e in container.get("env", []) if e["name"] != "APIPOOL_WATCH_NAMESPACES"]
        container["env"] = [{"name": "APIPOOL_WATCH_NAMESPACES", "value": NAMESPACE}, *env]
    return rbac, operator


# -- fixtures -------------------------------------------------------------------------


@pytest.fixture(scope="session")
def e2e_config() -> E2EConfig:
    return E2EConfig.from_env()


def _check_tools() -> None:
    missing = [tool for tool in ("docker", "kind", "kubectl") if shutil.which(tool) is None]
    if missing:
        pytest.fail(f"{NEEDS}; not on PATH: {', '.join(missing)}", pytrace=False)
    try:
        proc = run(["docker", "info", "--format", "{{.ServerVersion}}"], timeout=30, check=False)
        problem = (proc.stderr.strip() or f"exit code {proc.returncode}") if proc.returncode else ""
    except CommandFailed as exc:
        problem = str(exc)
    if problem:
        pytest.fail(f"{NEEDS}; the Docker daemon is not reachable:\n{problem}", pytrace=False)


@pytest.fixture(scope="session")
def kube(e2e_config: E2EConfig, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kube]:
    """The kind cluster ``apipool-e2e`` (reused if it exists) with the image
    loaded; deleted at the end unless APIPOOL_E2E_KEEP=1."""
    _check_tools()
    image = e2e_config.image
    if e2e_config.skip_build:
        log(f"APIPOOL_E2E_SKIP_BUILD=1: using the existing image {image}")
        if run(["docker", "image", "inspect", image], timeout=30, check=False).returncode:
            pytest.fail(
                f"APIPOOL_E2E_SKIP_BUILD=1 but there is no local image {image}; "
                "build it (make image) or leave APIPOOL_E2E_SKIP_BUILD unset",
                pytrace=False,
            )
    else:
        log(f"building {image} (docker build)")
        run(["docker", "build", "-t", image, str(ROOT)], timeout=1800, cwd=ROOT)

    kubeconfig = tmp_path_factory.mktemp("kind") / "kubeconfig"
    try:
        clusters = run(["kind", "get", "clusters"], timeout=60).stdout.split()
        if CLUSTER in clusters:
            log(f"reusing the kind cluster {CLUSTER}")
            export = ["kind", "export", "kubeconfig", "--name", CLUSTER]
            run([*export, "--kubeconfig", str(kubeconfig)], timeout=60)
        else:
            log(f"creating the kind cluster {CLUSTER}")
            create = ["kind", "create", "cluster", "--name", CLUSTER]
            create += ["--kubeconfig", str(kubeconfig), "--wait", "180s"]
            if e2e_config.node_image:
                create += ["--image", e2e_config.node_image]
            run(create, timeout=600)
        log(f"loading {image} into the cluster")
        run(["kind", "load", "docker-image", image, "--name", CLUSTER], timeout=600)
        k = Kube(kubeconfig)
        k("wait", "--for=condition=Ready", "nodes", "--all", "--timeout=180s", timeout=210)
        log(f"kubeconfig of the cluster: {kubeconfig}")
        yield k
    finally:
        if e2e_config.keep:
            log(
                f"APIPOOL_E2E_KEEP=1: leaving the cluster {CLUSTER} "
                f"(kubectl --kubeconfig {kubeconfig} --context {CONTEXT} ...)"
            )
        else:
            log(f"deleting the kind cluster {CLUSTER}")
            run(
                ["kind", "delete", "cluster", "--name", CLUSTER, "--kubeconfig", str(kubeconfig)],
                timeout=300,
                check=False,
            )


def _reset_namespace(kube: Kube) -> None:
    """A reused cluster may hold the previous run's namespace: remove it, pools first
    (their finalizer needs the operator; strip it should the operator be gone)."""
    if kube.get("namespace", NAMESPACE, namespace=None) is None:
        return
    log(f"removing the previous run's namespace {NAMESPACE}")
    crd_present = kube.get("crd", CRD, namespace=None) is not None
    if crd_present:
        proc = run(
            kube.argv("delete", "acp", "--all", "-n", NAMESPACE, "--wait=true", "--timeout=60s"),
            timeout=90,
            check=False,
        )
        if proc.returncode != 0:
            for name in kube("get", "acp", "-n", NAMESPACE, "-o", "name").split():
                kube(
                    "patch",
                    name,
                    "-n",
                    NAMESPACE,
                    "--type=merge",
                    "-p",
                    '{"metadata":{"finalizers":[]}}',
                    check=False,
                )
    kube("delete", "namespace", NAMESPACE, "--wait=true", "--timeout=240s", timeout=270)


@pytest.fixture(scope="session")
def deployed(kube: Kube, e2e_config: E2EConfig) -> Kube:
    """CRD, the e2e namespace with Redis, the stand-in API and the Secret, and the
    operator (deploy/*.yaml adapted) running in the cluster and watching it."""
    image = e2e_config.image
    _reset_namespace(kube)

    log("applying crds/")
    kube("apply", "-f", str(ROOT / "crds"), timeout=120)
    kube("wait", "--for", "condition=established", "--timeout=60s", f"crd/{CRD}", timeout=90)

    # The restricted Pod Security Standard is enforced here, as for the
    # operator's own namespace: slot pods that broke it would not be admitted.
    kube.apply(
        [
            {
                "apiVersion": "v1",
                "kind": "Namespace",
                "metadata": {
                    "name": NAMESPACE,
                    "labels": {
                        "app.kubernetes.io/part-of": "apipool-e2e",
                        "pod-security.kubernetes.io/enforce": "restricted",
                    },
                },
            }
        ]
    )

    log("deploying Redis and the stand-in API")
    docs: list[dict[str, Any]] = []
    for doc in [*load_manifest("redis.yaml"), *load_manifest("standin.yaml")]:
        doc["metadata"]["namespace"] = NAMESPACE
        if doc["metadata"]["name"] == "standin" and doc["kind"] == "Deployment":
            for container in doc["spec"]["template"]["spec"]["containers"]:
                container["image"] = image
        docs.append(doc)
    docs.append(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "redis", "namespace": NAMESPACE},
            "type": "Opaque",
            "stringData": {"url": REDIS_URL_IN_CLUSTER},
        }
    )
    kube.apply(docs)

    log("deploying the operator (deploy/rbac.yaml, deploy/operator.yaml)")
    rbac, operator = operator_manifests(image)
    existed = kube.get("deployment", OPERATOR_DEPLOYMENT, namespace=OPERATOR_NAMESPACE)
    kube.apply(rbac)
    kube.apply(operator)
    if existed is not None:
        # A reused cluster: the image may have been rebuilt under the same tag.
        kube("rollout", "restart", f"deployment/{OPERATOR_DEPLOYMENT}", "-n", OPERATOR_NAMESPACE)

    try:
        kube.rollout("redis", NAMESPACE, timeout=300)  # the node pulls the Redis image
        kube.rollout("standin", NAMESPACE, timeout=180)
        kube.rollout(OPERATOR_DEPLOYMENT, OPERATOR_NAMESPACE, timeout=180)
    except CommandFailed as exc:
        pytest.fail(f"{exc}\n{kube.diagnostics()}", pytrace=False)
    return kube


@pytest.fixture(scope="session")
def redis_forward(
    deployed: Kube, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[PortForward]:
    """The e2e Redis on 127.0.0.1 (``redis_forward.address``)."""
    forward = PortForward(
        deployed, "svc/redis", 6379, tmp_path_factory.mktemp("pf") / "redis.log"
    ).start()

    def pong() -> bool:
        with contextlib.suppress(redis.RedisError):
            client = redis.Redis.from_url(f"redis://{forward.address}/0", socket_timeout=3)
            with client:
                return bool(client.ping())
        return False

    try:
        wait_until(pong, timeout=60, what="Redis through the port-forward")
        yield forward
    finally:
        forward.close()


@pytest.fixture(scope="session")
def standin_forward(
    deployed: Kube, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[PortForward]:
    """The stand-in API on 127.0.0.1 (``standin_forward.address``), for /stats."""
    forward = PortForward(
        deployed, "svc/standin", 8080, tmp_path_factory.mktemp("pf") / "standin.log"
    ).start()
    try:
        yield forward
    finally:
        forward.close()
