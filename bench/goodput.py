"""No-fault goodput at 100 ms and 10 ms calls: a full pool, and the floor of this machine.

For each call length, three runs one after the other, each against its own
stand-in API with a hard limit of N:

- ``pool``: :func:`apipool.testing.harness.run_scenario` without faults: a throwaway
  redis-server, a local supervisor running N slot processes with the built-in
  ``http`` handler (one kept-alive connection per slot), producers that keep
  the queue full.
- ``floor``: N bare client processes (``multiprocessing``), each an aiohttp loop
  over one kept-alive connection (``TCPConnector(limit=1)``) calling the stand-in
  (:class:`apipool.testing.standin.StandInThread`) back to back: no Redis, no slot code.
  This is the best N single-connection Python processes do on this machine, so
  ``pool_vs_floor`` is the share of it that the pool reaches.
- ``floor_redis``: the same clients, each also sending, after every call, the
  one Redis round trip a busy slot makes between two calls (the COMPLETE-and-take
  EVALSHA, see :class:`RedisStep`) to a redis-server of its own. No slot code:
  what is left between ``floor_redis`` and ``pool`` is the slot's own cost.

Both are measured the same way: the stand-in's counters are reset once every
process is calling (the floor also warms up for ``FLOOR_WARMUP`` s first), the
window runs for ``duration``, and after the calls have stopped and been answered,
goodput = ``useful_between(0, window) / (N x window)``: the service time the API
spent on successful calls inside the window (calls straddling an edge count for
their part inside it) over the capacity of N connections for the window.
Utilization (pool only) is calls in flight / (N x window). ``cycle_ms`` is
N x window / calls answered in the window, the mean time a process spends per
call; ``gap_ms`` = (1 - goodput) x N x window / calls is the part of it during
which its connection served no call (Redis, slot code, HTTP client, wake-ups).
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import multiprocessing.context
import multiprocessing.queues
import multiprocessing.synchronize
import queue
import time
from dataclasses import dataclass

import aiohttp
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff

from apipool.envelope import make_envelope
from apipool.protocol import FinishCode, Finished, Outcome, PoolProtocol, Step
from apipool.testing.harness import Scenario, ScenarioResult, run_scenario
from apipool.testing.polling import wait_for
from apipool.testing.redis_server import RedisServer
from apipool.testing.standin import StandInThread

from .common import Figures, Target

SLOTS = 4
CALLS_MS = (100.0, 10.0)
FLOOR_WARMUP = 1.0
"""Seconds the floor's clients call before the window starts (quick: 0.3)."""
CALL_TIMEOUT = 2.0
"""A floor client's per-call timeout: the slots' default ``call_timeout``."""
KEEPALIVE_SECONDS = 30.0
"""As the built-in ``http`` handler."""
RESULT_TTL_MS = 3_600_000
"""What a slot passes by default (``result_ttl`` 3600 s)."""
FLOOR_POOL = "bench-floor-redis"
"""The scratch pool whose keys the ``floor_redis`` clients use (see :class:`RedisStep`)."""

TARGETS = {
    "goodput_100ms": Target(">=", 0.98),
    "goodput_10ms": Target(">=", 0.95),
    "pool_vs_floor_10ms": Target(">=", 0.97),
    "max_concurrency_100ms": Target("<=", SLOTS),
    "max_concurrency_10ms": Target("<=", SLOTS),
    "over_limit_s_100ms": Target("<=", 0.0),
    "over_limit_s_10ms": Target("<=", 0.0),
}

Counts = tuple[int, int, int]
"""What a floor client reports when it stops: (index, calls answered 200, other answers)."""


def gap_ms(goodput: float, slots: int, window: float, calls: int) -> float:
    """Mean time per answered call during which its connection served no call:
    capacity not served, ``(1 - goodput) x N x window``, over the calls."""
    return (1.0 - goodput) * slots * window / calls * 1000.0 if calls else float("nan")


def scenario_figures(result: ScenarioResult, suffix: str) -> Figures:
    """The figures of one no-fault pool run, names ending in ``suffix``."""
    calls = result.api_calls_ok
    cycle_ms = result.slots * result.duration / calls * 1000.0 if calls else float("nan")
    gap = gap_ms(result.goodput, result.slots, result.duration, calls)
    return {
        f"goodput{suffix}": round(result.goodput, 4),
        f"utilization{suffix}": round(result.utilization, 4),
        f"max_concurrency{suffix}": result.max_concurrency,
        f"over_limit_s{suffix}": round(result.over_limit_seconds, 3),
        f"throughput_per_s{suffix}": round(result.throughput, 1),
        # Mean time a slot spends per answered call: call time + everything else.
        f"cycle_ms{suffix}": round(cycle_ms, 2),
        f"gap_ms{suffix}": round(gap, 2),
        f"lost{suffix}": result.lost,
    }


# -- the floor: bare keep-alive clients, no Redis, no slot ----------------------------


@dataclass(frozen=True)
class RedisStep:
    """For the ``floor_redis`` variant: one COMPLETE-and-take EVALSHA after every call.

    Client ``index`` plays slot ``index`` of a scratch pool (``pool``). Its
    in-flight list starts with ``envelope``, and each step completes it with
    the same string as the result record, written to the pool's queue list: the
    result is the job again. So the script does all of its work (TYPE, LREM,
    LPUSH, PEXPIRE, HINCRBY, LMOVE) and takes that envelope back as the next
    job, every time, with nothing to refill. The queue is empty between two
    steps (each script pushes one and takes one, atomically), so the clients
    can share it. A real pool writes results to a job's own result key; here
    that would leave the queue dry after the first step.
    """

    url: str
    pool: str
    index: int
    envelope: str

    def protocol(self) -> PoolProtocol:
        return PoolProtocol(self.pool)

    def complete(self, proto: PoolProtocol) -> Step[Finished]:
        """The one step, sent after every call (built once: it never changes)."""
        return proto.complete(
            self.index,
            self.envelope.encode(),
            result_key=proto.keys.queue,
            record=self.envelope,
            ttl_ms=RESULT_TTL_MS,
            outcome=Outcome.OK,
            take_next=True,
        )


async def _call_loop(
    url: str, stop: multiprocessing.synchronize.Event, step: RedisStep | None
) -> tuple[int, int]:
    """Call ``url`` back to back over one kept-alive connection until ``stop`` is set."""
    ok = other = 0
    timeout = aiohttp.ClientTimeout(total=CALL_TIMEOUT)
    connector = aiohttp.TCPConnector(limit=1, keepalive_timeout=KEEPALIVE_SECONDS)
    r: aioredis.Redis | None = None
    complete: Step[Finished] | None = None
    if step is not None:  # configured like a slot's client
        r = aioredis.Redis.from_url(
            step.url,
            socket_timeout=5.0,
            socket_connect_timeout=2.0,
            retry=AsyncRetry(NoBackoff(), 0),
            decode_responses=False,
        )
        proto = step.protocol()
        complete = step.complete(proto)
        inflight = proto.keys.inflight(step.index)
        await r.delete(inflight, proto.keys.queue)  # empty between steps: safe to share
        await r.rpush(inflight, step.envelope)
    try:
        async with aiohttp.ClientSession(connector=connector, raise_for_status=False) as session:
            while not stop.is_set():
                async with session.get(url, timeout=timeout) as response:
                    await response.text()
                    if response.status == 200:
                        ok += 1
                    else:
                        other += 1
                if r is not None and complete is not None:
                    finished = await complete.arun(r)
                    if finished.code != FinishCode.DONE or finished.next is None:
                        raise RuntimeError(f"COMPLETE answered {finished!r}")
    finally:
        if r is not None:
            await r.aclose()
    return ok, other


def floor_client(
    index: int,
    url: str,
    stop: multiprocessing.synchronize.Event,
    results: multiprocessing.queues.Queue[Counts],
    step: RedisStep | None,
) -> None:
    """A floor client process: the call loop, then its counts on ``results``."""
    ok, other = asyncio.run(_call_loop(url, stop, step))
    results.put((index, ok, other))


@dataclass(frozen=True)
class FloorResult:
    slots: int
    window: float
    """Seconds from the reset to the end of the measured window."""
    goodput: float
    calls_ok: int
    """200 answers whose service ended inside the window."""
    max_concurrency: int
    other_answers: int
    """Answers other than 200 over the whole run (expected: 0)."""

    @property
    def cycle_ms(self) -> float:
        """Mean time a client spends per answered call."""
        return self.slots * self.window / self.calls_ok * 1000.0 if self.calls_ok else float("nan")

    @property
    def gap_ms(self) -> float:
        return gap_ms(self.goodput, self.slots, self.window, self.calls_ok)


def run_floor(
    slots: int, call_ms: float, duration: float, warmup: float, redis_url: str | None = None
) -> FloorResult:
    """N bare client processes against a stand-in with a limit of N, measured like a pool.

    With ``redis_url``, each client also sends one COMPLETE-and-take EVALSHA to
    that Redis after every call (see :class:`RedisStep`).
    """
    ctx = multiprocessing.get_context("spawn")  # the stand-in runs in a thread: no fork
    stop = ctx.Event()
    results: multiprocessing.queues.Queue[Counts] = ctx.Queue()
    standin = StandInThread(slots, default_ms=call_ms)
    api = standin.start()
    url = f"{api.url}/work?ms={call_ms:g}"
    envelope = make_envelope({"method": "GET", "url": url}).to_json()

    def step(i: int) -> RedisStep | None:
        if redis_url is None:
            return None
        return RedisStep(url=redis_url, pool=FLOOR_POOL, index=i, envelope=envelope)

    procs = [
        ctx.Process(target=floor_client, args=(i, url, stop, results, step(i)), name=f"floor-{i}")
        for i in range(slots)
    ]
    try:
        for proc in procs:
            proc.start()

        def all_calling() -> bool:
            for proc in procs:
                if proc.exitcode is not None:
                    raise RuntimeError(f"floor client {proc.name} exited with {proc.exitcode}")
            return api.stats(include_samples=False).active >= slots

        wait_for(all_calling, 30.0, interval=0.02, what="floor clients connecting")
        time.sleep(warmup)
        api.reset()
        time.sleep(duration)
        measured = api.stats(include_samples=False)
        stop.set()
        counts: list[Counts] = []
        deadline = time.monotonic() + CALL_TIMEOUT + 10.0
        while len(counts) < slots:
            try:
                counts.append(results.get(timeout=max(0.1, deadline - time.monotonic())))
            except queue.Empty as exc:
                raise RuntimeError(f"only {len(counts)} of {slots} floor clients stopped") from exc
        for proc in procs:
            proc.join(10.0)
        # Calls of the window answered after its end count for their part inside it.
        window = measured.elapsed_seconds
        useful = api.useful_between(0.0, window)
    finally:
        stop.set()
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
            with contextlib.suppress(AssertionError):  # never started
                proc.join(5.0)
        results.close()
        standin.stop()
    return FloorResult(
        slots=slots,
        window=window,
        goodput=useful / (slots * window),
        calls_ok=measured.ok_total,
        max_concurrency=measured.max_concurrency,
        other_answers=sum(other for _, _, other in counts),
    )


def floor_figures(result: FloorResult, prefix: str, suffix: str) -> Figures:
    return {
        f"{prefix}_goodput{suffix}": round(result.goodput, 4),
        f"{prefix}_cycle_ms{suffix}": round(result.cycle_ms, 2),
        f"{prefix}_gap_ms{suffix}": round(result.gap_ms, 2),
        f"{prefix}_max_concurrency{suffix}": result.max_concurrency,
        f"{prefix}_errors{suffix}": result.other_answers,
    }


def run(*, quick: bool = False, seed: int = 1) -> Figures:
    duration = 3.0 if quick else 20.0
    warmup = 0.3 if quick else FLOOR_WARMUP
    figures: Figures = {"slots": SLOTS, "duration_s": duration}
    ratios: Figures = {}
    server = RedisServer()  # for floor_redis only; the pool runs start their own
    server.start()
    try:
        for call_ms in CALLS_MS:
            suffix = f"_{call_ms:g}ms"
            scenario = Scenario(slots=SLOTS, duration=duration, call_ms=call_ms, seed=seed)
            pool = asyncio.run(run_scenario(scenario))
            figures.update(scenario_figures(pool, suffix))
            floor = run_floor(SLOTS, call_ms, duration, warmup)
            figures.update(floor_figures(floor, "floor", suffix))
            with_redis = run_floor(SLOTS, call_ms, duration, warmup, server.url)
            figures.update(floor_figures(with_redis, "floor_redis", suffix))
            ratios[f"pool_vs_floor{suffix}"] = round(pool.goodput / floor.goodput, 4)
            ratios[f"pool_vs_floor_redis{suffix}"] = round(pool.goodput / with_redis.goodput, 4)
    finally:
        server.close()
    figures.update(ratios)
    return figures
