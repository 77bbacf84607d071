"""Slot overhead: one slot with a no-op handler vs bare redis-py loops doing the same Redis work.

Everything runs on one throwaway redis-server, side by side, in rounds (slot,
bare asyncio loop, bare sync loop, slot with a sync handler). Per round and per
contender, K envelopes are built beforehand in a staging list, which one
``RENAME`` turns into the queue; the clock starts right before it.

- ``slot``: ``python -m apipool slot`` (subprocess) with ``bench.handlers:noop``
  (async). The benchmark blocks on the last job's result key (``BLMOVE key key``,
  no polling while the slot drains); the clock stops at the ``finished_at`` of
  that result record (jobs are FIFO; the slot stamps it right before that job's
  COMPLETE).
- ``slot_sync``: the same with ``bench.handlers:noop_sync`` (run in a thread).
- ``bare_async``: ``redis.asyncio`` with the slot's client settings, doing the
  Redis commands a busy slot does: per job one COMPLETE step
  (:meth:`apipool.protocol.PoolProtocol.complete`, an EVALSHA) with the
  arguments a slot passes (result key, result record, TTL, ``Outcome.OK``, busy
  ms, no dead entry) and ``take_next``, which moves the next envelope to the
  in-flight list and returns it; ``BLMOVE queue inflight RIGHT LEFT`` only when
  no next envelope came back (the first job of a round). The steps (result
  keys and records included) are built beforehand, so the loop is nothing but
  those round trips. The clock stops after the last COMPLETE.
- ``bare_sync``: the same loop with sync ``redis.Redis``, for reference.

``ratio`` = slot jobs/s ÷ bare_async jobs/s, each the median over the rounds
(5 rounds of 20 000 jobs; quick: 1 of 2000).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.retry import Retry

from apipool.envelope import Envelope, make_envelope, result_record
from apipool.protocol import FinishCode, Finished, Outcome, PoolKeys, PoolProtocol, Step
from apipool.testing.redis_server import RedisServer

from .common import Figures, SlotSubprocess, Target, median

RESULT_TTL_MS = 3_600_000
"""What a slot passes by default (``result_ttl`` 3600 s)."""
TAKE_BLOCK: Any = 0.5
"""The slot's default ``take_block`` (redis-py takes float seconds; its stubs say int)."""
WARMUP = 200
"""Jobs each contender runs before the first measured round."""
BLOCK_STEP: Any = 1.0
"""Seconds the benchmark blocks at a time waiting for the slot's last result."""

TARGETS = {"ratio": Target(">=", 0.7)}


@dataclass(frozen=True)
class Batch:
    """K staged jobs: their envelopes and what COMPLETE is passed for each."""

    envelopes: list[Envelope]
    raws: list[str]

    @property
    def last_id(self) -> str:
        return self.envelopes[-1].id


def stage(r: redis.Redis, keys: PoolKeys, k: int, serial: int) -> Batch:
    """Put ``k`` fresh envelopes in the staging list, first one taken first."""
    envelopes = [make_envelope({"i": serial + i}) for i in range(k)]
    raws = [env.to_json() for env in envelopes]
    staging = f"{keys.base}:staging"
    r.delete(staging)
    pipe = r.pipeline(transaction=False)
    for first in range(0, k, 1000):
        pipe.lpush(staging, *raws[first : first + 1000])  # LPUSH + take RIGHT: FIFO
    pipe.execute()
    return Batch(envelopes, raws)


def release(r: redis.Redis, keys: PoolKeys) -> float:
    """Turn the staging list into the queue in one step; return the start (wall clock)."""
    t0 = time.time()
    r.rename(f"{keys.base}:staging", keys.queue)
    return t0


Steps = dict[bytes, Step[Finished]]
"""Per raw envelope (as Redis returns it): the COMPLETE step that finishes it."""


def complete_steps(proto: PoolProtocol, batch: Batch) -> Steps:
    """Per raw envelope: the COMPLETE-and-take step slot 0 would send for it."""
    now = time.time()
    steps: Steps = {}
    for env, raw in zip(batch.envelopes, batch.raws, strict=True):
        record = result_record(
            job_id=env.id, status=Outcome.OK, attempt=env.attempt, slot=0, started_at=now
        )
        taken = raw.encode()  # what BLMOVE and COMPLETE's take return
        steps[taken] = proto.complete(
            0,
            taken,
            result_key=proto.result_key(env.id),
            record=record,
            ttl_ms=RESULT_TTL_MS,
            outcome=Outcome.OK,
            take_next=True,
        )
    return steps


class SlotContender:
    """A slot subprocess serving its own pool."""

    def __init__(self, r: redis.Redis, url: str, pool: str, handler: str) -> None:
        self.r = r
        self.keys = PoolKeys(pool)
        self.slot = SlotSubprocess(url, pool, [handler])
        self.done = 0
        self.serial = 0

    def start(self) -> None:
        self.slot.start()
        self.drain(WARMUP, timeout=30.0)  # also waits for the process to be up

    def _ok(self) -> int:
        return int(self.r.hget(self.keys.stats, "ok") or 0)

    def _wait_record(self, key: str, timeout: float) -> bytes:
        """Block until the result record at ``key`` exists, without removing it.

        One blocking command at a time (a rotation of the one-element list), so
        nothing polls Redis or takes CPU from the slot while it drains.
        """
        deadline = time.monotonic() + timeout
        while True:
            self.slot.check_alive()
            if time.monotonic() > deadline:
                raise TimeoutError(f"slot draining: no result at {key} within {timeout:g} s")
            record = self.r.blmove(key, key, BLOCK_STEP, "RIGHT", "RIGHT")
            if record is not None:
                return record if isinstance(record, bytes) else str(record).encode()

    def drain(self, k: int, timeout: float = 300.0) -> float:
        """Let the slot run ``k`` jobs; return jobs/s."""
        batch = stage(self.r, self.keys, k, self.serial)
        self.serial += k
        target = self.done + k
        t0 = release(self.r, self.keys)
        # Jobs are FIFO and one slot runs them one by one: the last job's result
        # comes last.
        record = self._wait_record(self.keys.result(batch.last_id), timeout)
        if self._ok() != target:
            raise RuntimeError(f"slot: ok counter {self._ok()} after the last job, not {target}")
        self.done = target
        return k / (float(json.loads(record)["finished_at"]) - t0)

    def stop(self) -> None:
        self.slot.stop()


def _raw(reply: Any) -> bytes | None:
    """An envelope as Redis returned it (bytes; str only if a client decodes)."""
    if reply is None:
        return None
    return reply if isinstance(reply, bytes) else str(reply).encode()


def _next_of(finished: Finished) -> bytes | None:
    """Check a COMPLETE answer; return the next envelope it took, if any."""
    if finished.code != FinishCode.DONE:
        raise RuntimeError(f"COMPLETE answered {finished.code!r}, not DONE")
    return _raw(finished.next)


class BareAsync:
    """COMPLETE-and-take (+ BLMOVE when nothing came back) with ``redis.asyncio``,
    configured like the slot's client."""

    def __init__(self, r: redis.Redis, url: str, pool: str) -> None:
        self.r = r
        self.url = url
        self.proto = PoolProtocol(pool)
        self.keys = self.proto.keys
        self.serial = 0
        self.blmoves: list[int] = []

    def start(self) -> None:
        self.drain(WARMUP)
        self.blmoves.clear()

    def drain(self, k: int) -> float:
        batch = stage(self.r, self.keys, k, self.serial)
        self.serial += k
        steps = complete_steps(self.proto, batch)
        seconds, blmoves = asyncio.run(self._loop(k, steps))
        self.blmoves.append(blmoves)
        return k / seconds

    async def _loop(self, k: int, steps: Steps) -> tuple[float, int]:
        """Run ``k`` jobs; return the seconds taken and the number of BLMOVEs sent."""
        client = aioredis.Redis.from_url(
            self.url,
            socket_timeout=TAKE_BLOCK + 5.0,
            socket_connect_timeout=2.0,
            retry=AsyncRetry(NoBackoff(), 0),
            decode_responses=False,
        )
        keys = self.keys
        inflight = keys.inflight(0)
        blmoves = 0
        try:
            await client.ping()  # connect before the clock starts
            t0 = time.perf_counter()
            release(self.r, keys)
            raw: bytes | None = None
            for _ in range(k):
                if raw is None:  # the queue was empty at the last COMPLETE: block
                    blmoves += 1
                    raw = _raw(
                        await client.blmove(keys.queue, inflight, TAKE_BLOCK, "RIGHT", "LEFT")
                    )
                    if raw is None:
                        raise RuntimeError("bare async loop: the queue ran dry early")
                raw = _next_of(await steps[raw].arun(client))
            return time.perf_counter() - t0, blmoves
        finally:
            await client.aclose()


class BareSync:
    """The same loop with sync ``redis.Redis``."""

    def __init__(self, r: redis.Redis, url: str, pool: str) -> None:
        self.r = r
        self.proto = PoolProtocol(pool)
        self.keys = self.proto.keys
        self.client = redis.Redis.from_url(
            url, socket_timeout=TAKE_BLOCK + 5.0, retry=Retry(NoBackoff(), 0)
        )
        self.serial = 0

    def start(self) -> None:
        self.drain(WARMUP)

    def drain(self, k: int) -> float:
        batch = stage(self.r, self.keys, k, self.serial)
        self.serial += k
        steps = complete_steps(self.proto, batch)
        keys, client = self.keys, self.client
        inflight = keys.inflight(0)
        client.ping()
        t0 = time.perf_counter()
        release(self.r, keys)
        raw: bytes | None = None
        for _ in range(k):
            if raw is None:
                raw = _raw(client.blmove(keys.queue, inflight, TAKE_BLOCK, "RIGHT", "LEFT"))
                if raw is None:
                    raise RuntimeError("bare sync loop: the queue ran dry early")
            raw = _next_of(steps[raw].run(client))
        return k / (time.perf_counter() - t0)

    def stop(self) -> None:
        self.client.close()


def run(*, quick: bool = False, seed: int = 1) -> Figures:
    k = 2000 if quick else 20000
    rounds = 1 if quick else 5
    rates: dict[str, list[float]] = {}
    server = RedisServer()
    server.start()
    r = redis.Redis.from_url(server.url, socket_timeout=10.0)
    slot = SlotContender(r, server.url, "bench-overhead-slot", "bench.handlers:noop")
    slot_sync = SlotContender(r, server.url, "bench-overhead-sync", "bench.handlers:noop_sync")
    bare_async = BareAsync(r, server.url, "bench-overhead-bare")
    bare_sync = BareSync(r, server.url, "bench-overhead-bare-sync")
    contenders: dict[str, tuple[Callable[[], None], Callable[[int], float]]] = {
        "slot": (slot.start, slot.drain),
        "bare_async": (bare_async.start, bare_async.drain),
        "bare_sync": (bare_sync.start, bare_sync.drain),
        "slot_sync": (slot_sync.start, slot_sync.drain),
    }
    try:
        for start, _ in contenders.values():
            start()
        for _ in range(rounds):
            for name, (_, drain) in contenders.items():
                rates.setdefault(name, []).append(drain(k))
    finally:
        slot.stop()
        slot_sync.stop()
        bare_sync.stop()
        r.close()
        server.close()

    best = {name: median(values) for name, values in rates.items()}
    figures: Figures = {"jobs_per_round": k, "rounds": rounds}
    for name, value in best.items():
        figures[f"{name}_jobs_per_s"] = round(value, 1)
        figures[f"{name}_us_per_job"] = round(1e6 / value, 1)
    figures["ratio"] = round(best["slot"] / best["bare_async"], 3)
    figures["ratio_vs_sync"] = round(best["slot"] / best["bare_sync"], 3)
    figures["ratio_sync_handler"] = round(best["slot_sync"] / best["bare_async"], 3)
    figures["rounds_slot_jobs_per_s"] = " ".join(f"{x:.0f}" for x in rates["slot"])
    figures["rounds_bare_async_jobs_per_s"] = " ".join(f"{x:.0f}" for x in rates["bare_async"])
    # Slot and bare loop run back to back in a round: their ratio per round, for the spread.
    figures["rounds_ratio"] = " ".join(
        f"{a / b:.2f}" for a, b in zip(rates["slot"], rates["bare_async"], strict=True)
    )
    # 1 per round: only the first job of a round is taken by BLMOVE.
    figures["bare_async_blmoves_per_round"] = max(bare_async.blmoves)
    return figures
