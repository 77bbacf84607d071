"""Run a limiter system (dramatiq or zset): M general worker processes, restarted when killed."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import sys
import tempfile
import time
from typing import IO, Any

import redis

from apipool.testing.polling import WaitTimeout, async_wait_for
from apipool.testing.redis_server import RedisServer
from apipool.testing.standin import StandInApi

from . import worker as w
from .schedule import Done, Planned, Settings, recovery_times


class _Fleet:
    def __init__(self, system: str, s: Settings, redis_url: str, api: StandInApi, log_dir: str):
        self.system, self.s, self.redis_url, self.api, self.log_dir = (
            system,
            s,
            redis_url,
            api,
            log_dir,
        )
        self.procs: list[asyncio.subprocess.Process | None] = [None] * s.workers
        self.stopped: set[int] = set()
        self.restarts = 0
        self.stopping = False

    def _cmd(self) -> list[str]:
        s = self.s
        return [
            sys.executable,
            "-m",
            "compare.worker",
            "--system",
            self.system,
            "--redis-url",
            self.redis_url,
            "--api-url",
            self.api.url,
            "--limit",
            str(s.limit),
            "--ttl",
            str(s.ttl),
            "--call-ms",
            str(s.call_ms),
            "--backoff",
            str(s.backoff),
            "--max-runtime",
            str(s.duration + 120),
        ]

    def _log(self, i: int) -> IO[bytes]:
        return open(os.path.join(self.log_dir, f"{self.system}-{i}.log"), "ab")

    async def keep(self, i: int) -> None:
        """Start worker ``i``, and start it again whenever it exits (a restart policy)."""
        starts = 0
        while not self.stopping and starts < 1000:
            starts += 1
            with self._log(i) as out:
                proc = await asyncio.create_subprocess_exec(
                    *self._cmd(),
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=out,
                    stderr=out,
                    start_new_session=True,
                )
            self.procs[i] = proc
            await proc.wait()
            self.stopped.discard(proc.pid)
            if not self.stopping:
                self.restarts += 1

    def pids(self) -> dict[int, int]:
        return {
            i: p.pid for i, p in enumerate(self.procs) if p is not None and p.returncode is None
        }

    async def stop(self, keepers: list[asyncio.Task[None]]) -> None:
        self.stopping = True
        for pid in list(self.stopped):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        for p in self.procs:
            if p is not None and p.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    p.send_signal(signal.SIGTERM)
        _, pending = await asyncio.wait(keepers, timeout=10)
        for p in self.procs:
            if p is not None and p.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    p.kill()
        if pending:
            await asyncio.wait(pending, timeout=10)


async def _cont_later(fleet: _Fleet, pid: int, delay: float) -> None:
    await asyncio.sleep(delay)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGCONT)
    fleet.stopped.discard(pid)


async def _chaos(
    fleet: _Fleet, r: redis.Redis, plan: list[Planned], t0: float, rng: random.Random
) -> list[Done]:
    done: list[Done] = []
    later: list[asyncio.Task[None]] = []
    try:
        for p in plan:
            await asyncio.sleep(max(0.0, t0 + p.at - time.monotonic()))
            pids = fleet.pids()
            live = {i: pid for i, pid in pids.items() if pid not in fleet.stopped}
            holding = {int(k) for k in await asyncio.to_thread(r.hkeys, w.HOLDING)}
            busy = sorted(i for i, pid in live.items() if pid in holding)
            pool = busy or sorted(live)
            if not pool:
                continue
            i = rng.choice(pool)
            pid = live[i]
            try:
                if p.kind == "kill":
                    os.kill(pid, signal.SIGKILL)
                else:
                    os.kill(pid, signal.SIGSTOP)
                    fleet.stopped.add(pid)
                    later.append(asyncio.create_task(_cont_later(fleet, pid, p.hold)))
            except ProcessLookupError:
                continue
            done.append(Done(round(time.monotonic() - t0, 3), p.kind, pid, i, bool(busy)))
        await asyncio.sleep(max(0.0, t0 + fleet.s.duration - time.monotonic()))
    finally:
        for task in later:
            task.cancel()
        await asyncio.gather(*later, return_exceptions=True)
    return done


async def run_limiter(system: str, s: Settings, plan: list[Planned]) -> dict[str, Any]:
    """One run of ``system`` ("dramatiq" or "zset"); figures as plain data."""
    server = RedisServer()
    await asyncio.to_thread(server.start)
    try:
        r = redis.Redis.from_url(server.url, socket_timeout=10)
        r.flushall()
        async with StandInApi(s.limit, default_ms=s.call_ms) as api:
            with tempfile.TemporaryDirectory(prefix=f"compare-{system}-") as log_dir:
                fleet = _Fleet(system, s, server.url, api, log_dir)
                keepers = [asyncio.create_task(fleet.keep(i)) for i in range(s.workers)]
                try:
                    # warm-up: until the API serves N calls at once (bounded; the run
                    # goes ahead after 30 s either way)
                    with contextlib.suppress(WaitTimeout):
                        await async_wait_for(
                            lambda: api.stats(include_samples=False).in_flight >= s.limit,
                            30.0,
                            what=f"{s.limit} calls in flight",
                        )
                    await asyncio.sleep(0.5)
                    api.reset()
                    t0 = time.monotonic()
                    base = {k: int(r.get(k) or 0) for k in (w.STARTED, w.OK, w.REJECTED, w.ERRORS)}
                    faults = await _chaos(fleet, r, plan, t0, random.Random(s.seed + 1))
                    measured = api.stats()
                finally:
                    stopped_at_end = len(fleet.stopped)
                    await fleet.stop(keepers)
                useful = api.useful_between(0.0, measured.elapsed_seconds)
                totals = {k: int(r.get(k) or 0) for k in base}
                counts = {k: totals[k] - base[k] for k in base}
        r.close()
    finally:
        await asyncio.to_thread(server.close)
    window = measured.elapsed_seconds
    started, ok = counts[w.STARTED], counts[w.OK]
    rej, err = counts[w.REJECTED], counts[w.ERRORS]
    return {
        "system": system,
        "limit": s.limit,
        "workers": s.workers,
        "window": window,
        "max_concurrency": measured.max_concurrency,
        "max_in_flight": measured.max_in_flight,
        "over_limit_seconds": measured.over_limit_seconds,
        "over_limit_events": measured.over_limit_events,
        "utilization": measured.utilisation,
        "goodput": useful / (s.limit * window) if window else 0.0,
        "calls_ok": ok,
        "rejected_429": rej,
        "calls_started": started,
        # over the whole run (warm-up included, which has no faults): every
        # worker that was not killed finished its call before it stopped
        "lost": totals[w.STARTED] - totals[w.OK] - totals[w.REJECTED] - totals[w.ERRORS],
        "lost_definition": "calls started but never answered to their worker "
        "(its process was killed mid-call); nothing redelivers them",
        "errors": err,
        "restarts": fleet.restarts,
        "stopped_at_end": stopped_at_end,
        "faults": [f.__dict__ for f in faults],
        "recovery": recovery_times(measured.samples, faults, s.limit, window, s.call_ms),
        "samples": [list(x) for x in measured.samples],
    }
