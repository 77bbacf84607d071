"""The cap under chaos through the Kubernetes path: load, faults, figures.

:class:`Load` keeps the pool's queue full of ``http`` jobs calling the stand-in
and remembers every job it submitted; :class:`KubeChaos` injects one fault at a
time through the processes, the API or the pool's spec, waits for recovery,
and turns the stand-in's timeline and the jobs' results into one JSON-ready
dict.

Recovery of a fault is the time from the fault until the stand-in again serves
``slots`` calls at once (counted after one call duration, so that a victim's
last call does not count as its replacement's).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import threading
import time
import urllib.request
from collections.abc import Callable
from typing import Any

import redis

from apipool.envelope import make_envelope
from apipool.operator.manifests import HEALTH_PORT, LABEL_HASH
from apipool.protocol import PoolProtocol
from apipool.testing.harness.result import OutcomeTally, full_again
from apipool.testing.harness.run import OUTCOME_CHUNK
from apipool.testing.polling import WaitTimeout, wait_for

from .cluster import LocalCluster

CONTAINER_DEATH = 0.05
"""Seconds a container's processes may take to die after its first one is SIGKILLed."""


class Load:
    """A producer thread keeping ``depth`` jobs queued."""

    def __init__(self, cluster: LocalCluster, pool: str, depth: int) -> None:
        self.proto = PoolProtocol(pool)
        self.keys = self.proto.keys
        self.r = redis.Redis.from_url(cluster.redis.url, socket_timeout=2.0)
        self.url = f"{cluster.api.url}/work?ms={cluster.call_ms:g}"
        self.depth = depth
        self.accepted: list[str] = []
        self.uncertain: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="load", daemon=True)

    def start(self) -> Load:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                missing = self.depth - int(self.r.llen(self.keys.queue))
                if missing > 0:
                    envs = [
                        make_envelope({"method": "GET", "url": self.url}) for _ in range(missing)
                    ]
                    try:
                        self.proto.submit([e.to_json() for e in envs]).run(self.r)
                    except redis.RedisError:
                        self.uncertain.extend(e.id for e in envs)
                        raise
                    self.accepted.extend(e.id for e in envs)
            except redis.RedisError:
                self._stop.wait(0.2)
                continue
            self._stop.wait(0.02)

    def unfinished(self, slots: int) -> int:
        pipe = self.r.pipeline(transaction=False)
        pipe.llen(self.keys.queue)
        for i in range(slots):
            pipe.llen(self.keys.inflight(i))
        return sum(int(n) for n in pipe.execute())

    def outcomes(self) -> dict[str, int]:
        ids = self.accepted + self.uncertain
        tally = OutcomeTally()
        for start in range(0, len(ids), OUTCOME_CHUNK):
            chunk = ids[start : start + OUTCOME_CHUNK]
            pipe = self.r.pipeline(transaction=False)
            tally.queue_reads(pipe, self.keys, chunk)
            tally.add_reads(chunk, pipe.execute(), len(self.accepted) - start)
        counts = dict(tally.counts)
        counts["submitted"] = len(self.accepted) + len(tally.landed)
        return counts


@dataclasses.dataclass
class FaultRecord:
    kind: str
    at: float
    """Seconds since the stand-in's counters were reset."""
    target: str
    recovery_s: float | None = None
    note: str = ""


class KubeChaos:
    """Faults one after another against pool ``pool`` of ``slots`` slots."""

    def __init__(self, cluster: LocalCluster, pool: str, slots: int) -> None:
        self.c = cluster
        self.pool = pool
        self.slots = slots
        self.faults: list[FaultRecord] = []

    # -- time and the stand-in's view -----------------------------------------------------

    def now(self) -> float:
        stats = self.c.api.stats(include_samples=False)
        return stats.elapsed_seconds

    def in_flight_reached(self, since: float, count: int) -> float | None:
        """When the stand-in served ``count`` calls at once again after ``since``."""
        return full_again(self.c.api.stats().samples, since, count)

    def wait_full(self, since: float, timeout: float, what: str) -> float:
        """Wait until the stand-in serves ``slots`` calls at once after ``since``."""
        found = wait_for(
            lambda: self.in_flight_reached(since, self.slots),
            timeout,
            interval=0.05,
            what=what,
        )
        return float(found)

    def settle(self, seconds: float = 1.0) -> None:
        """Every slot pod Ready and the pool at full width, then a quiet pause."""
        self.c.wait_pool_ready(self.pool, self.slots)
        self.wait_full(self.now(), 60.0, "the pool at full width")
        time.sleep(seconds)

    def _record(
        self,
        kind: str,
        target: str,
        inject: Callable[[], str],
        timeout: float,
        *,
        look_after: float | None = None,
    ) -> None:
        """Inject a fault and wait for the pool at full width again. The fault's
        time is taken once ``inject`` has done it (finding the victim takes a few
        API and HTTP calls first). Full width is looked for from ``look_after``
        seconds on: by default one call's length (a victim's call is served to
        its end), 0 for a process SIGKILLed itself (its connection closes at once)."""
        note = inject()
        at = self.now()
        record = FaultRecord(kind, at, target, note=note)
        self.faults.append(record)
        delay = self.c.call_ms / 1000 + 0.05 if look_after is None else look_after
        try:
            found = self.wait_full(at + delay, timeout, f"recovery from {kind}")
            record.recovery_s = found - at
        except WaitTimeout:
            record.recovery_s = None
        self.settle()

    # -- the faults -----------------------------------------------------------------------

    def signal_slot(self, kind: str, index: int, sig: signal.Signals, timeout: float) -> None:
        pod = f"{self.pool}-slot-{index}"

        def inject() -> str:
            pid = self.c.node_of(pod).signal(pod, sig)
            return f"pid {pid}"

        # A SIGKILLed container's worker dies with its first process (the keeper),
        # a moment later: another slot's next call meanwhile is not the recovery.
        self._record(kind, pod, inject, timeout, look_after=CONTAINER_DEATH)

    def worker_pid(self, pod: str) -> int:
        """The pid of the slot's active worker: the one its /healthz answer names
        (under a keeper it is a child of the container's first process)."""
        ip = self.c.node_of(pod).pod_ip(pod)
        with urllib.request.urlopen(f"http://{ip}:{HEALTH_PORT}/healthz", timeout=2) as answer:
            return int(json.loads(answer.read())["pid"])

    def signal_worker(self, kind: str, index: int, sig: signal.Signals, timeout: float) -> None:
        pod = f"{self.pool}-slot-{index}"

        def inject() -> str:
            pid = self.worker_pid(pod)
            os.kill(pid, sig)
            return f"worker pid {pid}"

        self._record(kind, pod, inject, timeout, look_after=0.0 if sig == signal.SIGKILL else None)

    def delete_slot(self, kind: str, index: int, grace: int | None, timeout: float) -> None:
        pod = f"{self.pool}-slot-{index}"
        self._record(kind, pod, lambda: self.c.delete_pod(pod, grace=grace) or "", timeout)

    def scale(self, slots: int, timeout: float) -> None:
        before = self.slots
        at = self.now()
        self.c.patch_pool(self.pool, {"slots": slots})
        self.slots = slots
        record = FaultRecord("scale_down" if slots < before else "scale_up", at, f"{slots}")
        self.faults.append(record)
        if slots < before:
            # Until the pool is within its new size for good: the last moment the
            # stand-in saw more than ``slots`` calls at once.
            wait_for(
                lambda: len(self.c.pods(self.pool)) == slots, timeout, what="the surplus pod gone"
            )
            over = [t for t, _a, f in self.c.api.stats().samples if t >= at and f > slots]
            record.recovery_s = (max(over) - at) if over else 0.0
            self.settle()
        else:
            try:
                record.recovery_s = self.wait_full(at, timeout, "scale-up") - at
            except WaitTimeout:
                record.recovery_s = None
            self.settle()

    def change_template(self, timeout: float) -> None:
        old_hash = self.c.ready_pods(self.pool)[0]["metadata"]["labels"].get(LABEL_HASH)
        at = self.now()
        self.c.patch_pool(
            self.pool, {"template": {"annotations": {"example.com/rollout": str(time.time())}}}
        )
        record = FaultRecord("template_change", at, "all")
        self.faults.append(record)

        def rolled() -> bool:
            pods = self.c.ready_pods(self.pool)
            hashes = {p["metadata"]["labels"].get(LABEL_HASH) for p in pods}
            return len(pods) == self.slots and len(hashes) == 1 and old_hash not in hashes

        wait_for(rolled, timeout, interval=0.2, what="every slot pod replaced")
        record.recovery_s = self.wait_full(self.now(), 30.0, "full width after the roll") - at
        self.settle()

    # -- the figures ----------------------------------------------------------------------

    def figures(self, load: Load, limit: int) -> dict[str, Any]:
        stats = self.c.api.stats()
        outcomes = load.outcomes()
        recovery: dict[str, dict[str, Any]] = {}
        for record in self.faults:
            entry = recovery.setdefault(record.kind, {"max": None, "each": []})
            entry["each"].append(record.recovery_s)
            known = [x for x in entry["each"] if x is not None]
            entry["max"] = round(max(known), 3) if len(known) == len(entry["each"]) else None
        for entry in recovery.values():
            entry["each"] = [None if x is None else round(x, 3) for x in entry["each"]]
        capacity = limit * stats.elapsed_seconds
        return {
            "limit": limit,
            "max_concurrency": stats.max_concurrency,
            "max_in_flight": stats.max_in_flight,
            "over_limit_seconds": round(stats.over_limit_seconds, 3),
            "over_limit_events": stats.over_limit_events,
            "lost": outcomes.get("lost", 0),
            "duplicated": outcomes.get("duplicated", 0),
            "outcomes": outcomes,
            "goodput": round(stats.useful_seconds / capacity, 4) if capacity else 0.0,
            "utilisation": round(stats.utilisation, 4),
            "seconds": round(stats.elapsed_seconds, 1),
            "recovery_s": recovery,
            "faults": [dataclasses.asdict(f) for f in self.faults],
        }
