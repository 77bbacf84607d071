"""End to end on a kind cluster: the operator runs in the cluster and keeps an
ApiConcurrencyPool of 3 slot pods calling a stand-in API limited to 3
connections, while the test deletes slot pods, SIGKILLs a slot's process in
place and scales the pool down and up again under a continuous load.

What must hold (the stand-in counts connections itself, so nothing here relies
on the pool's own bookkeeping):

- the stand-in never saw more than 3 connections, never answered 429, and saw
  the pool use all 3;
- every job the test submitted has exactly one result (ok or dead);
- slot pods come back under their stable names (new UIDs after a deletion, the
  same pod with a restarted container after a SIGKILL);
- the pool's status and Events tell what happened.

Needs Docker, kind and kubectl (see README.md here); run with ``make e2e``.
"""

from __future__ import annotations

import collections
import datetime
import json
import threading
import time
import urllib.request
from typing import Any

import pytest
import redis

from apipool import Client, JobResult, RedisUnavailable, ResultTimeout
from apipool.layout import PoolKeys
from apipool.settings import Timings
from apipool.stats import read_stats

from .conftest import (
    CLUSTER,
    NAMESPACE,
    STANDIN_URL_IN_CLUSTER,
    E2EConfig,
    Kube,
    PortForward,
    load_manifest,
    log,
    pod_ready,
    run,
    wait_until,
)

# Covers building the image and creating the cluster, which the first test's
# setup does (the project's default per-test timeout is 120 s).
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(3600)]

POOL = "e2e"
SLOTS = 3
LIMIT = 3  # the stand-in's --limit (manifests/standin.yaml)
SLOT_NAMES = [f"{POOL}-slot-{i}" for i in range(SLOTS)]
SELECTOR = f"apipool.dev/pool={POOL}"
CALL_TIMEOUT = 5.0  # spec.callTimeoutSeconds (manifests/pool.yaml)
LIVENESS = {"periodSeconds": 1, "failureThreshold": 3, "timeoutSeconds": 2}
PAYLOAD = {"method": "GET", "url": f"{STANDIN_URL_IN_CLUSTER}/work?ms=200"}
QUEUE_TARGET = 30  # jobs kept waiting in the queue while the load runs
DRAIN_SECONDS = 180.0
POD_TIMEOUT = 180.0  # for a slot pod to be (re)created and become ready
TAKEOVER = "took over the lease of dead predecessor"


# -- helpers --------------------------------------------------------------------------


def flag(args: list[str], name: str) -> str | None:
    """The value that follows ``name`` in a container's args."""
    try:
        return args[args.index(name) + 1]
    except (ValueError, IndexError):
        return None


def container_status(pod: dict[str, Any], name: str = "slot") -> dict[str, Any]:
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    for status in statuses:
        if status["name"] == name:
            return dict(status)
    return {}


def timestamp(text: str) -> datetime.datetime:
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))


def pool_status(kube: Kube) -> dict[str, Any]:
    pool = kube.get("acp", POOL) or {}
    return dict(pool.get("status") or {})


def wait_for_pool(kube: Kube, slots: int, *, timeout: float = POD_TIMEOUT) -> dict[str, Any]:
    """Exactly the pods <pool>-slot-0..slots-1, all ready, and status.readySlots == slots."""
    expected = [f"{POOL}-slot-{i}" for i in range(slots)]

    def settled() -> dict[str, Any] | None:
        pods = kube.pods(SELECTOR)
        if sorted(pods) != expected or not all(pod_ready(p) for p in pods.values()):
            return None
        if pool_status(kube).get("readySlots") != slots:
            return None
        return pods

    return wait_until(
        settled,
        timeout=timeout,
        what=f"{slots} ready slot pods {expected} and status.readySlots == {slots}",
        diagnostics=kube.diagnostics,
    )


def slot_events(kube: Kube, reason: str) -> set[str]:
    return {
        str(e.get("message", ""))
        for e in kube.events("ApiConcurrencyPool", POOL)
        if e.get("reason") == reason
    }


def standin_stats(forward: PortForward) -> dict[str, Any]:
    """The stand-in's own counters (GET /stats?samples=0 through the port-forward)."""
    for attempt in range(3):
        try:
            url = f"http://{forward.address}/stats?samples=0"
            with urllib.request.urlopen(url, timeout=15) as response:
                return dict(json.load(response))
        except OSError:
            if attempt == 2:
                raise
            forward.ensure()
            time.sleep(1)
    raise AssertionError("unreachable")


# -- disruptions ----------------------------------------------------------------------


def delete_and_await_recreation(kube: Kube, names: list[str]) -> None:
    """Delete slot pods (gracefully); the operator creates them again under the
    same names, each only once its predecessor is gone: new UIDs, ready."""
    pods = kube.pods(SELECTOR)
    before = {name: pods[name]["metadata"]["uid"] for name in names}
    log(f"deleting {', '.join(names)}")
    kube("delete", "pod", *names, "-n", NAMESPACE, "--wait=false")

    def recreated() -> bool:
        now = kube.pods(SELECTOR)
        return all(
            name in now and now[name]["metadata"]["uid"] != before[name] and pod_ready(now[name])
            for name in names
        )

    wait_until(
        recreated,
        timeout=POD_TIMEOUT,
        what=f"{names} recreated (same names, new UIDs) and ready",
        diagnostics=kube.diagnostics,
    )
    log(f"{', '.join(names)} recreated with new UIDs")


def kill_in_place(kube: Kube, name: str) -> None:
    """SIGKILL the slot process of pod ``name``; the kubelet restarts the container
    in the same pod, whose new process takes the slot's lease over at once.

    The kill is sent from the kind node, not with ``kubectl exec``: the slot is
    PID 1 of its container, and the kernel drops a SIGKILL sent to a PID
    namespace's init from inside that namespace. From the node (an ancestor
    PID namespace) it is delivered like any SIGKILL.
    """
    pod = kube.get("pod", name)
    assert pod is not None, f"pod {name} does not exist"
    uid = pod["metadata"]["uid"]
    status = container_status(pod)
    restarts = int(status["restartCount"])
    container_id = str(status["containerID"])
    node = pod["spec"]["nodeName"]
    nodes = run(["kind", "get", "nodes", "--name", CLUSTER], timeout=60).stdout.split()
    assert node in nodes, f"pod {name} runs on {node}, not on a kind node of {CLUSTER}: {nodes}"
    runtime_id = container_id.split("://")[-1]  # containerd://<id>
    info = json.loads(
        run(["docker", "exec", node, "crictl", "inspect", runtime_id], timeout=60).stdout
    )
    pid = int(info["info"]["pid"])
    log(f"SIGKILL to the slot process of {name} (pid {pid} on node {node})")
    run(["docker", "exec", node, "sh", "-c", 'kill -KILL "$1"', "sh", str(pid)], timeout=30)

    def restarted() -> dict[str, Any] | None:
        now = kube.get("pod", name)
        if now is None:
            return None
        if now["metadata"]["uid"] != uid:
            pytest.fail(f"{name} was replaced by a new pod instead of restarted in place")
        s = container_status(now)
        if int(s.get("restartCount", 0)) > restarts and s.get("containerID") != container_id:
            return now if pod_ready(now) else None
        return None

    pod = wait_until(
        restarted,
        timeout=POD_TIMEOUT,
        what=f"{name} restarted in place and ready",
        diagnostics=kube.diagnostics,
    )
    status = container_status(pod)
    last = status["lastState"]["terminated"]
    assert last["exitCode"] == 137, f"{name}: the killed container ended with {last}"
    gap = timestamp(status["state"]["running"]["startedAt"]) - timestamp(last["finishedAt"])
    gap_seconds = gap.total_seconds()

    # The predecessor's lease outlives it by lease_ttl less up to one heartbeat;
    # a new process of the same pod (APIPOOL_OWNER carries the pod UID) takes it
    # over at once instead of waiting for it to expire. Only a container that
    # came back too late for that (timestamps have 1 s resolution, and the
    # interpreter takes a second or two to start) may find it expired.
    lease_ttl = Timings(call_timeout=CALL_TIMEOUT).lease_ttl
    quick = gap_seconds <= lease_ttl - 6.0

    def lease_line() -> str | None:
        text = kube("logs", name, "-n", NAMESPACE, "-c", "slot")
        if TAKEOVER in text or (not quick and "lease acquired" in text):
            return text
        return None

    wait_until(
        lease_line,
        timeout=30,
        what=(
            f"{name}'s new process to log {TAKEOVER!r} "
            f"(restarted {gap_seconds:.0f} s after the kill; lease TTL {lease_ttl:g} s)"
        ),
        diagnostics=kube.diagnostics,
    )
    log(f"{name} restarted in place after {gap_seconds:.0f} s and holds its lease again")


def scale(kube: Kube, slots: int) -> dict[str, Any]:
    log(f"kubectl scale acp/{POOL} --replicas={slots}")
    kube("scale", f"acp/{POOL}", f"--replicas={slots}", "-n", NAMESPACE)
    return wait_for_pool(kube, slots)


# -- the load -------------------------------------------------------------------------


class Feeder(threading.Thread):
    """Keeps about QUEUE_TARGET jobs waiting in the pool's queue until stopped,
    and records the id of every job Redis accepted."""

    def __init__(self, forward: PortForward) -> None:
        super().__init__(name="e2e-feeder", daemon=True)
        self.forward = forward
        url = f"redis://{forward.address}/0"
        self.client = Client(url, POOL)
        self.redis = redis.Redis.from_url(url, socket_timeout=5)
        self.queue_key = PoolKeys(POOL).queue
        self.ids: list[str] = []
        self.samples = 0
        self.dry_samples = 0  # the queue found empty after the first submission
        self.redis_errors = 0
        self.unknown_batches = 0  # submits whose answer was lost: maybe queued, not tracked
        self.error: BaseException | None = None
        self.last_submit = 0.0
        self._stop_event = threading.Event()

    def run(self) -> None:
        failing_since: float | None = None
        try:
            while not self._stop_event.is_set():
                try:
                    depth = int(self.redis.llen(self.queue_key))
                    self.samples += 1
                    if self.ids and depth == 0:
                        self.dry_samples += 1
                    if depth < QUEUE_TARGET:
                        try:
                            ids = self.client.submit_many([PAYLOAD] * (QUEUE_TARGET - depth))
                        except RedisUnavailable:
                            self.unknown_batches += 1
                            raise
                        self.ids.extend(ids)
                        self.last_submit = time.monotonic()
                    failing_since = None
                except (redis.RedisError, RedisUnavailable) as exc:
                    self.redis_errors += 1
                    failing_since = failing_since or time.monotonic()
                    if time.monotonic() - failing_since > 30:
                        raise RuntimeError(f"Redis unreachable for 30 s: {exc}") from exc
                    self.forward.ensure()
                    time.sleep(0.5)
                self._stop_event.wait(0.1)
        except BaseException as exc:
            self.error = exc
        finally:
            self.client.close()
            self.redis.close()

    def healthy(self) -> bool:
        """True while it runs; fails the test at once if it has failed."""
        if self.error is not None:
            pytest.fail(f"the feeder failed: {self.error!r}")
        return self.is_alive()

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=30)


def collect_results(forward: PortForward, ids: list[str]) -> tuple[dict[str, JobResult], list[str]]:
    """Client.wait for every job, within one overall drain deadline."""
    client = Client(f"redis://{forward.address}/0", POOL)
    deadline = time.monotonic() + DRAIN_SECONDS
    results: dict[str, JobResult] = {}
    missing: list[str] = []
    try:
        for job_id in ids:
            for attempt in range(3):
                try:
                    # Past the deadline, one quick look per job rather than none.
                    left = max(deadline - time.monotonic(), 0.05)
                    results[job_id] = client.wait(job_id, left)
                    break
                except ResultTimeout:
                    missing.append(job_id)
                    break
                except RedisUnavailable:
                    if attempt == 2:
                        raise
                    forward.ensure()
                    time.sleep(1)
    finally:
        client.close()
    return results, missing


# -- the tests ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def acp(deployed: Kube, e2e_config: E2EConfig) -> dict[str, Any]:
    """The pool ``e2e`` (manifests/pool.yaml with the image under test), up and ready."""
    (doc,) = load_manifest("pool.yaml")
    doc["metadata"]["namespace"] = NAMESPACE
    doc["spec"]["image"] = e2e_config.image
    log(f"creating ApiConcurrencyPool {POOL} ({SLOTS} slots)")
    deployed.apply([doc])
    wait_for_pool(deployed, SLOTS, timeout=300)
    pool = deployed.get("acp", POOL)
    assert pool is not None
    log(f"pool {POOL} is ready")
    return pool


def test_slot_pods_are_built_from_the_pool(deployed: Kube, acp: dict[str, Any]) -> None:
    pods = deployed.pods(SELECTOR)
    assert sorted(pods) == SLOT_NAMES
    for index, name in enumerate(SLOT_NAMES):
        pod = pods[name]
        meta, spec = pod["metadata"], pod["spec"]
        assert pod_ready(pod), name
        assert meta["labels"]["apipool.dev/pool"] == POOL
        assert meta["labels"]["apipool.dev/slot"] == str(index)

        owners = meta.get("ownerReferences") or []
        assert len(owners) == 1, f"{name}: {owners}"
        owner = owners[0]
        assert owner["apiVersion"] == "apipool.dev/v1alpha1"
        assert owner["kind"] == "ApiConcurrencyPool"
        assert owner["name"] == POOL
        assert owner["uid"] == acp["metadata"]["uid"]
        assert owner.get("controller") is True

        assert spec["restartPolicy"] == "Always"  # a killed slot restarts in its pod
        assert spec.get("automountServiceAccountToken") is False
        (container,) = spec["containers"]
        assert container["image"] == acp["spec"]["image"]
        args = container["args"]
        assert args[0] == "slot"
        assert flag(args, "--pool") == POOL
        assert flag(args, "--slot") == str(index)
        assert flag(args, "--handler") == "http"
        assert flag(args, "--call-timeout") == f"{CALL_TIMEOUT:g}"
        assert flag(args, "--health-host") == "0.0.0.0"
        assert flag(args, "--health-port") == "8080"
        env = {e["name"]: e for e in container.get("env", [])}
        assert env["APIPOOL_REDIS_URL"]["valueFrom"]["secretKeyRef"] == {
            "name": "redis",
            "key": "url",
        }

        ports = {p.get("name"): p["containerPort"] for p in container.get("ports", [])}
        assert ports.get("health") == 8080
        liveness = container["livenessProbe"]
        assert liveness["httpGet"]["path"] == "/healthz"
        assert liveness["httpGet"]["port"] in ("health", 8080)
        for key, value in LIVENESS.items():
            assert liveness[key] == value, f"{name}: livenessProbe.{key}"
        readiness = container["readinessProbe"]
        assert readiness["httpGet"]["path"] == "/readyz"

        security = container["securityContext"]
        assert security["runAsNonRoot"] is True
        assert security["runAsUser"] == 10001
        assert security["readOnlyRootFilesystem"] is True
        assert security["allowPrivilegeEscalation"] is False
        assert security["capabilities"]["drop"] == ["ALL"]

    # What the container really runs as, and that its root filesystem is read-only.
    name = SLOT_NAMES[0]
    uid = deployed("exec", name, "-n", NAMESPACE, "-c", "slot", "--", "id", "-u").strip()
    assert uid == "10001"
    write = run(
        deployed.argv(
            "exec",
            name,
            "-n",
            NAMESPACE,
            "-c",
            "slot",
            "--",
            "python",
            "-c",
            "open('/tmp/apipool-e2e-probe', 'w')",
        ),
        timeout=60,
        check=False,
    )
    assert write.returncode != 0
    assert "Read-only file system" in write.stderr


def test_cap_and_results_hold_under_load_and_disruption(
    deployed: Kube,
    acp: dict[str, Any],
    redis_forward: PortForward,
    standin_forward: PortForward,
    e2e_config: E2EConfig,
) -> None:
    kube = deployed
    wait_for_pool(kube, SLOTS)
    uids_at_start = {n: p["metadata"]["uid"] for n, p in kube.pods(SELECTOR).items()}

    feeder = Feeder(redis_forward)
    started = time.monotonic()
    feeder.start()
    try:
        wait_until(
            lambda: feeder.healthy() and len(feeder.ids) >= QUEUE_TARGET,
            timeout=60,
            what="the first jobs to be queued",
        )
        wait_until(
            lambda: standin_stats(standin_forward)["ok_total"] > 0,
            timeout=60,
            what="the slots to call the stand-in API",
            diagnostics=kube.diagnostics,
        )

        # 1. A slot pod deleted: recreated under its name once the old one is gone.
        delete_and_await_recreation(kube, [SLOT_NAMES[0]])
        # 2. A slot's process SIGKILLed: restarted in place, takes its lease over.
        kill_in_place(kube, SLOT_NAMES[1])
        # 3. Scaled down and up again with `kubectl scale` (the scale subresource).
        scale(kube, SLOTS - 1)
        wait_until(
            lambda: any(
                m.startswith(f"deleted {SLOT_NAMES[-1]}") for m in slot_events(kube, "SlotDeleted")
            ),
            timeout=30,
            what=f"a SlotDeleted Event for {SLOT_NAMES[-1]}",
            diagnostics=kube.diagnostics,
        )
        scale(kube, SLOTS)
        # 4. Two slot pods deleted at once.
        delete_and_await_recreation(kube, [SLOT_NAMES[0], SLOT_NAMES[2]])

        while time.monotonic() - started < e2e_config.load_seconds:
            assert feeder.healthy(), "the feeder stopped"
            time.sleep(1)
        assert time.monotonic() - feeder.last_submit < 10, "the feeder stopped submitting"
    finally:
        feeder.stop()
    load_seconds = time.monotonic() - started
    assert not feeder.is_alive(), "the feeder did not stop"
    assert feeder.error is None, f"the feeder failed: {feeder.error!r}"
    ids = list(feeder.ids)
    log(
        f"load over after {load_seconds:.0f} s: {len(ids)} jobs submitted, "
        f"queue found empty in {feeder.dry_samples}/{feeder.samples} samples, "
        f"{feeder.redis_errors} Redis errors, port-forward restarts: {redis_forward.restarts}"
    )

    # Pods were replaced under stable names: every slot has a new UID by now
    # except slot 1, which was only restarted in place.
    uids_now = {n: p["metadata"]["uid"] for n, p in kube.pods(SELECTOR).items()}
    assert sorted(uids_now) == SLOT_NAMES
    assert uids_now[SLOT_NAMES[1]] == uids_at_start[SLOT_NAMES[1]]
    for name in (SLOT_NAMES[0], SLOT_NAMES[2]):
        assert uids_now[name] != uids_at_start[name], name

    # Every job's result (Client.wait), and how many result entries each one has.
    results, missing = collect_results(redis_forward, ids)
    r = redis.Redis.from_url(f"redis://{redis_forward.address}/0", socket_timeout=10)
    try:
        keys = PoolKeys(POOL)
        pipe = r.pipeline(transaction=False)
        for job_id in ids:
            pipe.llen(keys.result(job_id))
        lengths = pipe.execute()

        def drained() -> bool:
            stats = read_stats(r, POOL)
            return stats.queued == 0 and sum(stats.inflight.values()) == 0

        wait_until(drained, timeout=60, what="the pool's queue and in-flight lists to drain")
        counters = read_stats(r, POOL).counters
    finally:
        r.close()
    not_one = {job_id: n for job_id, n in zip(ids, lengths, strict=True) if int(n) != 1}
    statuses = collections.Counter(result.status for result in results.values())
    stats = standin_stats(standin_forward)
    log(
        f"results {dict(statuses)}, {len(missing)} missing; pool counters {counters}; "
        f"stand-in: max_concurrency={stats['max_concurrency']} ok_total={stats['ok_total']} "
        f"rejected_total={stats['rejected_total']} "
        f"over_limit_seconds={stats['over_limit_seconds']} "
        f"connections_total={stats['connections_total']}"
    )

    # I1: the stand-in's own count of open connections never went over its limit.
    assert stats["limit"] == LIMIT
    assert stats["max_concurrency"] <= LIMIT, stats["over_limit_events"]
    assert stats["over_limit_seconds"] == 0, stats["over_limit_events"]
    assert stats["rejected_total"] == 0
    assert stats["ok_total"] > 0
    # The pool did use its whole limit, so the cap was tested at its edge.
    assert stats["max_concurrency"] == LIMIT

    # I2: every accepted job has exactly one result (ok or dead).
    assert not missing, (
        f"{len(missing)} of {len(ids)} jobs got no result within {DRAIN_SECONDS:g} s, "
        f"e.g. {missing[:5]}"
    )
    assert not not_one, f"jobs with other than exactly one result: {list(not_one.items())[:5]}"
    assert set(statuses) <= {"ok", "dead"}, statuses
    assert statuses["ok"] > 0, statuses
    bad = [res for res in results.values() if res.status == "ok" and res.result["status"] != 200]
    assert not bad, f"ok results without HTTP 200: {bad[:3]}"
    # Each ok result is a 200 the stand-in counted (a slot killed after its
    # call may have made the stand-in count one more than there are results).
    assert stats["ok_total"] >= statuses["ok"]


def test_pool_status_and_events(deployed: Kube, acp: dict[str, Any]) -> None:
    def settled() -> dict[str, Any] | None:
        pool = deployed.get("acp", POOL)
        if pool is None:
            return None
        status = pool.get("status") or {}
        conditions = {c.get("type"): c for c in status.get("conditions") or []}
        ready = conditions.get("Ready", {}).get("status") == "True"
        current = status.get("observedGeneration") == pool["metadata"].get("generation")
        if status.get("readySlots") == SLOTS and ready and current:
            return pool
        return None

    pool = wait_until(
        settled,
        timeout=120,
        what=f"status.readySlots == {SLOTS} with Ready=True for the current generation",
        diagnostics=deployed.diagnostics,
    )
    status = pool["status"]
    log(f"kubectl get acp:\n{deployed('get', 'acp', POOL, '-n', NAMESPACE)}")
    assert status["desiredSlots"] == SLOTS
    assert f"apipool.dev/pool={POOL}" in status["selector"]
    conditions = {c["type"]: c for c in status["conditions"]}
    assert set(conditions) >= {"Ready", "Progressing", "Degraded"}
    assert conditions["Degraded"]["status"] == "False", conditions["Degraded"]
    # The operator reads the pool's Redis through the Secret for these.
    for key in ("queueDepth", "busySlots", "deadLetters"):
        assert key in status, f"status.{key} missing: {status}"

    created = slot_events(deployed, "SlotCreated")
    assert {f"created {name}" for name in SLOT_NAMES} <= created, created
