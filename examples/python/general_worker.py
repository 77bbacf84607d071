"""A general worker: hands its API calls to an apipool pool and works meanwhile.

It never calls the external API itself. Each round it submits one request to
the pool (``Client.submit``), does its own work while a slot makes the call
(simulated here by CPU work and a sleep), then collects the response
(``Client.result``). With ``APIPOOL_INPUT_LIST`` set, a round starts only when
it pops a work item from that Redis list (its input backlog, on the pool's
Redis), as a worker of an RQ/resque-style queue would; that list, not the
pool's queue, is what an autoscaler should measure. It handles the pool's
typed errors:

- ``QueueFull``: the pool's queue is at its limit; back off exponentially
  (with jitter) and try again, without losing the work item;
- ``JobFailed`` (and its subclass ``JobExpired``): the job was dead-lettered
  or its deadline passed; log it and go on;
- ``ResultTimeout``: no answer in time; log it and go on (the job may still
  finish later; its result expires in Redis);
- ``RedisUnavailable``: back off as for ``QueueFull``.

Configuration, from the environment:

| variable | default | meaning |
|---|---|---|
| ``APIPOOL_REDIS_URL`` | (required) | the pool's Redis |
| ``APIPOOL_POOL`` | (required) | the pool's name |
| ``APIPOOL_TARGET_URL`` | (required) | the URL each job asks the slot to GET |
| ``APIPOOL_TARGET_METHOD`` | ``GET`` | the HTTP method of the request |
| ``APIPOOL_WORK_CPU_SECONDS`` | ``0.2`` | CPU-bound work per round while waiting |
| ``APIPOOL_WORK_SLEEP_SECONDS`` | ``0.5`` | idle (I/O-like) work per round |
| ``APIPOOL_RESULT_TIMEOUT`` | ``30`` | seconds to wait for a result |
| ``APIPOOL_JOB_DEADLINE`` | ``60`` | seconds after which a job is not worth calling |
| ``APIPOOL_MAX_BACKOFF`` | ``30`` | longest back-off in seconds |
| ``APIPOOL_ROUNDS`` | ``0`` | rounds to run before exiting; 0: until SIGTERM |
| ``APIPOOL_INPUT_LIST`` | (empty) | Redis list to pop one item from per round; empty: none |
| ``APIPOOL_INPUT_WAIT`` | ``5`` | seconds (> 0) one pop waits for an item |

Run it with the apipool package importable (the apipool image has it):
``python general_worker.py`` (the Helm chart mounts it at /app).
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from redis import Redis, RedisError

from apipool import Client, JobFailed, QueueFull, RedisUnavailable, ResultTimeout

log = logging.getLogger("general_worker")


@dataclass(frozen=True)
class Settings:
    redis_url: str
    pool: str
    target_url: str
    method: str = "GET"
    cpu_seconds: float = 0.2
    sleep_seconds: float = 0.5
    result_timeout: float = 30.0
    job_deadline: float = 60.0
    max_backoff: float = 30.0
    rounds: int = 0
    input_list: str = ""
    input_wait: float = 5.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        missing = [
            name
            for name in ("APIPOOL_REDIS_URL", "APIPOOL_POOL", "APIPOOL_TARGET_URL")
            if not env.get(name)
        ]
        if missing:
            raise SystemExit(f"general_worker: set {', '.join(missing)}")

        def number(name: str, default: float) -> float:
            raw = env.get(name, "").strip()
            try:
                value = float(raw) if raw else default
            except ValueError:
                raise SystemExit(f"general_worker: {name} must be a number, not {raw!r}") from None
            if value < 0:
                raise SystemExit(f"general_worker: {name} must be >= 0, not {raw!r}")
            return value

        def positive(name: str, default: float) -> float:
            # BLPOP with a timeout of 0 would block forever, deaf to SIGTERM.
            value = number(name, default)
            if value == 0:
                raise SystemExit(f"general_worker: {name} must be > 0")
            return value

        return cls(
            redis_url=env["APIPOOL_REDIS_URL"],
            pool=env["APIPOOL_POOL"],
            target_url=env["APIPOOL_TARGET_URL"],
            method=env.get("APIPOOL_TARGET_METHOD", "GET").upper() or "GET",
            cpu_seconds=number("APIPOOL_WORK_CPU_SECONDS", cls.cpu_seconds),
            sleep_seconds=number("APIPOOL_WORK_SLEEP_SECONDS", cls.sleep_seconds),
            result_timeout=number("APIPOOL_RESULT_TIMEOUT", cls.result_timeout),
            job_deadline=number("APIPOOL_JOB_DEADLINE", cls.job_deadline),
            max_backoff=number("APIPOOL_MAX_BACKOFF", cls.max_backoff),
            rounds=int(number("APIPOOL_ROUNDS", cls.rounds)),
            input_list=env.get("APIPOOL_INPUT_LIST", "").strip(),
            input_wait=positive("APIPOOL_INPUT_WAIT", cls.input_wait),
        )


class InputSource(Protocol):
    """The part of redis.Redis that reads the input list."""

    def blpop(self, keys: list[str], timeout: float) -> Any: ...


def take_item(source: InputSource, settings: Settings, stop: threading.Event) -> str | None:
    """Pop one work item from the input list; None when none came in time or Redis failed."""
    try:
        popped = source.blpop([settings.input_list], timeout=settings.input_wait)
    except RedisError as exc:
        delay = backoff_delay(1, settings.max_backoff)
        log.warning(
            "input list %s: redis error (%s): retry in %.2f s", settings.input_list, exc, delay
        )
        stop.wait(delay)
        return None
    if not popped:
        return None
    item = popped[1]
    return item.decode(errors="replace") if isinstance(item, bytes) else str(item)


def busy_work(cpu_seconds: float, sleep_seconds: float, stop: threading.Event) -> None:
    """The worker's own work while its API call is in flight: hashing, then idling."""
    end = time.process_time() + cpu_seconds
    digest = b"apipool"
    while time.process_time() < end:
        digest = hashlib.sha256(digest).digest()
    stop.wait(sleep_seconds)


def backoff_delay(failures: int, max_backoff: float) -> float:
    """Exponential back-off with full jitter: up to 0.1 s x 2^failures, capped."""
    return random.uniform(0, min(max_backoff, 0.1 * 2 ** min(failures, 16)))


def submit_with_backoff(
    client: Client, payload: dict[str, Any], settings: Settings, stop: threading.Event
) -> str | None:
    """Submit one job, backing off while the queue is full; None when stopped."""
    failures = 0
    while not stop.is_set():
        try:
            return client.submit(payload, deadline=time.time() + settings.job_deadline)
        except QueueFull as exc:
            failures += 1
            delay = backoff_delay(failures, settings.max_backoff)
            log.info(
                "queue full (%d queued, limit %d): retry in %.2f s", exc.depth, exc.limit, delay
            )
        except RedisUnavailable as exc:
            failures += 1
            delay = backoff_delay(failures, settings.max_backoff)
            log.warning("redis unavailable (%s): retry in %.2f s", exc, delay)
        stop.wait(delay)
    return None


def run_round(client: Client, settings: Settings, stop: threading.Event, n: int) -> str:
    """One unit of work; returns an outcome name (ok, failed, timeout, stopped)."""
    payload = {"method": settings.method, "url": settings.target_url}
    job_id = submit_with_backoff(client, payload, settings, stop)
    if job_id is None:
        return "stopped"
    busy_work(settings.cpu_seconds, settings.sleep_seconds, stop)
    try:
        response = client.result(job_id, timeout=settings.result_timeout)
    except JobFailed as exc:  # JobExpired included
        log.warning("round %d: job %s failed: %s", n, job_id, exc.reason)
        return "failed"
    except ResultTimeout:
        log.warning(
            "round %d: no result for job %s within %g s", n, job_id, settings.result_timeout
        )
        return "timeout"
    except RedisUnavailable as exc:
        log.warning("round %d: lost redis while waiting for job %s: %s", n, job_id, exc)
        stop.wait(backoff_delay(1, settings.max_backoff))
        return "failed"
    status = response.get("status") if isinstance(response, dict) else None
    log.info("round %d: job %s answered, status %s", n, job_id, status)
    return "ok"


def main() -> int:
    logging.basicConfig(
        level=os.environ.get("APIPOOL_LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    settings = Settings.from_env()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    counts: dict[str, int] = {}
    log.info("submitting to pool %r, target %s", settings.pool, settings.target_url)
    source = Redis.from_url(settings.redis_url) if settings.input_list else None
    with Client(settings.redis_url, settings.pool) as client:
        n = 0
        while not stop.is_set() and (settings.rounds == 0 or n < settings.rounds):
            if source is not None:
                item = take_item(source, settings, stop)
                if item is None:
                    counts["idle"] = counts.get("idle", 0) + 1
                    continue
                log.debug("work item %r from %s", item[:80], settings.input_list)
            n += 1
            outcome = run_round(client, settings, stop, n)
            counts[outcome] = counts.get(outcome, 0) + 1
    if source is not None:
        source.close()
    log.info("stopping after %d rounds: %s", n, counts)
    return 0


if __name__ == "__main__":
    sys.exit(main())
