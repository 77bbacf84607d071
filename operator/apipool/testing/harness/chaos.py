"""Faults injected during a run: slot processes SIGKILLed and SIGSTOPped, Redis restarted.

:class:`FaultInjector` follows a :class:`~.scenario.ChaosPlan` (random faults
every ``interval`` on average, or a fixed ``schedule``) and records every fault
as a :class:`~.result.Fault`. Its random draws come from the run's seeded
:class:`random.Random`, in a fixed order, so a seed replays the same faults.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import time
from collections.abc import Callable, Collection, Coroutine, Mapping
from typing import Any

from ...supervisor import Supervisor
from ..redis_server import RedisServer
from .result import Fault
from .scenario import ChaosPlan

__all__ = ["FaultInjector", "pick_victim", "worker_pid"]


def pick_victim(
    pids: Mapping[int, int],
    healthy: Collection[int],
    stopped: Collection[int],
    busy: Mapping[int, bool],
    rng: random.Random,
    prefer_busy: float,
) -> tuple[int, int, bool] | None:
    """A slot process to hit: ``(slot, pid, in a call)``, or ``None`` if there is none.

    Only healthy slots (not a replacement still starting) whose process is not
    stopped already; among those in a call (``busy``) with probability
    ``prefer_busy``.
    """
    live = [i for i in pids if pids[i] not in stopped and i in healthy]
    if not live:
        return None
    in_call = [i for i in live if busy.get(i)]
    slot = rng.choice(in_call if in_call and rng.random() < prefer_busy else live)
    return slot, pids[slot], slot in in_call


async def worker_pid(port: int, timeout: float = 1.0) -> int | None:
    """The pid in a slot's /healthz answer (the process that serves it), or None."""
    try:  # asyncio.timeout, not wait_for: a stop's cancellation must not be lost (apipool.waiting)
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except (OSError, TimeoutError):
        return None
    try:
        writer.write(b"GET /healthz HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        async with asyncio.timeout(timeout):
            raw = await reader.read(65536)
        body = raw.partition(b"\r\n\r\n")[2]
        pid = json.loads(body).get("pid")
        return int(pid) if isinstance(pid, int) else None
    except (OSError, TimeoutError, ValueError, AttributeError):
        return None
    finally:
        writer.close()


class FaultInjector:
    """Hits the supervisor's slot processes (and Redis) as ``plan`` says.

    ``busy`` is the run's live view of which slots hold a job; ``is_running``
    says when to stop. ``faults`` lists what was done, ``at`` in seconds since
    ``t0`` (set by :meth:`run`).
    """

    def __init__(
        self,
        plan: ChaosPlan,
        supervisor: Supervisor,
        busy: Mapping[int, bool],
        rng: random.Random,
        is_running: Callable[[], bool],
        *,
        workers: bool = False,
    ) -> None:
        self.plan = plan
        self.workers = workers
        """The slots run under keepers: hit each slot's active worker, not the keeper."""
        self.supervisor = supervisor
        self.busy = busy
        self.rng = rng
        self.is_running = is_running
        self.faults: list[Fault] = []
        self.stopped_pids: set[int] = set()
        self.t0 = 0.0  # time.monotonic() at the start of measurement
        self._later: set[asyncio.Task[None]] = set()

    async def run(self, t0: float, redis_server: RedisServer | None) -> None:
        """Inject the plan's faults until the run stops; ``t0`` is when it started."""
        self.t0 = t0
        plan = self.plan
        if redis_server is not None:
            for at in plan.redis_restarts:
                self._defer(self._redis_fault(redis_server, at, 0.0))
            for at, seconds in plan.redis_outages:
                self._defer(self._redis_fault(redis_server, at, seconds))
        try:
            if plan.schedule:
                await self._scheduled()
            elif plan.interval > 0:
                await self._random()
            while self.is_running():  # Redis faults may still be due
                await asyncio.sleep(0.1)
        finally:
            for task in self._later:
                task.cancel()
            await asyncio.gather(*self._later, return_exceptions=True)

    def release_stopped(self) -> None:
        """SIGCONT every process still stopped."""
        for pid in list(self.stopped_pids):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        self.stopped_pids.clear()

    async def _scheduled(self) -> None:
        for fault in sorted(self.plan.schedule, key=lambda f: f.at):
            await asyncio.sleep(max(0.0, self.t0 + fault.at - time.monotonic()))
            if not self.is_running():
                break
            await self._strike(fault.kind, fault.hold)

    async def _random(self) -> None:
        plan = self.plan
        while self.is_running():
            await asyncio.sleep(self.rng.expovariate(1.0 / plan.interval))
            if not self.is_running():
                break
            kind = self.rng.choice(plan.kinds)
            await self._strike(kind, plan.stop_short if kind == "stop_short" else 0.0)

    def _defer(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run ``coro`` alongside; cancelled when :meth:`run` ends."""
        self._later.add(asyncio.create_task(coro))

    async def _strike(self, kind: str, hold: float) -> None:
        pids = self.supervisor.pids()
        if self.workers:
            # Under a keeper the worker is what fails (the keeper is tiny): hit the
            # active worker, whose pid its /healthz answer names.
            ports = {slot.index: slot.port for slot in self.supervisor.slots}
            found = await asyncio.gather(*(worker_pid(ports[i]) for i in pids))
            pids = {i: pid for i, pid in zip(pids, found, strict=True) if pid is not None}
        picked = pick_victim(
            pids,
            {slot.index for slot in self.supervisor.slots if slot.healthy},
            self.stopped_pids,
            self.busy,
            self.rng,
            self.plan.prefer_busy,
        )
        if picked is None:
            return
        slot, pid, in_call = picked
        try:
            if kind == "kill":
                os.kill(pid, signal.SIGKILL)
            else:
                os.kill(pid, signal.SIGSTOP)
                self.stopped_pids.add(pid)
                if hold > 0:
                    self._defer(self._signal_later(pid, signal.SIGCONT, hold))
        except ProcessLookupError:
            return
        at = time.monotonic() - self.t0
        self.faults.append(Fault(at, kind, slot, pid, time.time(), in_call))

    async def _signal_later(self, pid: int, sig: signal.Signals, delay: float) -> None:
        await asyncio.sleep(delay)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        self.stopped_pids.discard(pid)

    async def _redis_fault(self, server: RedisServer, at: float, outage: float) -> None:
        await asyncio.sleep(at)
        self.faults.append(
            Fault(time.monotonic() - self.t0, "redis_down", -1, server.pid or 0, time.time())
        )
        await asyncio.to_thread(server.stop)
        await asyncio.sleep(outage)
        await asyncio.to_thread(server.start)
        self.faults.append(
            Fault(time.monotonic() - self.t0, "redis_up", -1, server.pid or 0, time.time())
        )
