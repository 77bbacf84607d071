"""The local node: a kubelet for the API emulator that runs pods as local processes.

:class:`LocalNode` meets the rest of the system only through the Kubernetes API,
as a kubelet does: it lists and watches the pods of its namespace, binds each
unbound pod to itself (it is the only node, so it plays the scheduler's one
call too), runs each bound pod with a :class:`~.pod_worker.PodWorker`, and
writes status and final deletions back. A pod whose object disappears (a force
deletion) is killed when the watch or a relist shows it gone.

:class:`NodeThread` runs a node on its own event loop in a thread, with
blocking helpers for tests and chaos (``pid``, ``signal``, ``pod_ip``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from ..loop_thread import LoopThread
from .api import ApiError, NodeApi
from .backoff import BackoffPolicy
from .network import PodNetwork
from .pod_worker import NodeOptions, PodWorker

__all__ = ["DEFAULT_ENTRYPOINT", "LocalNode", "NodeThread"]

log = logging.getLogger("apipool.testing.node")

DEFAULT_ENTRYPOINT = (sys.executable, "-m", "apipool")
"""The image's entrypoint: every image runs the ``apipool`` command of this Python."""
WATCH_RETRY = 0.5
T = TypeVar("T")


def _default_env() -> dict[str, str]:
    """What the image's own environment would hold (PATH, HOME, locale)."""
    keep = ("PATH", "LANG", "LC_ALL", "PYTHONPATH", "VIRTUAL_ENV")
    env = {k: os.environ[k] for k in keep if k in os.environ}
    env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
    env["HOME"] = "/tmp"
    return env


class LocalNode:
    """A kubelet for one namespace of an API server, running pods as processes."""

    def __init__(
        self,
        api_url: str,
        *,
        name: str = "local-node",
        namespace: str = "default",
        token: str | None = None,
        network: PodNetwork | None = None,
        entrypoint: Callable[[str], Sequence[str]] | None = None,
        image_env: Mapping[str, str] | None = None,
        relist: float = 1.0,
        backoff: BackoffPolicy | None = None,
        log_dir: Path | None = None,
        claims: Callable[[Mapping[str, Any]], bool] | None = None,
    ) -> None:
        self.name = name
        self.api = NodeApi(api_url, namespace, token)
        self._own_network = network is None
        self.network = network if network is not None else PodNetwork()
        self.entrypoint = entrypoint or (lambda image: DEFAULT_ENTRYPOINT)
        self.options = NodeOptions(
            relist=relist,
            backoff=backoff,
            base_env={**_default_env(), **(image_env or {})},
            host_ip=self.network.host_ip,
        )
        self._own_logs = log_dir is None
        self.log_dir = log_dir or Path(tempfile.mkdtemp(prefix="apipool-node-"))
        self.workers: dict[str, PodWorker] = {}
        """Pod UID -> worker, while the node runs the pod."""
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._finished: set[str] = set()
        self.claims = claims
        """Which unbound pods this node binds (None: all), as a nodeSelector or
        taint would decide; a test sets it to place pods on nodes."""

    # -- reading the API ----------------------------------------------------------------

    async def run(self) -> None:
        """List and watch pods until cancelled; act on every change."""
        try:
            while True:
                try:
                    pods, version = await self.api.list_pods()
                    self._relisted(pods)
                    async for event in self.api.watch_pods(version):
                        await self._event(event)
                except (ApiError, OSError, ValueError) as exc:
                    log.info("node: watch ended (%s); listing again", exc)
                except Exception as exc:  # aiohttp's payload errors and the like
                    log.info("node: watch broke (%r); listing again", exc)
                await asyncio.sleep(WATCH_RETRY)
        finally:
            await self.shutdown()

    def _relisted(self, pods: list[dict[str, Any]]) -> None:
        present = {p["metadata"]["uid"] for p in pods}
        for uid, worker in list(self.workers.items()):
            if uid not in present:
                worker.vanish()
        for pod in pods:
            self._seen(pod)

    async def _event(self, event: Mapping[str, Any]) -> None:
        kind, pod = event.get("type"), event.get("object") or {}
        if kind == "ERROR":
            raise ApiError(int(pod.get("code", 500)), str(pod.get("message", "")))
        if kind == "DELETED":
            worker = self.workers.get(pod.get("metadata", {}).get("uid", ""))
            if worker is not None:
                worker.update(pod)
                worker.vanish()
            return
        self._seen(pod)

    def _seen(self, pod: dict[str, Any]) -> None:
        meta, spec = pod.get("metadata") or {}, pod.get("spec") or {}
        uid = meta.get("uid", "")
        node = spec.get("nodeName")
        if not node:
            claims = self.claims
            if not meta.get("deletionTimestamp") and (claims is None or claims(pod)):
                self._spawn(f"bind-{uid}", self._bind(meta["name"]))
            return
        if node != self.name:
            return
        worker = self.workers.get(uid)
        if worker is not None:
            worker.update(pod)
        elif uid in self._finished:
            return
        elif meta.get("deletionTimestamp"):
            # Terminating and never run here: nothing to kill, let it go.
            self._spawn(f"delete-{uid}", self.api.delete_pod(meta["name"], uid=uid, grace=0))
        else:
            self._admit(pod)

    async def _bind(self, name: str) -> None:
        with contextlib.suppress(ApiError):  # taken, gone or terminating meanwhile
            await self.api.bind(name, self.name)

    def _spawn(self, key: str, coro: Any) -> None:
        if key in self._tasks:
            coro.close()
            return
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks[key] = task
        task.add_done_callback(lambda _t: self._tasks.pop(key, None))

    # -- running pods -------------------------------------------------------------------

    def _admit(self, pod: dict[str, Any]) -> None:
        meta = pod["metadata"]
        uid = meta["uid"]
        address = self.network.add(uid)
        worker = PodWorker(
            pod,
            api=self.api,
            address=address,
            log_dir=self.log_dir / f"{meta.get('namespace')}_{meta['name']}_{uid}",
            entrypoint=self.entrypoint,
            node_options=self.options,
        )
        self.workers[uid] = worker

        async def life() -> None:
            try:
                await worker.run()
            except Exception:
                log.exception("node: pod %s failed", worker.name)
            finally:
                self.workers.pop(uid, None)
                self._finished.add(uid)
                self.network.remove(uid)

        self._spawn(f"pod-{uid}", life())

    async def shutdown(self) -> None:
        """Kill every pod's processes at once, free their networks, close the client."""
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for worker in list(self.workers.values()):
            for runner in worker.runners:
                if runner.process is not None:
                    runner.process.kill_now()
        await self.api.close()
        if self._own_network:
            self.network.close()

    # -- a network partition ------------------------------------------------------------

    def cut(self) -> None:
        """Cut this node off from the API server: it stops watching and writing;
        its pods run on. :meth:`heal` ends it (the node lists again and kills
        pods whose objects are gone)."""
        self.api.cut()

    def heal(self) -> None:
        self.api.heal()

    def _container_signal(self, sig: int) -> None:
        """Signal every process of every container (a whole machine pausing)."""
        for worker in list(self.workers.values()):
            for runner in worker.runners:
                if runner.process is not None:
                    runner.process.signal_group(sig)

    def freeze(self) -> None:
        """The whole machine pauses (a suspended VM): every container process is
        SIGSTOPped, probes and relists stop, the API cannot be reached."""
        self.options.frozen = True
        self.api.cut()
        self._container_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        """The machine resumes: processes go on where they stopped, then the
        kubelet reaches the API again (and kills pods whose objects are gone)."""
        self._container_signal(signal.SIGCONT)
        self.options.frozen = False
        self.api.heal()

    # -- looking at pods ----------------------------------------------------------------

    def worker(self, pod: str) -> PodWorker | None:
        """The worker of the running pod named ``pod`` (the newest, if two)."""
        found = [w for w in list(self.workers.values()) if w.name == pod]
        return found[-1] if found else None


class NodeThread(LoopThread):
    """A :class:`LocalNode` on its own event loop in a thread."""

    what = "the local node"

    def __init__(self, api_url: str, **options: Any) -> None:
        super().__init__("local-node")
        self.api_url = api_url
        self.options = options
        self.node: LocalNode | None = None
        self._task: asyncio.Task[None] | None = None

    async def _serve(self) -> None:
        self.node = LocalNode(self.api_url, **self.options)
        self._task = asyncio.current_task()
        self._serving()
        with contextlib.suppress(asyncio.CancelledError):
            await self.node.run()

    def _stopping(self) -> None:
        if self._task is not None:
            self._task.cancel()

    def stop(self, timeout: float = 30.0) -> None:
        super().stop(timeout)
        if self.node is not None and self.node._own_logs:
            shutil.rmtree(self.node.log_dir, ignore_errors=True)

    def call(self, fn: Callable[[LocalNode], T], timeout: float = 5.0) -> T:
        """Run ``fn(node)`` on the node's loop (a plain function) and return its result."""
        assert self.node is not None
        node = self.node

        async def run() -> T:
            return fn(node)

        return self.run_on_loop(run(), timeout)

    def pid(self, pod: str, container: str | None = None) -> int | None:
        """PID of the pod's container process (PID 1 of the container), if running."""
        return self.call(lambda n: w.container_pid(container) if (w := n.worker(pod)) else None)

    def signal(self, pod: str, sig: int = signal.SIGKILL, container: str | None = None) -> int:
        """Send ``sig`` to the pod's container process (chaos); returns its PID."""
        pid = self.pid(pod, container)
        if pid is None:
            raise LookupError(f"no running container in pod {pod}")
        os.kill(pid, sig)
        return pid

    def cut(self) -> None:
        """Partition the node from the API server (see :meth:`LocalNode.cut`)."""
        self.call(lambda n: n.cut())

    def heal(self) -> None:
        self.call(lambda n: n.heal())

    def claim(self, claims: Callable[[Mapping[str, Any]], bool] | None) -> None:
        """Which unbound pods this node binds from now on (None: all)."""

        def set_claims(n: LocalNode) -> None:
            n.claims = claims

        self.call(set_claims)

    def freeze(self) -> None:
        """Pause the whole node (see :meth:`LocalNode.freeze`)."""
        self.call(lambda n: n.freeze())

    def thaw(self) -> None:
        self.call(lambda n: n.thaw())

    def pod_ip(self, pod: str) -> str | None:
        return self.call(lambda n: w.address.ip if (w := n.worker(pod)) else None)

    def log_text(self, pod: str, container: str | None = None) -> str:
        """Everything the pod's container runs have written so far."""

        def read(n: LocalNode) -> str:
            worker = n.worker(pod)
            if worker is None:
                return ""
            parts = []
            for runner in worker.runners:
                if container in (None, runner.name):
                    for path in sorted((worker.log_dir / runner.name).glob("*.log")):
                        parts.append(path.read_text(errors="replace"))
            return "".join(parts)

        return self.call(read)
