"""The run itself: a pool under a local supervisor, producers, an observer, chaos.

:func:`run_scenario` sets everything up on an :class:`~contextlib.AsyncExitStack`
(so that it all stops, in order, however the run ends), waits for the pool to be
busy, measures for the scenario's duration, then drains the queue and accounts
for every job.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from ...envelope import make_envelope
from ...protocol import PoolProtocol
from ...settings import HttpPolicy
from ...supervisor import Supervisor, SupervisorSettings
from ..polling import WaitTimeout, async_wait_for
from ..redis_server import RedisServer
from ..standin import StandInApi, StandInStats
from .chaos import FaultInjector
from .result import (
    Fault,
    Outcomes,
    OutcomeTally,
    Recovery,
    ScenarioResult,
    Snapshot,
    build_result,
    make_snapshot,
    recovery_times,
)
from .scenario import ChaosPlan, Scenario

__all__ = ["PoolRun", "run_scenario"]

OUTCOME_CHUNK = 500
"""Jobs whose results are read in one pipeline."""


def _client(url: str) -> aioredis.Redis:
    # No automatic retries: a re-sent submit could queue a job twice.
    return aioredis.Redis.from_url(
        url, socket_timeout=1.0, socket_connect_timeout=1.0, retry=Retry(NoBackoff(), 0)
    )


class PoolRun:
    """The state of one run: the pool, its load, what was seen of it, the faults."""

    def __init__(self, scenario: Scenario, redis_url: str, api: StandInApi, log_dir: str) -> None:
        self.s = scenario
        self.api = api
        self.pool = f"scenario-{uuid.uuid4().hex[:8]}"
        self.protocol = PoolProtocol(self.pool)
        self.keys = self.protocol.keys
        self.redis_url = redis_url
        self.r = _client(redis_url)
        self.supervisor = Supervisor(
            SupervisorSettings(
                redis_url=redis_url,
                pool=self.pool,
                slots=scenario.slots,
                handlers=("http",),
                # The stand-in listens on loopback, which the http handler
                # refuses unless the pool names it.
                http=HttpPolicy(allow_urls=(f"{api.url}/",)),
                timings=scenario.timings,
                max_attempts=scenario.max_attempts,
                liveness_window=scenario.liveness_window,
                probe_interval=scenario.probe_interval,
                log_dir=log_dir,
                standby=scenario.standby,
                prefetch=scenario.prefetch,
                adaptive=scenario.adaptive,
            )
        )
        self.accepted: list[str] = []
        self.uncertain: list[str] = []
        self.t0 = 0.0  # time.monotonic() at the start of measurement
        self.busy: dict[int, bool] = {}
        self.queued = 0
        self.running = True
        self.tasks: list[asyncio.Task[None]] = []
        self.injector = FaultInjector(
            scenario.chaos or ChaosPlan(),
            self.supervisor,
            self.busy,
            random.Random(scenario.seed),
            self.is_running,
            workers=scenario.standby,
        )

    @property
    def faults(self) -> list[Fault]:
        return self.injector.faults

    def is_running(self) -> bool:
        return self.running

    async def stop_tasks(self, tasks: list[asyncio.Task[None]]) -> None:
        # Loops check ``running`` too: a cancel that a client library turns into
        # a RedisError is caught by the loop's retry, and must not restart it.
        self.running = False
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def release_stopped(self) -> None:
        self.injector.release_stopped()

    # -- load --------------------------------------------------------------------

    def _payload(self) -> dict[str, Any]:
        return {"method": "GET", "url": f"{self.api.url}/work?ms={self.s.call_ms:g}"}

    async def _top_up(self, backlog: int) -> None:
        depth = int(await self.r.llen(self.keys.queue))
        want = backlog - depth
        if want > 0:
            envs = [make_envelope(self._payload()) for _ in range(want)]
            try:
                await self.protocol.submit([e.to_json() for e in envs]).arun(self.r)
            except RedisError:
                self.uncertain.extend(e.id for e in envs)
                raise
            self.accepted.extend(e.id for e in envs)

    async def produce(self) -> None:
        backlog = self.s.queue_depth
        while self.running:
            try:
                await self._top_up(backlog)
            except RedisError:
                await asyncio.sleep(0.2)
                continue
            await asyncio.sleep(0.01)

    # -- observation -------------------------------------------------------------

    async def _lengths(self) -> list[int]:
        """Lengths of the queue and of every slot's in-flight list, in one round trip."""
        pipe = self.r.pipeline(transaction=False)
        pipe.llen(self.keys.queue)
        for i in range(self.s.slots):
            pipe.llen(self.keys.inflight(i))
        return [int(x) for x in await pipe.execute()]

    async def follow_shared_limits(self) -> None:
        """Set the stand-in's shared limit as the scenario says, at its times from ``t0``."""
        for at, limit in self.s.shared_limits:
            while self.running and (delay := self.t0 + at - time.monotonic()) > 0:
                await asyncio.sleep(min(delay, 0.1))
            if not self.running:
                return
            self.api.set_shared_limit(limit)

    async def observe(self) -> None:
        n = self.s.slots
        while self.running:
            try:
                answers = await self._lengths()
            except RedisError:
                await asyncio.sleep(0.1)
                continue
            self.queued = answers[0]
            for i in range(n):
                self.busy[i] = bool(answers[1 + i])
            await asyncio.sleep(0.05)

    def _ready(self) -> bool:
        slots = self.supervisor.slots
        return all(slot.healthy for slot in slots) and sum(self.busy.values()) >= len(slots)

    async def wait_ready(self) -> None:
        """Until every slot is healthy and holds a job."""
        timeout = self.s.ready_timeout
        try:
            await async_wait_for(self._ready, timeout, interval=0.05, what="a busy pool")
        except WaitTimeout:
            raise TimeoutError(f"the pool did not get busy within {timeout:g} s") from None

    def snapshot(self, last_ok: int, dt: float) -> Snapshot:
        return make_snapshot(
            self.api.stats(include_samples=False),
            elapsed=time.monotonic() - self.t0 if self.t0 else 0.0,
            duration=self.s.duration,
            queued=self.queued,
            busy_slots=sum(self.busy.values()),
            last_ok=last_ok,
            dt=dt,
            restarts=self.supervisor.restarts,
            faults=len(self.faults),
            submitted=len(self.accepted),
        )

    # -- accounting --------------------------------------------------------------

    async def drain(self) -> int:
        """Wait for the queue and the in-flight lists to empty; the jobs left in them."""
        left = -1

        async def empty() -> bool:
            nonlocal left
            try:
                left = sum(await self._lengths())
            except RedisError:
                left = -1
            return left == 0

        check: Callable[[], bool | Awaitable[bool]] = empty
        try:
            await async_wait_for(check, self.s.drain_timeout, interval=0.1, what="a drained queue")
        except WaitTimeout:
            return max(left, 0)
        return 0

    async def outcomes(self) -> Outcomes:
        ids = self.accepted + self.uncertain
        certain = len(self.accepted)
        tally = OutcomeTally()
        for start in range(0, len(ids), OUTCOME_CHUNK):
            chunk = ids[start : start + OUTCOME_CHUNK]
            pipe = self.r.pipeline(transaction=False)
            tally.queue_reads(pipe, self.keys, chunk)
            tally.add_reads(chunk, await pipe.execute(), certain - start)
        self.accepted.extend(tally.landed)
        return tally.outcomes(submitted=len(self.accepted))

    def recovery(self, outcomes: Outcomes) -> Recovery:
        return recovery_times(self.faults, self.supervisor.events, outcomes.call_starts, self.t0)


async def _start_redis(stack: contextlib.AsyncExitStack, appendonly: bool) -> RedisServer:
    """A throwaway redis-server, closed by ``stack`` even when the start is cancelled."""
    server = RedisServer(appendonly=appendonly)
    starting = asyncio.ensure_future(asyncio.to_thread(server.start))

    async def close() -> None:
        with contextlib.suppress(Exception):
            await starting  # a start still under way in its thread finishes first
        await asyncio.to_thread(server.close)

    stack.push_async_callback(close)
    await asyncio.shield(starting)
    return server


async def _set_up(
    stack: contextlib.AsyncExitStack, scenario: Scenario
) -> tuple[PoolRun, RedisServer | None]:
    """Redis (unless given), the stand-in, the supervisor, the producer and the observer;
    ``stack`` stops them in the reverse order."""
    chaos = scenario.chaos
    server: RedisServer | None = None
    if scenario.redis_url is None:
        server = await _start_redis(stack, appendonly=bool(chaos and chaos.touches_redis))
    redis_url = scenario.redis_url or (server.url if server else "")
    log_dir = scenario.log_dir or stack.enter_context(
        tempfile.TemporaryDirectory(prefix="apipool-run-")
    )
    api = StandInApi(
        scenario.limit, default_ms=scenario.call_ms, retry_after=scenario.api_retry_after
    )
    await stack.enter_async_context(api)
    run = PoolRun(scenario, redis_url, api, log_dir)
    stack.push_async_callback(run.r.aclose)
    sup_task = asyncio.create_task(run.supervisor.run(install_signals=False))

    async def stop_supervisor() -> None:
        run.release_stopped()
        run.supervisor.stop()
        await asyncio.gather(sup_task, return_exceptions=True)

    stack.push_async_callback(stop_supervisor)
    run.tasks += [asyncio.create_task(run.produce()), asyncio.create_task(run.observe())]
    stack.push_async_callback(run.stop_tasks, run.tasks)
    return run, server


async def _measure(
    run: PoolRun,
    server: RedisServer | None,
    on_tick: Callable[[Snapshot], None] | None,
    tick: float,
) -> StandInStats:
    """The measured window: counters zeroed, chaos started, ``on_tick`` fed; the
    stand-in's stats at its end."""
    run.api.reset()
    run.t0 = time.monotonic()
    if run.s.chaos is not None:
        run.tasks.append(asyncio.create_task(run.injector.run(run.t0, server)))
    if run.s.shared_limits:
        run.tasks.append(asyncio.create_task(run.follow_shared_limits()))
    end = run.t0 + run.s.duration
    last_ok, last_t = 0, run.t0
    while (now := time.monotonic()) < end:
        await asyncio.sleep(min(tick, end - now))
        if on_tick is not None:
            snap = run.snapshot(last_ok, time.monotonic() - last_t)
            last_ok, last_t = snap.ok_calls, time.monotonic()
            on_tick(snap)
    return run.api.stats()


async def _wind_down(run: PoolRun, measured: StandInStats) -> tuple[int, float, Outcomes]:
    """Stop the load and the chaos, let the queue drain, read every job's result.

    Return the jobs left unfinished, the service time of 200s inside the
    measured window, and the outcomes.
    """
    run.running = False
    await asyncio.gather(*run.tasks, return_exceptions=True)
    run.release_stopped()
    unfinished = await run.drain()
    # Calls of the window answered after its end count for their part inside it.
    useful = run.api.useful_between(0.0, measured.elapsed_seconds)
    outcomes = await run.outcomes()
    return unfinished, useful, outcomes


async def run_scenario(
    scenario: Scenario,
    *,
    on_tick: Callable[[Snapshot], None] | None = None,
    tick: float = 0.25,
    on_standin: Callable[[StandInApi], None] | None = None,
) -> ScenarioResult:
    """Run one scenario to its end and account for every job.

    ``on_standin`` is handed the stand-in API once it listens: to change its
    settings during the run (from ``on_tick``, say), or to read more of its
    counters afterwards (they stay readable once it has stopped; its clock
    starts with the measured window).
    """
    async with contextlib.AsyncExitStack() as stack:
        run, server = await _set_up(stack, scenario)
        if on_standin is not None:
            on_standin(run.api)
        await run.wait_ready()
        measured = await _measure(run, server, on_tick, tick)
        unfinished, useful, outcomes = await _wind_down(run, measured)
        recovery = run.recovery(outcomes)
    return build_result(
        scenario,
        measured,
        useful=useful,
        outcomes=outcomes,
        unfinished=unfinished,
        restarts=run.supervisor.restarts,
        faults=run.faults,
        recovery=recovery,
    )
