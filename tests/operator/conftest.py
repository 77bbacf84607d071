"""Fixtures of the operator tests: the Kubernetes API emulator on a loopback port,
the kopf operator in its own thread and event loop, and helpers to drive both.

The operator runs the registry of ``apipool.operator.controller.build_registry``
with :data:`OPERATOR_SETTINGS` (a 1 s timer, no metrics port, no liveness
endpoint), a new registry and :class:`Reconciler` at each start. The Kubernetes
client reads the path of its kubeconfig (``KUBECONFIG``) once, at import: it is
set here, when pytest imports this conftest, and again on the client module
when the operator's modules are first needed. Each test writes its own
emulator's address into that kubeconfig file; the operator reads it at startup.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import os
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import pytest

from apipool.operator.config import OperatorSettings

from ..conftest import wait_for
from .emulator import EVENTS, PODS, POOLS, SECRETS, Emulator, EmulatorThread
from .emulator_admission import Refusal, webhook_denial
from .emulator_rbac import (
    OPERATOR_SA,
    OPERATOR_TOKEN,
    Rbac,
    chart_rbac_documents,
    chart_service_account,
    sa_user,
)

if TYPE_CHECKING:
    from apipool.operator.reconcile import Reconciler

TIMER_INTERVAL = 1.0
NAMESPACE = "default"
GROUP, VERSION, PLURAL = "apipool.dev", "v1alpha1", "apiconcurrencypools"
IMAGE = "ghcr.io/example/apipool:0.1.0"

_KUBE_DIR = Path(tempfile.mkdtemp(prefix="apipool-kube-"))
KUBECONFIG = _KUBE_DIR / "config"
KUBECONFIG.write_text("apiVersion: v1\nkind: Config\nclusters: []\ncontexts: []\nusers: []\n")
os.environ["KUBECONFIG"] = str(KUBECONFIG)
OPERATOR_SETTINGS = OperatorSettings(
    timer_interval=TIMER_INTERVAL, liveness_endpoint="", metrics_port=0, redis_timeout=1.0
)
"""The operator's settings in these tests (kopf's own liveness endpoint is off too)."""

RBAC_MODE = os.environ.get("APIPOOL_EMULATOR_RBAC", "deploy")
"""The RBAC the operator runs under unless a test's ``emulator(rbac=...)`` marker
says otherwise: ``deploy`` (deploy/rbac.yaml), ``chart`` (the chart's rendered
RBAC) or ``off`` (the operator is the admin)."""

__all__ = [
    "EVENTS",
    "NAMESPACE",
    "PODS",
    "POOLS",
    "SECRETS",
    "Cluster",
    "Refusal",
    "wait_for",
    "webhook_denial",
]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "emulator(**options): options of the Kubernetes emulator (pod_grace, auto_ready, "
        "validate_builtins, rbac: 'deploy' | 'chart' | 'off' | an Rbac)",
    )


def pytest_unconfigure(config: pytest.Config) -> None:
    shutil.rmtree(_KUBE_DIR, ignore_errors=True)


@functools.cache
def chart_rbac() -> tuple[tuple[dict[str, Any], ...], str]:
    """The chart's RBAC objects (watching ``default``) and its ServiceAccount's user."""
    docs = chart_rbac_documents()
    return tuple(docs), sa_user(*chart_service_account(docs))


def make_rbac(mode: str | Rbac | None) -> Rbac | None:
    """The emulator's RBAC for a mode; the operator's token names the ServiceAccount."""
    if isinstance(mode, Rbac):
        return mode
    if mode in (None, False, "off"):
        return None
    if mode == "deploy":
        rbac = Rbac.from_file()
        rbac.add_token(OPERATOR_TOKEN, sa_user(*OPERATOR_SA))
        return rbac
    if mode == "chart":
        docs, user = chart_rbac()
        rbac = Rbac.from_documents(docs)
        rbac.add_token(OPERATOR_TOKEN, user)
        return rbac
    raise ValueError(f"unknown RBAC mode {mode!r}")


def write_kubeconfig(url: str, token: str | None = None, path: Path = KUBECONFIG) -> None:
    """Point the kubeconfig (``path``) at the emulator; with ``token``, its user presents it."""
    user = f"{{token: {token}}}" if token else "{}"
    text = (
        "apiVersion: v1\n"
        "kind: Config\n"
        "clusters:\n"
        f"- name: emulator\n  cluster:\n    server: {url}\n"
        "users:\n"
        f"- name: tester\n  user: {user}\n"
        "contexts:\n"
        "- name: emulator\n  context:\n    cluster: emulator\n    user: tester\n"
        f"    namespace: {NAMESPACE}\n"
        "current-context: emulator\n"
    )
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def import_operator_modules() -> dict[str, ModuleType]:
    """kopf, kubernetes and the operator's modules, the client pointed at our kubeconfig."""
    import kopf
    import kubernetes

    from apipool.operator import controller, reconcile

    # Whoever imported the client first, it must read our kubeconfig.
    kubernetes.config.kube_config.KUBE_CONFIG_DEFAULT_LOCATION = str(KUBECONFIG)
    return {
        "kopf": kopf,
        "kubernetes": kubernetes,
        "controller": controller,
        "reconcile": reconcile,
    }


@pytest.fixture(scope="session")
def operator_modules() -> dict[str, ModuleType]:
    """kopf, kubernetes and the operator's modules (see import_operator_modules)."""
    return import_operator_modules()


# -- the operator in its own thread ----------------------------------------------------


class OperatorThread:
    """``kopf.operator()`` in a thread with its own event loop (kopf's shutdown must
    not touch the test's loop, and only the main thread may own signal handlers),
    running the operator's registry for ``settings``. Each :meth:`start` makes a
    new registry and :class:`Reconciler` (:attr:`reconciler`), as a new operator
    process would.

    :meth:`stop` sets kopf's stop flag and, as a second Ctrl-C would, cancels the
    operator if it has not finished within a second: kopf 1.45 can respawn a
    pool's timer while it stops, and then waits 5 s for that "hung" timer, which
    would go on reconciling meanwhile. When :meth:`stop` returns, no handler of
    this operator runs any more.
    """

    def __init__(
        self, modules: dict[str, ModuleType], settings: OperatorSettings = OPERATOR_SETTINGS
    ) -> None:
        self.kopf = modules["kopf"]
        self.controller = modules["controller"]
        self.reconcile = modules["reconcile"]
        self.settings = settings
        self.thread: threading.Thread | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.task: asyncio.Task[None] | None = None
        self.ready = threading.Event()
        self.stop_flag = threading.Event()
        self.kopf_settings: Any = None
        self.registry: Any = None
        self.reconciler: Reconciler | None = None
        self.error: BaseException | None = None

    async def _run(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.task = asyncio.current_task()  # type: ignore[assignment]
        await self.kopf.operator(
            registry=self.registry,
            standalone=True,
            clusterwide=False,
            namespaces=[NAMESPACE],
            liveness_endpoint=self.settings.liveness_endpoint or None,
            settings=self.kopf_settings,
            ready_flag=self.ready,
            stop_flag=self.stop_flag,
        )

    def _main(self) -> None:
        try:
            asyncio.run(self._run())
        except asyncio.CancelledError:
            pass  # stopped the hard way, see stop()
        except BaseException as exc:
            self.error = exc

    def start(self, timeout: float = 10.0) -> OperatorThread:
        self.ready = threading.Event()
        self.stop_flag = threading.Event()
        self.error = None
        self.kopf_settings = self.kopf.OperatorSettings()
        self.kopf_settings.queueing.exit_timeout = 0.0  # do not start new handlers at exit
        self.reconciler = self.reconcile.Reconciler(self.settings)
        self.registry = self.controller.build_registry(self.settings, self.reconciler)
        self.thread = threading.Thread(target=self._main, name="kopf-operator", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.ready.wait(0.01):
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the operator did not start: {self.error!r}")
        return self

    def stop(self, grace: float = 1.0, timeout: float = 10.0) -> None:
        if self.thread is None:
            return
        self.stop_flag.set()
        self.thread.join(grace)
        if self.thread.is_alive() and self.loop is not None and self.task is not None:
            self.loop.call_soon_threadsafe(self.task.cancel)
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise RuntimeError("the operator did not stop in time")
        self.thread = None
        # Sync handlers run in kopf's executor: let the last one finish.
        self.kopf_settings.execution.executor.shutdown(wait=True)
        if self.error is not None:
            raise RuntimeError(f"the operator failed: {self.error!r}") from self.error


# -- what the tests drive ----------------------------------------------------------------


class Cluster:
    """The emulated cluster as the tests see it: the kubernetes client for what a
    user does (through the HTTP API, so watches see it), the emulator's store for
    what a test checks or what the kubelet would do."""

    def __init__(self, kube: EmulatorThread, kubernetes: ModuleType, redis_url: str) -> None:
        self.kube = kube
        self.redis_url = redis_url
        config = kubernetes.client.Configuration()
        config.host = kube.url
        self.api = kubernetes.client.ApiClient(config)
        self.core = kubernetes.client.CoreV1Api(self.api)
        self.custom = kubernetes.client.CustomObjectsApi(self.api)
        self.ApiException = kubernetes.client.ApiException
        self._kubernetes = kubernetes

    def close(self) -> None:
        self.api.close()

    @property
    def emulator(self) -> Emulator:
        assert self.kube.emulator is not None
        return self.kube.emulator

    # Pools ----------------------------------------------------------------------------

    @staticmethod
    def new_name() -> str:
        return f"p{uuid.uuid4().hex[:8]}"

    def pool_spec(self, slots: int = 3, **spec: Any) -> dict[str, Any]:
        return {
            "slots": slots,
            "image": IMAGE,
            "handler": "http",
            "redis": {"secretRef": {"name": "redis", "key": "url"}},
            "callTimeoutSeconds": 2,
            **spec,
        }

    def create_pool(self, name: str, slots: int = 3, **spec: Any) -> dict[str, Any]:
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "ApiConcurrencyPool",
            "metadata": {"name": name, "namespace": NAMESPACE},
            "spec": self.pool_spec(slots, **spec),
        }
        return dict(
            self.custom.create_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, body)
        )

    def create_invalid_pool(self, name: str, slots: int = 3, **spec: Any) -> dict[str, Any]:
        """Create a pool past the CRD's schema (which would answer 422): a pool stored
        before its CRD got stricter, to test the operator's own checks. It gets the
        ADDED event as any other."""
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "ApiConcurrencyPool",
            "metadata": {"name": name, "namespace": NAMESPACE},
            "spec": self.pool_spec(slots, **spec),
        }
        return self.kube.put(POOLS, body, admission=False)

    def force_spec(self, name: str, **spec: Any) -> dict[str, Any]:
        """Merge ``spec`` into a pool past the CRD's schema and admission (a MODIFIED
        event, the generation bumped): a spec the API would refuse with 422."""
        return self.kube.force_merge(POOLS, name, {"spec": spec}, namespace=NAMESPACE)

    def patch_pool(self, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        return dict(
            self.custom.patch_namespaced_custom_object(
                GROUP, VERSION, NAMESPACE, PLURAL, name, patch
            )
        )

    def patch_spec(self, name: str, **spec: Any) -> dict[str, Any]:
        return self.patch_pool(name, {"spec": spec})

    def scale(self, name: str, replicas: int) -> dict[str, Any]:
        """What ``kubectl scale acp/NAME --replicas=N`` does: patch the scale subresource."""
        return dict(
            self.custom.patch_namespaced_custom_object_scale(
                GROUP, VERSION, NAMESPACE, PLURAL, name, {"spec": {"replicas": replicas}}
            )
        )

    def delete_pool(self, name: str) -> None:
        self.custom.delete_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, name)

    def pool(self, name: str) -> dict[str, Any]:
        return dict(
            self.custom.get_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, name)
        )

    def status(self, name: str) -> dict[str, Any]:
        return dict(self.pool(name).get("status") or {})

    def condition(self, name: str, kind: str) -> dict[str, Any]:
        for cond in self.status(name).get("conditions") or []:
            if cond.get("type") == kind:
                return dict(cond)
        return {}

    # Pods --------------------------------------------------------------------------------

    def pods(self, pool: str) -> dict[str, dict[str, Any]]:
        """Every pod of the pool in the store by name, Terminating ones included."""
        return {
            pod["metadata"]["name"]: pod
            for pod in self.kube.objects(PODS)
            if (pod["metadata"].get("labels") or {}).get("apipool.dev/pool") == pool
        }

    def pod_names(self, pool: str, *, terminating: bool | None = None) -> list[str]:
        """Sorted names; terminating=False: only pods without a deletionTimestamp."""
        names = [
            name
            for name, pod in self.pods(pool).items()
            if terminating is None or bool(pod["metadata"].get("deletionTimestamp")) == terminating
        ]
        return sorted(names, key=lambda n: (len(n), n))

    def slots_are(self, pool: str, indexes: range | list[int]) -> bool:
        """Exactly the pods ``<pool>-slot-<i>`` for these indexes exist, none terminating."""
        want = [f"{pool}-slot-{i}" for i in indexes]
        return self.pod_names(pool) == want and self.pod_names(pool, terminating=False) == want

    def delete_pod(self, name: str) -> None:
        self.core.delete_namespaced_pod(name, NAMESPACE)

    # The API server's request log ----------------------------------------------------------

    def mark(self) -> int:
        """A position in the emulator's request log."""
        return len(self.kube.requests())

    def calls(
        self,
        since: int = 0,
        *,
        method: str,
        plural: str,
        name: str | None = None,
        subresource: str | None = None,
    ) -> list[str]:
        """Names (or the request paths, for creates) of the matching requests since a mark."""
        found = []
        for req in self.kube.requests()[since:]:
            if req.method.value != method or req.resource is None:
                continue
            if req.resource.plural != plural or req.subresource != subresource:
                continue
            target = req.name or (req.data or {}).get("metadata", {}).get("name", "")
            if name is None or target == name:
                found.append(target)
        return found

    def status_writes(self, pool: str, since: int) -> int:
        """How many reconciles of the pool ended since the mark (each writes the status)."""
        return len(
            self.calls(since, method="PATCH", plural=PLURAL, name=pool, subresource="status")
        )

    def wait_reconciles(self, pool: str, count: int = 2, timeout: float = 5.0) -> None:
        since = self.mark()
        wait_for(
            lambda: self.status_writes(pool, since) >= count,
            timeout,
            what=f"{count} reconciles of {pool}",
        )

    # Events --------------------------------------------------------------------------------

    def events(self, pool: str, *, reason: str | None = None) -> list[dict[str, Any]]:
        found = []
        for event in self.kube.objects(EVENTS):
            involved = event.get("involvedObject") or {}
            ours = involved.get("kind") == "ApiConcurrencyPool" and involved.get("name") == pool
            if ours and (reason is None or event.get("reason") == reason):
                found.append(event)
        return found

    # Secrets -------------------------------------------------------------------------------

    def put_secret(self, name: str, data: dict[str, str]) -> None:
        encoded = {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}
        body = {"metadata": {"name": name, "namespace": NAMESPACE}, "data": encoded}
        self.core.create_namespaced_secret(NAMESPACE, body)

    # Admission and identities ---------------------------------------------------------

    def refuse(
        self,
        kind: str | None = None,
        *,
        code: int = 403,
        reason: str | None = None,
        message: str = "refused by admission",
        when: Callable[[Mapping[str, Any]], bool] | None = None,
        verbs: Iterable[str] = ("create",),
        times: int | None = None,
    ) -> Refusal:
        """Refuse the writes (``verbs``) of ``kind`` (a plural: ``pods``) for which
        ``when(obj)`` holds, with ``code``/``reason``/``message``, for ``times``
        requests (None: until :meth:`allow`). ``Refusal.refused`` lists what it
        refused. See :func:`webhook_denial` for a webhook's wording."""
        return self.kube.refuse(
            kind=kind,
            code=code,
            reason=reason,
            message=message,
            when=when,
            verbs=frozenset(verbs),
            times=times,
        )

    def allow(self, refusal: Refusal) -> None:
        self.kube.allow(refusal)

    def client_as(self, token: str = OPERATOR_TOKEN) -> Any:
        """A kubernetes ``ApiClient`` presenting a bearer token (by default the
        operator's ServiceAccount's); close it after use."""
        config = self._kubernetes.client.Configuration()
        config.host = self.kube.url
        config.api_key = {"authorization": token}
        config.api_key_prefix = {"authorization": "Bearer"}
        return self._kubernetes.client.ApiClient(config)


@pytest.fixture
def kube(request: pytest.FixtureRequest) -> Iterator[EmulatorThread]:
    """The emulator, on a free loopback port, named in the kubeconfig. With RBAC on
    (by default deploy/rbac.yaml; see :data:`RBAC_MODE` and the ``emulator(rbac=...)``
    marker) the kubeconfig's user presents :data:`OPERATOR_TOKEN`, so the operator
    is its ServiceAccount; the tests' own client sends no token and is the admin."""
    options: dict[str, Any] = {"pod_grace": 0.05, "auto_ready": 0.02, "rbac": RBAC_MODE}
    for marker in reversed(list(request.node.iter_markers("emulator"))):
        options.update(marker.kwargs)
    options["rbac"] = make_rbac(options["rbac"])
    thread = EmulatorThread(**options).start()
    write_kubeconfig(thread.url, OPERATOR_TOKEN if options["rbac"] is not None else None)
    try:
        yield thread
        errors = thread.emulator.observer_errors if thread.emulator else []
        assert not errors, f"an invariant failed in the emulator: {errors[0]!r}"
    finally:
        thread.stop()


@pytest.fixture
def cluster(
    kube: EmulatorThread,
    operator_modules: dict[str, ModuleType],
    redis_server: Any,
) -> Iterator[Cluster]:
    """The emulated cluster with the Secret ``redis`` (key ``url``) pointing at the
    session's real redis-server, as the pools' Redis."""
    c = Cluster(kube, operator_modules["kubernetes"], redis_server.url)
    c.put_secret("redis", {"url": redis_server.url})
    yield c
    c.close()


@pytest.fixture
def operator(cluster: Cluster, operator_modules: dict[str, ModuleType]) -> Iterator[OperatorThread]:
    """The operator, running against the cluster; stopped (cleanly) at teardown."""
    op = OperatorThread(operator_modules).start()
    yield op
    op.stop()


@pytest.fixture
def max_slot_pods(kube: EmulatorThread) -> Callable[[str], list[int]]:
    """Track, at every change of the store, how many pod objects of a pool exist
    (Terminating included); returns a list whose only item is the maximum so far."""

    def track(pool: str) -> list[int]:
        seen = [0]

        def observer(emulator: Emulator) -> None:
            count = sum(
                1
                for _, pod in emulator.live(PODS)
                if (pod["metadata"].get("labels") or {}).get("apipool.dev/pool") == pool
            )
            seen[0] = max(seen[0], count)

        kube.observe(observer)
        return seen

    return track
