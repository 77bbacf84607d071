"""The operator's reaction times: a deleted slot pod replaced, a spec change rolled out.

The kopf operator runs in a thread of this process (``tests.operator.conftest``'s
``OperatorThread``, the registry of ``apipool.operator.controller``) against the
Kubernetes API emulator of the operator tests (``tests.operator.emulator``,
behind a real HTTP port on 127.0.0.1), with the tests' operator settings but the
default 10 s self-healing timer, so every reaction measured here comes from a
watch event, not from the timer. The pool's
Secret ``redis`` points at a throwaway redis-server, so the pool can be Ready.

Every time is read in an observer of the emulator's store (called at every
committed change, on the emulator's thread, with ``time.monotonic()``), so a
change is timed when the API server commits it and sends its watch event.

- ``replace``: a 5-slot pool, all Ready. One slot pod, picked at random, is
  deleted through the API (``DELETE``, as ``kubectl delete pod`` does) while the
  emulator removes deleted pods at once (grace 0): the time from the commit of
  the removal (the ``DELETED`` event) to the commit of the replacement's create
  (its ``ADDED``). ``replace_from_request`` starts the clock before the client
  sends the ``DELETE`` instead. Before each deletion the pool has settled (5
  Ready pods, a status that says so) and stayed idle for a moment.
- ``rollout``: ``spec.image`` of the same pool (``maxUnavailable`` 1) is changed
  while the emulator makes a new pod Ready 50 ms after its creation and removes
  a deleted pod after 50 ms of grace: the time from before the ``PATCH`` to the
  first commit at which all 5 pods carry the new template hash, are Ready and
  none is terminating. ``rollout_peak_pods`` is the most slot pod objects
  (terminating ones included) and ``rollout_peak_unavailable`` the most slots
  not Ready or terminating or missing, at any commit during the rollouts.

The emulator's request log is emptied before each deletion and each spec change
(see :func:`_forget_requests`): kmock scans it on every request, so otherwise
the emulator would get slower the longer the run.
"""

from __future__ import annotations

import atexit
import dataclasses
import logging
import random
import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from tests.operator.conftest import (
    IMAGE,
    KUBECONFIG,
    OPERATOR_SETTINGS,
    PODS,
    Cluster,
    OperatorThread,
    import_operator_modules,
    write_kubeconfig,
)
from tests.operator.emulator import Emulator, EmulatorThread

from apipool.operator.config import OperatorSettings
from apipool.operator.manifests import LABEL_HASH, LABEL_POOL
from apipool.testing.polling import wait_for
from apipool.testing.redis_server import RedisServer

from .common import Figures, Target, maximum, median, percentile

SLOTS = 5
TIMER_INTERVAL = OperatorSettings.timer_interval
"""The operator's default self-healing interval: far longer than any reaction here."""
AUTO_READY = 0.05
"""Seconds until the emulator's stand-in kubelet makes a new pod Ready."""
ROLLOUT_GRACE = 0.05
"""Seconds a deleted pod stays Terminating during the rollouts."""
IDLE = 0.2
"""Pause after the pool has settled, before the next deletion or spec change."""

TARGETS = {
    "replace_p90_ms": Target("<=", 200.0),
    "rollout_peak_pods": Target("<=", SLOTS),
    "rollout_peak_unavailable": Target("<=", 1),
}

# tests.operator.conftest made a directory for the kubeconfig when it was imported.
atexit.register(shutil.rmtree, KUBECONFIG.parent, True)


def _is_ready(pod: dict[str, Any]) -> bool:
    conditions = (pod.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


class Tracker:
    """An observer of the emulator's store: when each slot pod object of a pool
    appeared and went, and how a rollout goes."""

    def __init__(self, pool: str) -> None:
        self.pool = pool
        self.lock = threading.Lock()
        self.names: dict[str, str] = {}  # uid -> name, of every pod object seen
        self.created: dict[str, float] = {}  # uid -> when its ADDED was committed
        self.removed: dict[str, float] = {}  # uid -> when its DELETED was committed
        self._live: set[str] = set()
        # The rollout under way: the old template hash, and what the commits showed.
        self.old_hash: str | None = None
        self.done_at: float | None = None
        self.peak_pods = 0
        self.peak_unavailable = 0

    def __call__(self, emulator: Emulator) -> None:
        now = time.monotonic()
        pods = {
            pod["metadata"]["uid"]: pod
            for _, pod in emulator.live(PODS)
            if (pod["metadata"].get("labels") or {}).get(LABEL_POOL) == self.pool
        }
        with self.lock:
            for uid in pods.keys() - self._live:
                self.names[uid] = pods[uid]["metadata"]["name"]
                self.created[uid] = now
            for uid in self._live - pods.keys():
                self.removed[uid] = now
            self._live = set(pods)
            if self.old_hash is None or self.done_at is not None:
                return
            available = [
                pod
                for pod in pods.values()
                if _is_ready(pod) and not pod["metadata"].get("deletionTimestamp")
            ]
            self.peak_pods = max(self.peak_pods, len(pods))
            self.peak_unavailable = max(self.peak_unavailable, SLOTS - len(available))
            updated = [
                pod
                for pod in available
                if pod["metadata"]["labels"].get(LABEL_HASH) != self.old_hash
            ]
            if len(pods) == SLOTS and len(updated) == SLOTS:
                self.done_at = now

    def uid_of(self, name: str) -> str:
        with self.lock:
            (uid,) = [u for u in self._live if self.names[u] == name]
            return uid

    def replaced(self, name: str, old_uid: str) -> tuple[float, float] | None:
        """When ``old_uid`` went and a pod object named ``name`` was created after it
        (None: not yet)."""
        with self.lock:
            removed = self.removed.get(old_uid)
            if removed is None:
                return None
            for uid, seen in self.names.items():
                if seen == name and uid != old_uid and self.created[uid] >= removed:
                    return removed, self.created[uid]
            return None

    def begin_rollout(self, old_hash: str) -> None:
        with self.lock:
            self.old_hash, self.done_at = old_hash, None

    def rollout_done(self) -> float | None:
        with self.lock:
            return self.done_at


SETTINGS = dataclasses.replace(OPERATOR_SETTINGS, timer_interval=TIMER_INTERVAL)
"""The tests' operator settings (no metrics port, no liveness endpoint, a 1 s Redis
timeout), with the operator's default timer, so that nothing measured comes from it."""


@contextmanager
def _quiet_kopf() -> Iterator[None]:
    """kopf's warnings about its own start and stop in a thread, not worth showing."""
    kopf_log = logging.getLogger("kopf")
    level = kopf_log.level
    kopf_log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        kopf_log.setLevel(level)


@contextmanager
def _cluster() -> Iterator[Cluster]:
    """A redis-server, the emulator, the Secret ``redis``, and the operator running."""
    modules = import_operator_modules()
    server = RedisServer()
    server.start()
    try:
        kube = EmulatorThread(pod_grace=0.0, auto_ready=AUTO_READY).start()
        try:
            write_kubeconfig(kube.url)
            cluster = Cluster(kube, modules["kubernetes"], server.url)
            try:
                cluster.put_secret("redis", {"url": server.url})
                with _quiet_kopf():  # running not in the main thread: no OS signals
                    op = OperatorThread(modules, SETTINGS).start()
                try:
                    yield cluster
                finally:
                    with _quiet_kopf():  # handlers and idle workers cancelled at exit
                        op.stop()
            finally:
                cluster.close()
        finally:
            kube.stop()
    finally:
        server.close()


def _settled(cluster: Cluster, pool: str) -> bool:
    """Exactly the slots, all Ready, one template hash, and a status that says so."""
    if not cluster.slots_are(pool, range(SLOTS)):
        return False
    pods = cluster.pods(pool).values()
    if not all(_is_ready(pod) for pod in pods):
        return False
    if len({pod["metadata"]["labels"].get(LABEL_HASH) for pod in pods}) != 1:
        return False
    body = cluster.pool(pool)
    status = body.get("status") or {}
    return (
        status.get("observedGeneration") == body["metadata"]["generation"]
        and status.get("readySlots") == SLOTS
        and status.get("updatedSlots") == SLOTS
    )


def _settle(cluster: Cluster, pool: str) -> None:
    wait_for(lambda: _settled(cluster, pool), 30.0, what=f"{SLOTS} Ready slots of {pool}")
    time.sleep(IDLE)


async def _forget_requests(emulator: Emulator) -> None:
    """Empty the emulator's request log (kmock 0.8's ``RawHandler._requests``).

    kmock matches every request against its reactions by scanning the whole log,
    so each request costs more the more were served before it (a GET took about
    2 ms with an empty log, 60 ms after 1000 requests): left alone, that growth,
    not the operator, would set the figures of a long run. Called while the pool is
    idle: the ids of new requests start again from 0, far below those of any
    request still in flight. ``Cluster.mark``/``calls`` are not used here.
    """
    emulator._requests.clear()


def _wait_replaced(
    tracker: Tracker, name: str, old_uid: str, timeout: float
) -> tuple[float, float]:
    """Poll until ``name`` was removed and created again: (removed at, created at)."""
    return wait_for(
        lambda: tracker.replaced(name, old_uid),
        timeout,
        interval=0.002,
        what=f"{name} to be replaced",
    )


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 1)


def run(*, quick: bool = False, seed: int = 1) -> Figures:
    deletes = 5 if quick else 30
    rollouts = 1 if quick else 3
    rng = random.Random(seed)
    replace: list[float] = []
    from_request: list[float] = []
    durations: list[float] = []
    pool = "bench-operator"
    tracker = Tracker(pool)

    with _cluster() as cluster:
        cluster.kube.observe(tracker)
        cluster.create_pool(pool, slots=SLOTS)

        # Delete -> replacement created (grace 0: the pod goes at once).
        for _ in range(deletes):
            _settle(cluster, pool)
            cluster.kube.call(_forget_requests)
            victim = f"{pool}-slot-{rng.randrange(SLOTS)}"
            old_uid = tracker.uid_of(victim)
            sent = time.monotonic()
            cluster.delete_pod(victim)
            removed, created = _wait_replaced(tracker, victim, old_uid, 10.0)
            replace.append(created - removed)
            from_request.append(created - sent)

        # Spec change -> every slot replaced and Ready (kill before replace).
        cluster.emulator.pod_grace = ROLLOUT_GRACE  # read at each DELETE
        for i in range(rollouts):
            _settle(cluster, pool)
            cluster.kube.call(_forget_requests)
            (old_hash,) = {p["metadata"]["labels"][LABEL_HASH] for p in cluster.pods(pool).values()}
            tracker.begin_rollout(old_hash)
            started = time.monotonic()
            cluster.patch_spec(pool, image=f"{IMAGE.rsplit(':', 1)[0]}:0.{i + 2}.0")
            wait_for(tracker.rollout_done, 60.0, interval=0.005, what="the rollout")
            done = tracker.rollout_done()
            assert done is not None
            durations.append(done - started)
        errors = list(cluster.emulator.observer_errors)
        if errors:
            raise RuntimeError(f"the emulator's observer failed: {errors[0]!r}") from errors[0]

    return {
        "slots": SLOTS,
        "deletes": deletes,
        "replace_p50_ms": _ms(percentile(replace, 50)),
        "replace_p90_ms": _ms(percentile(replace, 90)),
        "replace_max_ms": _ms(maximum(replace)),
        "replace_from_request_p50_ms": _ms(percentile(from_request, 50)),
        "replace_from_request_p90_ms": _ms(percentile(from_request, 90)),
        "rollouts": rollouts,
        "rollout_s_median": round(median(durations), 3),
        "rollout_s_max": round(maximum(durations), 3),
        "rollout_peak_pods": tracker.peak_pods,
        "rollout_peak_unavailable": tracker.peak_unavailable,
    }
