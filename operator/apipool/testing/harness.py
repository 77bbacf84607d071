"""One load-and-fault run of a real pool against the stand-in API.

The demo, the chaos tests and the benchmarks all use :func:`run_scenario`: a
throwaway ``redis-server`` (unless a URL is given), the stand-in API with a hard
limit of N, a local supervisor running N slot processes with the ``http``
handler, producers that always keep work queued, and optionally a chaos task
that SIGKILLs and SIGSTOPs slots (favouring slots in a call) and restarts or
stops Redis. Everything listens on loopback and stops by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from ..envelope import make_envelope
from ..protocol import PoolProtocol
from ..settings import Timings
from ..supervisor import Supervisor, SupervisorSettings
from .redis_server import RedisServer
from .standin import OverLimitEvent, StandInApi

FAULT_KINDS = ("kill", "stop_short", "stop_long")


@dataclass(frozen=True)
class ScheduledFault:
    """One fault at a fixed time, to replay the same faults on several systems."""

    at: float
    """Seconds into the measured run."""
    kind: str
    """``kill``, ``stop_short`` or ``stop_long``."""
    hold: float = 0.0
    """For stops: seconds until SIGCONT; 0: stopped until the supervisor kills it."""


@dataclass(frozen=True)
class ChaosPlan:
    """Faults injected during a run. Times in seconds."""

    interval: float = 3.0
    """Mean time between slot faults (exponentially distributed); 0: none."""
    kinds: tuple[str, ...] = FAULT_KINDS
    """Chosen at random: ``kill`` (SIGKILL), ``stop_short`` (SIGSTOP, then SIGCONT
    before the liveness window ends), ``stop_long`` (SIGSTOP for good: the
    supervisor must find and kill it)."""
    stop_short: float = 0.8
    prefer_busy: float = 0.85
    """Chance that the victim is picked among slots that are in a call."""
    redis_restarts: tuple[float, ...] = ()
    """Seconds into the run at which Redis is restarted (append-only, so it keeps its data)."""
    redis_outages: tuple[tuple[float, float], ...] = ()
    """(at, seconds): Redis is stopped at ``at`` and started again ``seconds`` later."""
    schedule: tuple[ScheduledFault, ...] = ()
    """Slot faults at fixed times; when given, instead of random ones every ``interval``."""

    def __post_init__(self) -> None:
        unknown = (set(self.kinds) | {f.kind for f in self.schedule}) - set(FAULT_KINDS)
        if unknown:
            raise ValueError(f"unknown fault kinds: {sorted(unknown)}")

    @property
    def touches_redis(self) -> bool:
        return bool(self.redis_restarts or self.redis_outages)


@dataclass(frozen=True)
class Scenario:
    slots: int = 4
    duration: float = 20.0
    call_ms: float = 100.0
    chaos: ChaosPlan | None = None
    call_timeout: float = 2.0
    heartbeat_interval: float = 0.5
    liveness_window: float = 2.0
    probe_interval: float = 0.25
    max_attempts: int = 5
    backlog: int = 0
    """Queue depth the producers keep; 0: 2 * slots + 4."""
    drain_timeout: float = 30.0
    redis_url: str | None = None
    seed: int | None = None
    log_dir: str | None = None
    ready_timeout: float = 30.0
    api_limit: int = 0
    """The stand-in's limit; 0: slots. Set it below slots to see the checks catch an overrun."""

    @property
    def timings(self) -> Timings:
        return Timings(call_timeout=self.call_timeout, heartbeat_interval=self.heartbeat_interval)


@dataclass(frozen=True)
class Fault:
    at: float  # seconds since the measurement started
    kind: str
    slot: int
    pid: int
    wall: float = 0.0  # time.time() of the fault
    in_call: bool = False  # the victim held a job when it was hit


@dataclass(frozen=True)
class Snapshot:
    """Live figures, handed to ``on_tick`` a few times a second."""

    elapsed: float
    duration: float
    limit: int
    active: int
    """Open connections at the stand-in (what its limit counts)."""
    in_flight: int
    """Calls being served at the stand-in right now."""
    max_concurrency: int
    over_limit_seconds: float
    utilization: float
    queued: int
    busy_slots: int
    ok_calls: int
    throughput: float
    restarts: int
    faults: int
    submitted: int


@dataclass
class ScenarioResult:
    slots: int
    limit: int
    """The stand-in API's connection limit."""
    duration: float
    call_ms: float
    chaos: bool
    max_concurrency: int
    """Peak of open connections at the stand-in: the figure the cap is about."""
    max_in_flight: int
    over_limit_seconds: float
    over_limit_events: list[OverLimitEvent]
    rejected: int
    utilization: float
    """Calls in flight at the API / (limit x duration)."""
    goodput: float
    """The API's service time spent on successful calls / (slots x duration)."""
    api_calls_ok: int
    submitted: int
    completed: int
    expired: int
    dead: int
    lost: int
    duplicated: int
    unfinished: int
    restarts: int
    faults: list[Fault]
    kill_recovery: list[float]
    """Seconds from a SIGKILL to the replacement's first successful call start."""
    hang_detection: list[float]
    """Seconds from a permanent SIGSTOP to the supervisor's SIGKILL."""
    hang_recovery: list[float]
    """Seconds from a permanent SIGSTOP to the replacement's first successful call start."""
    timeline: list[tuple[float, int, int]] = field(default_factory=list)
    """(seconds, open connections, calls in flight) at the stand-in, at every change."""
    dead_reasons: list[str] = field(default_factory=list)

    @property
    def throughput(self) -> float:
        return self.api_calls_ok / self.duration if self.duration else 0.0

    def to_dict(self, *, timeline: bool = False) -> dict[str, Any]:
        doc = asdict(self)
        doc["throughput"] = self.throughput
        if not timeline:
            doc.pop("timeline")
        return doc


@dataclass(frozen=True)
class Outcomes:
    submitted: int
    counts: dict[str, int]
    """Jobs by result status (ok, expired, dead), plus lost and duplicated."""
    dead_reasons: list[str]


def _client(url: str) -> aioredis.Redis:
    # No automatic retries: a re-sent submit could queue a job twice.
    return aioredis.Redis.from_url(
        url, socket_timeout=1.0, socket_connect_timeout=1.0, retry=Retry(NoBackoff(), 0)
    )


class _Run:
    def __init__(self, scenario: Scenario, redis_url: str, api: StandInApi, log_dir: str) -> None:
        self.s = scenario
        self.api = api
        self.pool = f"scenario-{uuid.uuid4().hex[:8]}"
        self.protocol = PoolProtocol(self.pool)
        self.keys = self.protocol.keys
        self.redis_url = redis_url
        self.r = _client(redis_url)
        self.rng = random.Random(scenario.seed)
        self.supervisor = Supervisor(
            SupervisorSettings(
                redis_url=redis_url,
                pool=self.pool,
                slots=scenario.slots,
                handlers=("http",),
                timings=scenario.timings,
                max_attempts=scenario.max_attempts,
                liveness_window=scenario.liveness_window,
                probe_interval=scenario.probe_interval,
                log_dir=log_dir,
            )
        )
        self.accepted: list[str] = []
        self.uncertain: list[str] = []
        self.faults: list[Fault] = []
        self.stopped_pids: set[int] = set()
        self.t0 = 0.0  # time.monotonic() at the start of measurement
        self.busy: dict[int, bool] = {}
        self.queued = 0
        # slot -> wall-clock start times of its successful calls (from results)
        self.call_starts: dict[int, list[float]] = {}
        self.running = True

    def is_running(self) -> bool:
        return self.running

    async def stop_tasks(self, tasks: list[asyncio.Task[None]]) -> None:
        # Loops check ``running`` too: a cancel that a client library turns into
        # a RedisError is caught by the loop's retry, and must not restart it.
        self.running = False
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- load --------------------------------------------------------------------

    def _payload(self) -> dict[str, Any]:
        return {"method": "GET", "url": f"{self.api.url}/work?ms={self.s.call_ms:g}"}

    async def produce(self) -> None:
        backlog = self.s.backlog or 2 * self.s.slots + 4
        while self.running:
            try:
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
            except RedisError:
                await asyncio.sleep(0.2)
                continue
            await asyncio.sleep(0.01)

    # -- observation -------------------------------------------------------------

    async def observe(self) -> None:
        n = self.s.slots
        while self.running:
            try:
                pipe = self.r.pipeline(transaction=False)
                pipe.llen(self.keys.queue)
                for i in range(n):
                    pipe.llen(self.keys.inflight(i))
                answers = await pipe.execute()
            except RedisError:
                await asyncio.sleep(0.1)
                continue
            self.queued = int(answers[0])
            for i in range(n):
                self.busy[i] = bool(answers[1 + i])
            await asyncio.sleep(0.05)

    async def wait_ready(self) -> None:
        deadline = time.monotonic() + self.s.ready_timeout
        while time.monotonic() < deadline:
            slots = self.supervisor.slots
            if all(slot.healthy for slot in slots) and sum(self.busy.values()) >= len(slots):
                return
            await asyncio.sleep(0.05)
        raise TimeoutError(f"the pool did not get busy within {self.s.ready_timeout:g} s")

    # -- faults ------------------------------------------------------------------

    def _victim(self) -> tuple[int, int, bool] | None:
        """A slot process to hit: (slot, pid, in a call), among healthy ones (not a
        replacement still starting), in a call with probability ``prefer_busy``."""
        pids = self.supervisor.pids()
        healthy = {slot.index for slot in self.supervisor.slots if slot.healthy}
        live = [i for i in pids if pids[i] not in self.stopped_pids and i in healthy]
        if not live:
            return None
        busy = [i for i in live if self.busy.get(i)]
        prefer = (self.s.chaos or ChaosPlan()).prefer_busy
        slot = self.rng.choice(busy if busy and self.rng.random() < prefer else live)
        return slot, pids[slot], slot in busy

    def _strike(self, kind: str, hold: float, later: set[asyncio.Task[None]]) -> None:
        picked = self._victim()
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
                    later.add(asyncio.create_task(self._signal_later(pid, signal.SIGCONT, hold)))
        except ProcessLookupError:
            return
        at = time.monotonic() - self.t0
        self.faults.append(Fault(at, kind, slot, pid, time.time(), in_call))

    async def _signal_later(self, pid: int, sig: signal.Signals, delay: float) -> None:
        await asyncio.sleep(delay)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        self.stopped_pids.discard(pid)

    async def chaos(self, plan: ChaosPlan, redis_server: RedisServer | None) -> None:
        later: set[asyncio.Task[None]] = set()
        if redis_server is not None:
            for at in plan.redis_restarts:
                later.add(asyncio.create_task(self._redis_fault(redis_server, at, 0.0)))
            for at, seconds in plan.redis_outages:
                later.add(asyncio.create_task(self._redis_fault(redis_server, at, seconds)))
        try:
            if plan.schedule:
                for fault in sorted(plan.schedule, key=lambda f: f.at):
                    await asyncio.sleep(max(0.0, self.t0 + fault.at - time.monotonic()))
                    if not self.is_running():
                        break
                    self._strike(fault.kind, fault.hold, later)
            elif plan.interval > 0:
                while self.is_running():
                    await asyncio.sleep(self.rng.expovariate(1.0 / plan.interval))
                    if not self.is_running():
                        break
                    kind = self.rng.choice(plan.kinds)
                    self._strike(kind, plan.stop_short if kind == "stop_short" else 0.0, later)
            while self.is_running():  # Redis faults may still be due
                await asyncio.sleep(0.1)
        finally:
            for task in later:
                task.cancel()
            await asyncio.gather(*later, return_exceptions=True)

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

    def release_stopped(self) -> None:
        for pid in list(self.stopped_pids):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        self.stopped_pids.clear()

    # -- recovery times ----------------------------------------------------------

    def _first_call_after(self, slot: int, wall: float) -> float | None:
        """Seconds from ``wall`` to the first successful call started on ``slot``.

        After a SIGKILL or a permanent SIGSTOP the victim starts nothing more,
        so that call is its replacement's.
        """
        later = [t for t in self.call_starts.get(slot, ()) if t > wall]
        return min(later) - wall if later else None

    def recovery(self) -> tuple[list[float], list[float], list[float]]:
        kills: list[float] = []
        detection: list[float] = []
        hang: list[float] = []
        killed = [e for e in self.supervisor.events if e.kind == "killed"]
        for fault in self.faults:
            if fault.kind == "kill":
                took = self._first_call_after(fault.slot, fault.wall)
                if took is not None:
                    kills.append(took)
            elif fault.kind == "stop_long":
                since = self.t0 + fault.at
                hit = next((e for e in killed if e.slot == fault.slot and e.at >= since), None)
                if hit is not None:
                    detection.append(hit.at - since)
                took = self._first_call_after(fault.slot, fault.wall)
                if took is not None:
                    hang.append(took)
        return kills, detection, hang

    # -- accounting --------------------------------------------------------------

    async def drain(self) -> int:
        deadline = time.monotonic() + self.s.drain_timeout
        left = -1
        while time.monotonic() < deadline:
            try:
                pipe = self.r.pipeline(transaction=False)
                pipe.llen(self.keys.queue)
                for i in range(self.s.slots):
                    pipe.llen(self.keys.inflight(i))
                left = sum(int(x) for x in await pipe.execute())
            except RedisError:
                left = -1
            if left == 0:
                return 0
            await asyncio.sleep(0.1)
        return max(left, 0)

    async def outcomes(self) -> Outcomes:
        counts = {"ok": 0, "expired": 0, "dead": 0, "lost": 0, "duplicated": 0}
        ids = self.accepted + self.uncertain
        certain = len(self.accepted)
        reasons: list[str] = []
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            pipe = self.r.pipeline(transaction=False)
            for job_id in chunk:
                pipe.llen(self.keys.result(job_id))
                pipe.lindex(self.keys.result(job_id), 0)
            answers = await pipe.execute()
            for k, job_id in enumerate(chunk):
                n, raw = int(answers[2 * k]), answers[2 * k + 1]
                if n == 0:
                    if start + k < certain:
                        counts["lost"] += 1
                    continue
                if start + k >= certain:
                    self.accepted.append(job_id)  # the uncertain submit did land
                if n > 1:
                    counts["duplicated"] += 1
                doc = json.loads(raw)
                counts[doc["status"]] = counts.get(doc["status"], 0) + 1
                if doc.get("started_at") is not None:
                    self.call_starts.setdefault(int(doc["slot"]), []).append(doc["started_at"])
                if doc["status"] == "dead" and len(reasons) < 20:
                    reasons.append(str(doc.get("error")))
        return Outcomes(submitted=len(self.accepted), counts=counts, dead_reasons=reasons)

    def snapshot(self, last_ok: int, dt: float) -> Snapshot:
        st = self.api.stats(include_samples=False)
        elapsed = time.monotonic() - self.t0 if self.t0 else 0.0
        return Snapshot(
            elapsed=elapsed,
            duration=self.s.duration,
            limit=st.limit,
            active=st.active,
            in_flight=st.in_flight,
            max_concurrency=st.max_concurrency,
            over_limit_seconds=st.over_limit_seconds,
            utilization=st.utilisation,
            queued=self.queued,
            busy_slots=sum(self.busy.values()),
            ok_calls=st.ok_total,
            throughput=(st.ok_total - last_ok) / dt if dt > 0 else 0.0,
            restarts=self.supervisor.restarts,
            faults=len(self.faults),
            submitted=len(self.accepted),
        )


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


async def run_scenario(
    scenario: Scenario,
    *,
    on_tick: Callable[[Snapshot], None] | None = None,
    tick: float = 0.25,
) -> ScenarioResult:
    """Run one scenario to its end and account for every job."""
    chaos = scenario.chaos
    async with contextlib.AsyncExitStack() as stack:
        server: RedisServer | None = None
        if scenario.redis_url is None:
            server = await _start_redis(stack, appendonly=bool(chaos and chaos.touches_redis))
        redis_url = scenario.redis_url or (server.url if server else "")
        log_dir = scenario.log_dir or stack.enter_context(
            tempfile.TemporaryDirectory(prefix="apipool-run-")
        )
        api = StandInApi(scenario.api_limit or scenario.slots, default_ms=scenario.call_ms)
        await stack.enter_async_context(api)
        run = _Run(scenario, redis_url, api, log_dir)
        stack.push_async_callback(run.r.aclose)
        sup_task = asyncio.create_task(run.supervisor.run(install_signals=False))

        async def stop_supervisor() -> None:
            run.release_stopped()
            run.supervisor.stop()
            await asyncio.gather(sup_task, return_exceptions=True)

        stack.push_async_callback(stop_supervisor)
        tasks = [asyncio.create_task(run.produce()), asyncio.create_task(run.observe())]
        stack.push_async_callback(run.stop_tasks, tasks)

        await run.wait_ready()
        api.reset()
        run.t0 = time.monotonic()
        if chaos is not None:
            tasks.append(asyncio.create_task(run.chaos(chaos, server)))
        end = run.t0 + scenario.duration
        last_ok, last_t = 0, run.t0
        while (now := time.monotonic()) < end:
            await asyncio.sleep(min(tick, end - now))
            if on_tick is not None:
                snap = run.snapshot(last_ok, time.monotonic() - last_t)
                last_ok, last_t = snap.ok_calls, time.monotonic()
                on_tick(snap)
        measured = api.stats()
        run.running = False
        await asyncio.gather(*tasks, return_exceptions=True)
        run.release_stopped()
        unfinished = await run.drain()
        # Calls of the window answered after its end count for their part inside it.
        useful = api.useful_between(0.0, measured.elapsed_seconds)
        outcomes = await run.outcomes()
        kills, detection, hang = run.recovery()
    n, window = scenario.slots, measured.elapsed_seconds
    return ScenarioResult(
        slots=n,
        limit=measured.limit,
        duration=window,
        call_ms=scenario.call_ms,
        chaos=chaos is not None,
        max_concurrency=measured.max_concurrency,
        max_in_flight=measured.max_in_flight,
        over_limit_seconds=measured.over_limit_seconds,
        over_limit_events=measured.over_limit_events,
        rejected=measured.rejected_total,
        utilization=measured.utilisation,
        goodput=useful / (n * window) if n and window else 0.0,
        api_calls_ok=measured.ok_total,
        submitted=outcomes.submitted,
        completed=outcomes.counts["ok"],
        expired=outcomes.counts["expired"],
        dead=outcomes.counts["dead"],
        lost=outcomes.counts["lost"],
        duplicated=outcomes.counts["duplicated"],
        unfinished=unfinished,
        restarts=run.supervisor.restarts,
        faults=run.faults,
        kill_recovery=kills,
        hang_detection=detection,
        hang_recovery=hang,
        timeline=measured.samples,
        dead_reasons=outcomes.dead_reasons,
    )
