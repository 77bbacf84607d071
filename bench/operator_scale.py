"""The operator's cost per slot pod as N grows, in a namespace full of other pods.

The real operator runs as its own process (``apipool operator``, as the chart
runs it: INFO logging, a 10 s timer) against the operator tests' Kubernetes API
emulator on 127.0.0.1, watching ``default`` as the chart's ServiceAccount (its
kubeconfig carries the operator's token; the emulator enforces the chart's
RBAC). Its liveness endpoint and metrics port are off: it listens on no port.
The Secret ``redis`` points at a throwaway redis-server. First the namespace
gets unrelated pods (5000; ``--quick``: 500) whose labels overlap the slot pods'
only in part.

Per N (50, 200, 500; ``--quick``: 10, 40): a fresh operator process (so its peak
RSS is that N's) opens its watches and goes quiet; a 1-slot warm-up pool is
created and deleted (first-use costs, such as lazy imports and API clients, are
not charged to the smallest N); then a pool ``scale-<N>`` of its own is created,
its pods made Ready at once by the stand-in kubelet, and finally deleted.

- ``create_s``: from before the create request to the commit at which all N slot
  pods exist and are Ready. The window of the other figures runs from that
  request until the status says N Ready slots and the operator has then been
  silent for ``QUIET`` seconds.
- ``requests``: what the operator sent the API in the window (its token tells it
  from ours); ``requests_per_pod`` over N; ``pod_lists``: its slot pod lists.
- ``reconciles``: PATCHes of the pool's ``status``: every reconcile of a live
  pool ends with exactly one (``Reconciler.report``), so they count reconciles
  without touching the operator (one that raises before its status would be
  missed: none does while pods are created). Its Prometheus counter
  ``apipool_operator_reconciles`` is not used: ``start_http_server`` listens on
  every interface. ``pod_events``: the slot pod watch events the emulator sent
  the operator; ``reconciles_per_event``: the one over the other.
- ``cpu_s``: the operator's user + system CPU seconds (``/proc/<pid>/stat``) in
  the window; ``rss_mib``: its peak RSS (``VmHWM``) at the end of the window;
  ``idle_rss_mib``: the same before the warm-up.
- ``delete_requests_per_pod``: what the operator sent from the delete request
  until the pods were gone and it was silent again, over N.

``cost_ratio_500_vs_50``: the larger of the per-pod ratios (requests, CPU)
between the largest and the smallest N; flat cost is 1. ``unselective_pod_reads``
counts the operator's pod lists and watches whose label selector (or its lack)
would match an unrelated pod, ``unrelated_pods_served`` the unrelated pod objects
the emulator sent it (lists, watch events, reads), over all Ns: both must be 0.

:class:`CountingEmulator` counts what the emulator serves and keeps a short log
of its own: kmock scans its whole request log on every request (see
``bench/operator.py``), which over thousands of requests would set the figures,
so kmock's log is trimmed to the requests in flight.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import sys
import sysconfig
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import attrs
import kmock
from tests.operator.conftest import (
    KUBECONFIG,
    NAMESPACE,
    PLURAL,
    Cluster,
    import_operator_modules,
    make_rbac,
    write_kubeconfig,
)
from tests.operator.emulator import PODS, Emulator, EmulatorThread, parse_label_selector
from tests.operator.emulator_rbac import OPERATOR_TOKEN

from apipool.operator.manifests import LABEL_POOL
from apipool.testing.polling import wait_for
from apipool.testing.redis_server import RedisServer

from .common import ChildProcess, Figures, Target, peak_rss_mib, subprocess_env

T = TypeVar("T")

SIZES = (50, 200, 500)
QUICK_SIZES = (10, 40)
UNRELATED = 5000
QUICK_UNRELATED = 500
UNRELATED_LABELS: tuple[dict[str, str], ...] = (
    {"app": "shop", "tier": "web"},
    {"app.kubernetes.io/name": "apipool", "app.kubernetes.io/component": "operator"},
    {"app.kubernetes.io/name": "other", "app.kubernetes.io/component": "slot"},
)
"""Label sets of the unrelated pods: none has all of a slot pod's selector labels."""
QUIET = 1.0
"""Seconds without a request from the operator that end a counting window."""
STOP_TIMEOUT = 20.0
TRIM_AT = 64
"""kmock's request log is trimmed to the requests in flight once it is this long."""

TARGETS = {
    "cost_ratio_500_vs_50": Target("<=", 1.5),
    "n500_rss_mib": Target("<=", 150.0),
    "cost_ratio_40_vs_10": Target("<=", 1.5),
    "n40_rss_mib": Target("<=", 150.0),
    "unselective_pod_reads": Target("<=", 0),
    "unrelated_pods_served": Target("<=", 0),
}

# tests.operator.conftest made a directory for the kubeconfig when it was imported.
atexit.register(shutil.rmtree, KUBECONFIG.parent, True)


@dataclass(frozen=True)
class Record:
    """One request the emulator received, as far as the figures need it."""

    at: float
    operator: bool
    method: str
    action: str
    """kmock's reading of the request: LIST, WATCH, FETCH, CREATE, UPDATE, DELETE."""
    plural: str
    subresource: str | None
    selector: str | None

    @property
    def list_or_watch(self) -> bool:
        return self.action in ("LIST", "WATCH")


def _by_operator(request: kmock.Request) -> bool:
    headers = {k.lower(): v for k, v in request.headers.items()}
    return headers.get("authorization") == f"Bearer {OPERATOR_TOKEN}"


def _is_ready(pod: Mapping[str, Any]) -> bool:
    conditions = (pod.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


@attrs.define(kw_only=True)
class CountingEmulator(Emulator):
    """The emulator, counting what it serves the operator and when each pool's
    slot pods are all Ready (bookkeeping on the emulator's loop only)."""

    records: list[Record] = attrs.field(factory=list, init=False)
    unrelated_served: int = attrs.field(default=0, init=False)
    slot_events_served: int = attrs.field(default=0, init=False)
    expected: dict[str, int] = attrs.field(factory=dict, init=False)
    """Pool -> N, for the pools whose Ready slot pods are tracked."""
    ready: dict[str, set[str]] = attrs.field(factory=dict, init=False)
    all_ready_at: dict[str, float] = attrs.field(factory=dict, init=False)
    _in_flight: set[int] = attrs.field(factory=set, init=False)

    async def _handle(self, request: kmock.Request) -> Any:
        resource = request.resource
        self.records.append(
            Record(
                at=time.monotonic(),
                operator=_by_operator(request),
                method=request.method.value if request.method else "",
                action=request.action.value if request.action else "",
                plural=(resource.plural or "") if resource is not None else "",
                subresource=request.subresource,
                selector=request.params.get("labelSelector"),
            )
        )
        # Requests past kmock's matching leave its log; each in flight stays until it is
        # matched (kmock finds it there by identity). Ids may repeat then: the emulator
        # keys answers by id only between storing and serving one, with no await between.
        self._in_flight.add(id(request))
        if len(self._requests) > TRIM_AT:
            self._requests[:] = [r for r in self._requests if id(r) in self._in_flight]
        try:
            return await super()._handle(request)
        finally:
            self._in_flight.discard(id(request))

    def _served(self, request: kmock.Request, obj: Any, *, event: bool) -> None:
        if request.resource != PODS or not isinstance(obj, Mapping) or not _by_operator(request):
            return
        labels = (obj.get("metadata") or {}).get("labels") or {}
        if LABEL_POOL not in labels:
            self.unrelated_served += 1
        elif event:
            self.slot_events_served += 1

    async def _serve_list(self, request: kmock.Request) -> Any:
        answer = await super()._serve_list(request)
        items = answer.get("items") if isinstance(answer, Mapping) else None
        for item in items or []:
            self._served(request, item, event=False)
        return answer

    async def _serve_fetch(self, request: kmock.Request) -> Any:
        answer = await super()._serve_fetch(request)
        self._served(request, answer, event=False)
        return answer

    async def _serve_watch(self, request: kmock.Request) -> AsyncIterator[kmock.Payload]:
        async for item in super()._serve_watch(request):
            if isinstance(item, Mapping):
                self._served(request, item.get("object"), event=True)
            yield item

    async def _publish(self, resource: kmock.resource, kind: str, obj: dict[str, Any]) -> None:
        if resource == PODS:
            self._track(kind, obj)
        await super()._publish(resource, kind, obj)

    def _track(self, kind: str, pod: Mapping[str, Any]) -> None:
        meta = pod.get("metadata") or {}
        pool = (meta.get("labels") or {}).get(LABEL_POOL)
        if pool not in self.expected:
            return
        ready = self.ready.setdefault(pool, set())
        if kind != "DELETED" and _is_ready(pod) and not meta.get("deletionTimestamp"):
            ready.add(meta["name"])
        else:
            ready.discard(meta["name"])
        if len(ready) >= self.expected[pool] and pool not in self.all_ready_at:
            self.all_ready_at[pool] = time.monotonic()


class CountingEmulatorThread(EmulatorThread):
    """:class:`EmulatorThread` serving a :class:`CountingEmulator`."""

    def __init__(self, **options: Any) -> None:
        super().__init__(emulator_class=CountingEmulator, **options)

    def read(self, fn: Callable[[CountingEmulator], T], timeout: float = 10.0) -> T:
        """``fn(emulator)`` on the emulator's loop (a consistent view)."""

        async def call(e: Emulator) -> T:
            assert isinstance(e, CountingEmulator)
            return fn(e)

        return self.call(call, timeout)

    def records(self, since: int = 0) -> list[Record]:
        return self.read(lambda e: e.records[since:])

    def served(self) -> tuple[int, int]:
        """(unrelated pod objects, slot pod watch events) served to the operator so far."""
        return self.read(lambda e: (e.unrelated_served, e.slot_events_served))

    def expect(self, pool: str, slots: int) -> None:
        self.read(lambda e: e.expected.__setitem__(pool, slots))

    def all_ready_at(self, pool: str) -> float | None:
        return self.read(lambda e: e.all_ready_at.get(pool))


def seed_unrelated(kube: EmulatorThread, count: int) -> None:
    """``count`` unrelated pods, stored past admission (as if there long before)."""

    async def put_all(e: Emulator) -> None:
        for i in range(count):
            pod = {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    "name": f"unrelated-{i}",
                    "namespace": NAMESPACE,
                    "labels": UNRELATED_LABELS[i % len(UNRELATED_LABELS)],
                },
                "spec": {"containers": [{"name": "app", "image": "registry.example/app:1"}]},
            }
            await e.put_object(PODS, pod, admission=False)

    kube.call(put_all, timeout=60.0 + count / 50)


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (all its threads) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class OperatorProcess(ChildProcess):
    """``apipool operator`` as a child process, stopped with SIGTERM (then SIGKILL)."""

    what = "operator"

    def __init__(self) -> None:
        script = Path(sysconfig.get_path("scripts")) / "apipool"
        cmd = [str(script)] if script.exists() else [sys.executable, "-m", "apipool"]
        env = subprocess_env(
            KUBECONFIG=str(KUBECONFIG),
            APIPOOL_WATCH_NAMESPACES=NAMESPACE,
            APIPOOL_LIVENESS_ENDPOINT="",
            APIPOOL_METRICS_PORT="0",
        )
        env.pop("KUBERNETES_SERVICE_HOST", None)  # never the in-cluster configuration
        super().__init__([*cmd, "operator"], env, STOP_TIMEOUT)


@contextlib.contextmanager
def _cluster(unrelated: int) -> Iterator[tuple[CountingEmulatorThread, Cluster]]:
    """A redis-server, the emulator with the chart's RBAC and the unrelated pods,
    the kubeconfig with the operator's token, and the Secret ``redis``."""
    kubernetes = import_operator_modules()["kubernetes"]
    server = RedisServer()
    server.start()
    try:
        kube = CountingEmulatorThread(pod_grace=0.0, auto_ready=0.0, rbac=make_rbac("chart"))
        kube.start()
        try:
            write_kubeconfig(kube.url, OPERATOR_TOKEN)
            cluster = Cluster(kube, kubernetes, server.url)
            try:
                cluster.put_secret("redis", {"url": server.url})
                seed_unrelated(kube, unrelated)
                yield kube, cluster
            finally:
                cluster.close()
        finally:
            kube.stop()
    finally:
        server.close()


def _quiet_since(kube: CountingEmulatorThread, op: OperatorProcess, since: int) -> bool:
    """The operator sent nothing for ``QUIET`` seconds (records after ``since``)."""
    op.check_alive()
    last = [r.at for r in kube.records(since) if r.operator]
    return not last or time.monotonic() - max(last) >= QUIET


def _wait_started(kube: CountingEmulatorThread, op: OperatorProcess, since: int) -> None:
    """Until the operator (started after record ``since``) watches pools and pods
    and has gone quiet."""

    def watching() -> bool:
        op.check_alive()
        seen = {r.plural for r in kube.records(since) if r.operator and r.action == "WATCH"}
        return {PLURAL, "pods"} <= seen

    wait_for(watching, 60.0, interval=0.1, what="the operator's watches")
    wait_for(lambda: _quiet_since(kube, op, since), 60.0, interval=0.1, what="an idle operator")


def _settled(cluster: Cluster, pool: str, slots: int) -> bool:
    status = cluster.status(pool)
    return status.get("readySlots") == slots and status.get("observedGeneration") == 1


@dataclass(frozen=True)
class Sample:
    """What one N measured."""

    slots: int
    create_s: float
    requests: int
    pod_lists: int
    reconciles: int
    pod_events: int
    cpu_s: float
    rss_mib: float
    idle_rss_mib: float
    delete_requests: int


def _create_and_wait(
    kube: CountingEmulatorThread, cluster: Cluster, op: OperatorProcess, pool: str, slots: int
) -> float:
    """Create the pool; wait until its N pods are Ready, its status says so and the
    operator is quiet. Returns how long until the pods were Ready."""
    timeout = 60.0 + slots * 0.5
    kube.expect(pool, slots)
    mark = len(kube.records())
    started = time.monotonic()
    cluster.create_pool(pool, slots=slots)
    ready_at = wait_for(lambda: kube.all_ready_at(pool), timeout, interval=0.05, what=pool)
    wait_for(lambda: _settled(cluster, pool, slots), timeout, interval=0.1, what="status")
    wait_for(lambda: _quiet_since(kube, op, mark), timeout, interval=0.1, what="quiet")
    assert ready_at is not None  # wait_for returned it: truthy
    return ready_at - started


def _delete_and_wait(
    kube: CountingEmulatorThread, cluster: Cluster, op: OperatorProcess, pool: str, slots: int
) -> int:
    """Delete the pool; wait until its pods are gone and the operator is quiet.
    Returns how many requests the operator sent meanwhile."""
    timeout = 60.0 + slots * 0.5
    mark = len(kube.records())
    cluster.delete_pool(pool)
    wait_for(lambda: not cluster.pods(pool), timeout, interval=0.2, what=f"{pool} gone")
    wait_for(lambda: _quiet_since(kube, op, mark), timeout, interval=0.1, what="quiet")
    return sum(1 for r in kube.records(mark) if r.operator)


def _measure(kube: CountingEmulatorThread, cluster: Cluster, slots: int) -> Sample:
    """A fresh operator, warmed up on a 1-slot pool; a pool of ``slots``: the
    figures; then the pool deleted and the operator stopped."""
    pool = f"scale-{slots}"
    op = OperatorProcess()
    try:
        begun = len(kube.records())
        op.start()
        _wait_started(kube, op, begun)
        idle_rss = peak_rss_mib(op.pid)
        # First-use costs (lazy imports, API clients, kopf's executor) out of the window.
        _create_and_wait(kube, cluster, op, f"warm-up-{slots}", 1)
        _delete_and_wait(kube, cluster, op, f"warm-up-{slots}", 1)
        wait_for(lambda: _quiet_since(kube, op, begun), 30.0, interval=0.1, what="quiet")
        cpu0, mark, (_, events0) = _cpu_seconds(op.pid), len(kube.records()), kube.served()
        create_s = _create_and_wait(kube, cluster, op, pool, slots)
        cpu_s, rss = _cpu_seconds(op.pid) - cpu0, peak_rss_mib(op.pid)
        records = [r for r in kube.records(mark) if r.operator]
        _, events1 = kube.served()
        delete_requests = _delete_and_wait(kube, cluster, op, pool, slots)
    finally:
        op.stop()
    return Sample(
        slots=slots,
        create_s=create_s,
        requests=len(records),
        pod_lists=sum(1 for r in records if r.plural == "pods" and r.action == "LIST"),
        reconciles=sum(
            1
            for r in records
            if r.method == "PATCH" and r.plural == PLURAL and r.subresource == "status"
        ),
        pod_events=events1 - events0,
        cpu_s=cpu_s,
        rss_mib=rss,
        idle_rss_mib=idle_rss,
        delete_requests=delete_requests,
    )


def unselective_pod_reads(records: list[Record]) -> int:
    """The operator's pod lists and watches whose selector matches an unrelated pod."""
    count = 0
    for r in records:
        if r.operator and r.plural == "pods" and r.list_or_watch:
            matchers = parse_label_selector(r.selector or "")
            if any(all(m(labels) for m in matchers) for labels in UNRELATED_LABELS):
                count += 1
    return count


def _figures(sample: Sample) -> Figures:
    n = sample.slots
    return {
        f"n{n}_create_s": round(sample.create_s, 2),
        f"n{n}_requests": sample.requests,
        f"n{n}_requests_per_pod": round(sample.requests / n, 2),
        f"n{n}_pod_lists": sample.pod_lists,
        f"n{n}_reconciles": sample.reconciles,
        f"n{n}_pod_events": sample.pod_events,
        f"n{n}_reconciles_per_event": round(sample.reconciles / max(1, sample.pod_events), 3),
        f"n{n}_cpu_s": round(sample.cpu_s, 2),
        f"n{n}_cpu_ms_per_pod": round(sample.cpu_s * 1000.0 / n, 2),
        f"n{n}_rss_mib": sample.rss_mib,
        f"n{n}_idle_rss_mib": sample.idle_rss_mib,
        f"n{n}_delete_requests_per_pod": round(sample.delete_requests / n, 2),
    }


def run(*, quick: bool = False, seed: int = 1) -> Figures:
    sizes = QUICK_SIZES if quick else SIZES
    unrelated = QUICK_UNRELATED if quick else UNRELATED
    with _cluster(unrelated) as (kube, cluster):
        samples = [_measure(kube, cluster, n) for n in sizes]
        unrelated_served, _ = kube.served()
        every = kube.records()
    small, large = samples[0], samples[-1]
    requests_ratio = (large.requests / large.slots) / max(1e-9, small.requests / small.slots)
    cpu_ratio = (large.cpu_s / large.slots) / max(1e-9, small.cpu_s / small.slots)
    figures: Figures = {"unrelated_pods": unrelated}
    for sample in samples:
        figures.update(_figures(sample))
    tag = f"{large.slots}_vs_{small.slots}"
    figures[f"requests_ratio_{tag}"] = round(requests_ratio, 3)
    figures[f"cpu_ratio_{tag}"] = round(cpu_ratio, 3)
    figures[f"cost_ratio_{tag}"] = round(max(requests_ratio, cpu_ratio), 3)
    figures["operator_pod_reads"] = sum(
        1 for r in every if r.operator and r.plural == "pods" and r.list_or_watch
    )
    figures["unselective_pod_reads"] = unselective_pod_reads(every)
    figures["unrelated_pods_served"] = unrelated_served
    return figures
