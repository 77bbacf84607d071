"""A general worker for the limiter systems: acquire, call the stand-in, release.

Run as ``python -m compare.worker --system dramatiq|zset ...``. Every worker
uses the same HTTP client code: one aiohttp session with
``TCPConnector(limit=1, force_close=True)`` -- at most one connection, opened
after the limiter is acquired and closed before it is released (a limiter
system must not keep a connection open while not holding the limiter, or M
idle keep-alive connections would exceed N).

Bookkeeping (not part of either limiter) goes to Redis: ``compare:started``
before a call, ``compare:ok`` / ``compare:rejected`` / ``compare:errors``
after it, and ``compare:holding`` (pid -> 1) while the worker holds the
limiter, so the chaos driver can pick victims that are in a call.

The loop ends on SIGTERM (after the current call), when the parent process
disappears, or after ``--max-runtime`` seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager

import aiohttp
import redis

STARTED = "compare:started"
OK = "compare:ok"
REJECTED = "compare:rejected"
ERRORS = "compare:errors"
HOLDING = "compare:holding"
LIMITER_KEY = "compare:limiter"


def dramatiq_limiter(
    r_url: str, limit: int, ttl: float
) -> Callable[[], AbstractContextManager[bool]]:
    from dramatiq.rate_limits import ConcurrentRateLimiter
    from dramatiq.rate_limits.backends import RedisBackend

    limiter = ConcurrentRateLimiter(  # type: ignore[no-untyped-call]
        RedisBackend(url=r_url), LIMITER_KEY, limit=limit, ttl=int(ttl * 1000)
    )
    return lambda: limiter.acquire(raise_on_failure=False)


def zset_limiter(
    r: redis.Redis, limit: int, timeout: float
) -> Callable[[], AbstractContextManager[bool]]:
    """The sorted-set semaphore: holders scored by acquire time, expired after ``timeout``."""

    @contextmanager
    def acquire() -> Iterator[bool]:
        ident = uuid.uuid4().hex
        now = time.time()
        pipe = r.pipeline(transaction=True)
        pipe.zremrangebyscore(LIMITER_KEY, "-inf", now - timeout)
        pipe.zadd(LIMITER_KEY, {ident: now})
        pipe.zrank(LIMITER_KEY, ident)
        rank = pipe.execute()[-1]
        if rank is None or rank >= limit:
            r.zrem(LIMITER_KEY, ident)
            yield False
            return
        try:
            yield True
        finally:
            r.zrem(LIMITER_KEY, ident)

    return acquire


async def work(args: argparse.Namespace) -> None:
    running = True

    def stop(*_: object) -> None:
        nonlocal running
        running = False

    signal.signal(signal.SIGTERM, stop)
    parent = os.getppid()
    r = redis.Redis.from_url(args.redis_url, socket_timeout=10)
    if args.system == "dramatiq":
        acquire = dramatiq_limiter(args.redis_url, args.limit, args.ttl)
    else:
        acquire = zset_limiter(r, args.limit, args.ttl)
    pid = str(os.getpid())
    url = f"{args.api_url}/work?ms={args.call_ms:g}"
    deadline = time.monotonic() + args.max_runtime
    connector = aiohttp.TCPConnector(limit=1, force_close=True)
    timeout = aiohttp.ClientTimeout(total=args.call_timeout)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
        while running and os.getppid() == parent and time.monotonic() < deadline:
            try:
                with acquire() as acquired:
                    if not acquired:
                        await asyncio.sleep(args.backoff)
                        continue
                    pipe = r.pipeline(transaction=False)
                    pipe.incr(STARTED)
                    pipe.hset(HOLDING, pid, 1)
                    pipe.execute()
                    outcome = ERRORS
                    try:
                        async with http.get(url) as resp:
                            await resp.read()
                            outcome = OK if resp.status == 200 else REJECTED
                    except (aiohttp.ClientError, TimeoutError, OSError):
                        outcome = ERRORS
                    # The transport closes its socket on a later loop turn: let it,
                    # so the connection is gone before the limiter is released.
                    for _ in range(3):
                        await asyncio.sleep(0)
                    pipe = r.pipeline(transaction=False)
                    pipe.incr(outcome)
                    pipe.hdel(HOLDING, pid)
                    pipe.execute()
            except redis.RedisError:
                await asyncio.sleep(0.1)


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m compare.worker")
    p.add_argument("--system", choices=("dramatiq", "zset"), required=True)
    p.add_argument("--redis-url", required=True)
    p.add_argument("--api-url", required=True)
    p.add_argument("--limit", type=int, required=True)
    p.add_argument("--ttl", type=float, required=True, help="seconds")
    p.add_argument("--call-ms", type=float, default=100.0)
    p.add_argument("--call-timeout", type=float, default=30.0)
    p.add_argument("--backoff", type=float, default=0.005)
    p.add_argument("--max-runtime", type=float, default=600.0)
    asyncio.run(work(p.parse_args()))


if __name__ == "__main__":
    main()
