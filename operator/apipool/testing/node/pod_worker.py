"""One pod on the local node: its containers' runs, probes, restarts and status.

A :class:`PodWorker` owns a pod (by UID) from its admission by the node to its
end: the pod's network namespace, a :class:`ContainerRunner` per container, and
a status writer that patches ``pods/<name>/status`` whenever what the node knows
changed. The kubelet's rules it keeps (see ``kubelet-facts.md`` in the notes):

- a container exit is noticed at the next relist (``relist`` seconds), not at once;
- startup, liveness and readiness probes run on their own periods from the
  container's start; an unstarted container's liveness and readiness probes are
  not run; ``failureThreshold`` failures of startup or liveness kill it
  (SIGTERM, the probe's ``terminationGracePeriodSeconds`` or else the pod's,
  SIGKILL), readiness only flips ``ready``;
- every kill waits at least 2 s (the kubelet's minimum grace);
- restarts follow ``restartPolicy`` with the crash-loop back-off;
- a graceful deletion kills every container with the deletion's grace, writes the
  final status and deletes the object with grace 0 and the pod's UID as a
  precondition; a pod that vanished from the API (force deletion) is killed
  when the node notices, and nothing more is written.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ...waiting import wait_event
from .api import ApiError, NodeApi, Partitioned
from .backoff import Backoff, BackoffPolicy
from .container import ContainerProcess, exit_code, rfc3339
from .environment import ConfigProblem, command_line, resolve_env
from .network import PodAddress
from .probing import ProbeSpec, ProbeTracker, run_probe
from .status import ContainerView, pod_status

__all__ = ["MIN_KILL_GRACE", "ContainerRunner", "PodWorker"]

log = logging.getLogger("apipool.testing.node")

MIN_KILL_GRACE = 2.0
"""The kubelet never waits less than this between SIGTERM and SIGKILL."""
STATUS_RESYNC = 5.0
"""Seconds between status writes when nothing changed (only a failed write is redone)."""
RETRY = 0.5
"""Seconds between tries of a final deletion the API did not take."""
CONFIG_RETRY = 1.0
"""Seconds between tries to configure a container whose Secret or key is missing."""

Entrypoint = Callable[[str], Sequence[str]]


def _now() -> str:
    return rfc3339(time.time())


class ContainerRunner:
    """The runs of one container of a pod, one after another."""

    def __init__(self, pod: PodWorker, container: Mapping[str, Any]) -> None:
        self.pod = pod
        self.spec = container
        self.name = str(container["name"])
        self.view = ContainerView(name=self.name, image=str(container.get("image", "")))
        self.backoff = Backoff(pod.node_options.backoff)
        self.process: ContainerProcess | None = None
        self.probes = [
            ProbeSpec.from_api(kind, container[f"{kind}Probe"])
            for kind in ("startup", "liveness", "readiness")
            if container.get(f"{kind}Probe")
        ]
        self._kill: asyncio.Future[tuple[float, str]] | None = None
        self.runs = 0

    def _probe(self, kind: str) -> ProbeSpec | None:
        return next((p for p in self.probes if p.kind == kind), None)

    async def run(self) -> None:
        while not self.pod.terminating.is_set():
            try:
                env = await self.pod.container_env(self.spec)
            except ConfigProblem as exc:
                self.view.state = {
                    "waiting": {"reason": "CreateContainerConfigError", "message": str(exc)}
                }
                self.pod.changed()
                await self.pod.wait_terminating(CONFIG_RETRY)
                continue
            if await self._one_run(env):
                return

    async def _one_run(self, env: dict[str, str]) -> bool:
        """Start, supervise and end one run; True when no further run is due."""
        pod = self.pod
        argv = command_line(self.spec, pod.entrypoint(self.view.image), env)
        full_env = {**pod.node_options.base_env, "HOSTNAME": pod.name, **env}
        self.runs += 1
        log_path = pod.log_dir / f"{self.name}" / f"{self.runs - 1}.log"
        self.process = proc = ContainerProcess(
            argv, full_env, log_path, prefix=pod.address.exec_prefix
        )
        container_id = f"local-node://{pod.uid[:8]}-{self.name}-{proc.pid}"
        self.view.container_id = container_id
        self.view.state = {"running": {"startedAt": rfc3339(proc.started_at)}}
        self.view.started = self._probe("startup") is None
        self.view.ready = self.view.started and self._probe("readiness") is None
        pod.changed()
        self._kill = asyncio.get_running_loop().create_future()
        tasks = [asyncio.create_task(self._probe_loop(spec, proc)) for spec in self.probes]
        try:
            code = await self._supervise(proc)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        self._terminated(proc, code, container_id)
        if pod.terminating.is_set():
            return True
        policy = pod.restart_policy
        if policy == "Never" or (policy == "OnFailure" and exit_code(code) == 0):
            pod.changed()
            return True
        delay = self.backoff.next_delay(proc.ran_for)
        self.view.last_state = self.view.state
        if delay > 0:
            self.view.state = {
                "waiting": {
                    "reason": "CrashLoopBackOff",
                    "message": f"back-off {delay:g}s restarting failed container={self.name} "
                    f"pod={pod.name}_{pod.namespace}({pod.uid})",
                }
            }
            pod.changed()
            if await pod.wait_terminating(delay):
                return True
        self.view.restart_count += 1
        return False

    async def _supervise(self, proc: ContainerProcess) -> int:
        """Wait for the run's end: an exit seen at a relist, a probe's kill, or the
        pod's termination. Returns the return code."""
        assert self._kill is not None
        exited = asyncio.create_task(self._relist(proc))
        terminating = asyncio.create_task(self.pod.terminating.wait())
        waiters: set[asyncio.Future[Any]] = {exited, terminating, self._kill}
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in (exited, terminating):
                waiter.cancel()
        if exited.done() and not exited.cancelled():
            return exited.result()
        if self._kill.done():
            grace, why = self._kill.result()
            log.info("node: killing %s/%s: %s", self.pod.name, self.name, why)
            return await proc.stop(max(MIN_KILL_GRACE, grace))
        return await proc.stop(max(MIN_KILL_GRACE, self.pod.termination_grace))

    async def _relist(self, proc: ContainerProcess) -> int:
        """The process's return code, seen at the first relist after its exit."""
        options = self.pod.node_options
        while options.frozen or (code := proc.poll()) is None:
            await asyncio.sleep(options.relist)
        return code

    def _terminated(self, proc: ContainerProcess, code: int, container_id: str) -> None:
        exit_status = exit_code(code)
        terminated: dict[str, Any] = {
            "exitCode": exit_status,
            "reason": "Completed" if exit_status == 0 else "Error",
            "startedAt": rfc3339(proc.started_at),
            "finishedAt": rfc3339(proc.finished_at or time.time()),
            "containerID": container_id,
        }
        if code < 0:
            terminated["signal"] = -code
        self.view.state = {"terminated": terminated}
        self.view.ready = False
        self.view.started = False
        self.pod.changed()

    def _request_kill(self, grace: float, why: str) -> None:
        if self._kill is not None and not self._kill.done():
            self._kill.set_result((grace, why))

    async def _probe_loop(self, spec: ProbeSpec, proc: ContainerProcess) -> None:
        tracker = ProbeTracker(spec)
        gated = spec.kind != "startup" and self._probe("startup") is not None
        due = proc.started_mono + spec.initial_delay
        while True:
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            due += spec.period
            if spec.kind == "startup" and self.view.started:
                return
            if (gated and not self.view.started) or self.pod.node_options.frozen:
                continue
            ok = await run_probe(
                spec,
                self.pod.address.ip,
                self.spec.get("ports") or [],
                self.pod.address.exec_prefix,
            )
            if proc.poll() is not None:
                return
            self._verdict(spec, tracker.record(ok))

    def _verdict(self, spec: ProbeSpec, verdict: bool | None) -> None:
        if verdict is None:
            return
        grace = spec.kill_grace if spec.kill_grace is not None else self.pod.pod_grace
        if spec.kind == "startup":
            if verdict:
                self.view.started = True
                self.view.ready = self._probe("readiness") is None
                self.pod.changed()
            else:
                self._request_kill(grace, "startup probe failed")
        elif spec.kind == "liveness":
            if not verdict:
                self._request_kill(grace, "liveness probe failed")
        elif self.view.ready != verdict:
            self.view.ready = verdict
            self.pod.changed()


class NodeOptions:
    """How the node runs pods (shared by every :class:`PodWorker`)."""

    def __init__(
        self,
        *,
        relist: float = 1.0,
        backoff: BackoffPolicy | None = None,
        base_env: Mapping[str, str] | None = None,
        host_ip: str = "127.0.0.1",
    ) -> None:
        self.relist = relist
        self.backoff = backoff or BackoffPolicy()
        self.base_env = dict(base_env or {})
        self.host_ip = host_ip
        self.frozen = False
        """The whole node is frozen (a paused machine): no probe, no relist."""


class PodWorker:
    """A pod the node runs, from admission to its end."""

    def __init__(
        self,
        pod: Mapping[str, Any],
        *,
        api: NodeApi,
        address: PodAddress,
        log_dir: Path,
        entrypoint: Entrypoint,
        node_options: NodeOptions,
    ) -> None:
        meta = pod["metadata"]
        self.pod = dict(pod)
        self.name = str(meta["name"])
        self.namespace = str(meta.get("namespace", ""))
        self.uid = str(meta["uid"])
        self.api = api
        self.address = address
        self.log_dir = log_dir
        self.entrypoint = entrypoint
        self.node_options = node_options
        spec = pod.get("spec") or {}
        self.restart_policy = str(spec.get("restartPolicy", "Always"))
        self.pod_grace = float(spec.get("terminationGracePeriodSeconds", 30))
        self.termination_grace = self.pod_grace
        self.terminating = asyncio.Event()
        self.gone = False
        """The object was removed from the API (a force deletion): write nothing."""
        self.start_time = _now()
        self.runners = [ContainerRunner(self, c) for c in spec.get("containers") or []]
        self._changed = asyncio.Event()
        self._written: dict[str, Any] = dict(pod.get("status") or {})
        self._writing = asyncio.Lock()
        self._ended = False
        self.done = asyncio.Event()

    # -- what the node tells it ---------------------------------------------------------

    def update(self, pod: Mapping[str, Any]) -> None:
        """The pod's newest object from the API (a watch event)."""
        self.pod = dict(pod)
        meta = pod.get("metadata") or {}
        if meta.get("deletionTimestamp") and not self.terminating.is_set():
            grace = meta.get("deletionGracePeriodSeconds")
            self.terminate(self.pod_grace if grace is None else float(grace))

    def terminate(self, grace: float) -> None:
        self.termination_grace = grace
        self.terminating.set()

    def vanish(self) -> None:
        """The object is gone from the API: kill the containers, write nothing."""
        self.gone = True
        grace = (self.pod.get("metadata") or {}).get("deletionGracePeriodSeconds")
        if not self.terminating.is_set():
            self.terminate(self.pod_grace if grace is None else float(grace))

    # -- used by the runners ------------------------------------------------------------

    def changed(self) -> None:
        self._changed.set()

    async def wait_terminating(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds; True if the pod began terminating."""
        return await wait_event(self.terminating, timeout)

    async def container_env(self, container: Mapping[str, Any]) -> dict[str, str]:
        """The container's environment, Secrets and ConfigMaps read from the API now."""
        wanted: dict[tuple[str, str], Mapping[str, Any] | None] = {}
        for item in container.get("env") or []:
            source = item.get("valueFrom") or {}
            for key, kind in (("secretKeyRef", "secrets"), ("configMapKeyRef", "configmaps")):
                if key in source:
                    name = str(source[key].get("name", ""))
                    if (kind, name) not in wanted:
                        wanted[kind, name] = await self.api.get(kind, name)
        pod = {
            **self.pod,
            "status": {"podIP": self.address.ip, "hostIP": self.node_options.host_ip},
        }
        return resolve_env(pod, container, lambda kind, name: wanted.get((kind, name)))

    # -- the pod's life -----------------------------------------------------------------

    async def run(self) -> None:
        writer = asyncio.create_task(self._write_status())
        runners = [asyncio.create_task(r.run()) for r in self.runners]
        try:
            self.changed()
            await asyncio.gather(*runners)
            if not self.terminating.is_set():
                await self.terminating.wait()  # every container ended for good
            await self._flush(ended=True)
            await self._delete()
        finally:
            for task in runners:
                task.cancel()
            writer.cancel()
            await asyncio.gather(writer, *runners, return_exceptions=True)
            for runner in self.runners:
                if runner.process is not None:
                    runner.process.kill_now()
            self.done.set()

    def status(self, *, ended: bool = False) -> dict[str, Any]:
        return pod_status(
            [r.view for r in self.runners],
            restart_policy=self.restart_policy,
            ended=ended,
            pod_ip=self.address.ip,
            host_ip=self.node_options.host_ip,
            start_time=self.start_time,
            previous=self._written,
            now=_now(),
        )

    async def _flush(self, *, ended: bool = False) -> None:
        async with self._writing:  # one write at a time, none after the final one
            if self.gone or (self._ended and not ended):
                return
            self._ended = self._ended or ended
            status = self.status(ended=ended)
            if status == self._written:
                return
            try:
                await self.api.patch_status(self.name, status)
                self._written = status
            except Partitioned:
                pass  # written at the next change or resync after the partition
            except ApiError as exc:
                if exc.status == 404:
                    self.gone = True
                else:
                    log.warning("node: status of %s not written: %s", self.name, exc)

    async def _delete(self) -> None:
        """Remove the object (grace 0, this pod's UID), once the API can be reached."""
        while not self.gone:
            try:
                await self.api.delete_pod(self.name, uid=self.uid, grace=0)
                return
            except Partitioned:
                await asyncio.sleep(RETRY)
            except ApiError as exc:
                log.warning("node: pod %s not deleted: %s", self.name, exc)
                await asyncio.sleep(RETRY)

    async def _write_status(self) -> None:
        """Write the status when it changed, and at least every ``STATUS_RESYNC`` s
        (a write that failed, e.g. during a partition, is made good)."""
        while True:
            await wait_event(self._changed, STATUS_RESYNC)
            self._changed.clear()
            await self._flush()

    # -- for tests and chaos ------------------------------------------------------------

    def container_pid(self, name: str | None = None) -> int | None:
        """PID of the named (or first) container's current process, if it runs."""
        for runner in self.runners:
            process = runner.process
            if name in (None, runner.name) and process is not None and process.poll() is None:
                return process.pid
        return None
