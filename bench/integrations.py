"""RQ and Celery workers handing their calls to a pool: what preloading the job
module buys, and how many general workers keep N slots busy.

One redis-server, the stand-in API (limit 8, each call ``CALL_MS`` of service) and
a pool of N = 8 slots with the http handler. For each mode and each number W of
general workers, W ``rq worker`` processes (RQ's forking worker: one work horse
per job) run ``rq_jobs.fetch`` (examples/python/rq_jobs.py) from a queue holding
more jobs than the run can do; each job submits one call to the pool with
:class:`apipool.Client` and waits for its answer. Modes:

- ``default``: ``rq worker``: the worker never imports the job module, so every
  work horse imports ``rq_jobs`` (and apipool) and makes its client anew;
- ``preloaded``: ``rq worker -w rq_jobs.PreloadedWorker``: the module and the
  client are loaded once in the worker, before it forks;
- ``celery``: one ``celery -A celery_tasks worker --pool prefork -c W``
  (examples/python/celery_tasks.py): W pool processes forked once from a parent
  that imported the tasks (Celery preloads by default), each running one task at
  a time (``worker_prefetch_multiplier=1``, ``task_acks_late``).

Once every worker has registered and ``WARMUP_S`` more have passed, the window
of ``WINDOW_S`` seconds is measured: ``util_<mode>_<W>`` is the stand-in's
service time over 8 x the window (the pool's utilization: 1.0 = N calls in
flight all the time), ``jobs_per_s_<mode>_<W>`` the calls it served per second.
Run it with ``python -m bench integrations`` (quick: a shorter window, W = 8, 24).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from contextlib import ExitStack, suppress

import redis
from rq import Queue, Worker

from apipool.settings import HttpPolicy
from apipool.stats import write_pool_config
from apipool.testing.redis_server import RedisServer
from apipool.testing.standin.server import StandInThread

from .common import REPO_ROOT, Figures, SlotSubprocess, Target, subprocess_env

SLOTS = 8
CALL_MS = 100
WORKERS = (8, 16, 24)
QUICK_WORKERS = (8, 24)
MODES = ("default", "preloaded", "celery")
WARMUP_S = 3.0
WINDOW_S = 15.0
QUICK_WINDOW_S = 5.0
POOL = "bench-rq"

TARGETS = {
    "util_preloaded_24": Target(">=", 0.8),
    "over_limit_s": Target("<=", 0.0),
}


def _workers(
    broker: str, queue: str, count: int, *, preloaded: bool, env: dict[str, str]
) -> list[subprocess.Popen[bytes]]:
    cmd = [sys.executable, "-m", "rq.cli", "worker", "--url", broker, "--quiet",
           "--path", str(REPO_ROOT / "examples" / "python")]  # fmt: skip
    if preloaded:
        cmd += ["--worker-class", "rq_jobs.PreloadedWorker"]
    return [
        subprocess.Popen(
            [*cmd, queue],
            env=env,
            cwd=REPO_ROOT,
            start_new_session=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(count)
    ]


def _kill(procs: list[subprocess.Popen[bytes]]) -> None:
    """Kill each worker with its work horse (its own process group)."""
    for proc in procs:
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    for proc in procs:
        proc.wait(10)


def _window(stand_in: StandInThread, window: float) -> tuple[float, float]:
    """After WARMUP_S: the pool's utilization and calls served per second over ``window``."""
    time.sleep(WARMUP_S)
    before, t0 = stand_in.api.stats(include_samples=False), time.monotonic()
    time.sleep(window)
    after, t1 = stand_in.api.stats(include_samples=False), time.monotonic()
    busy = after.busy_seconds - before.busy_seconds
    served = after.ok_total - before.ok_total
    return busy / (SLOTS * (t1 - t0)), served / (t1 - t0)


def _measure_celery(
    server: RedisServer, api_url: str, stand_in: StandInThread, count: int, window: float,
    env: dict[str, str],
) -> tuple[float, float]:  # fmt: skip
    from celery import Celery

    broker_url = server.url.rsplit("/", 1)[0] + "/2"
    queue = f"apis-celery-{count}"
    app = Celery("bench", broker=broker_url)
    tasks = int(window * 1.5 * SLOTS * 1000 / CALL_MS) + 200
    url = f"{api_url}/work?ms={CALL_MS}"
    with app.producer_or_acquire() as producer:
        for _ in range(tasks):
            app.send_task("celery_tasks.fetch", args=[url, 20.0], queue=queue,
                          ignore_result=True, producer=producer)  # fmt: skip
    examples = str(REPO_ROOT / "examples" / "python")
    cmd = [sys.executable, "-m", "celery", "-A", "celery_tasks", "worker", "--pool", "prefork",
           "-c", str(count), "-Q", queue, "--without-gossip", "--without-mingle",
           "--without-heartbeat", "--loglevel", "WARNING"]  # fmt: skip
    path = os.pathsep.join([examples, env.get("PYTHONPATH", "")])
    worker_env = dict(env, CELERY_BROKER_URL=broker_url, PYTHONPATH=path)
    proc = subprocess.Popen(cmd, env=worker_env, cwd=REPO_ROOT, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        start = stand_in.api.stats(include_samples=False).ok_total
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # the pool processes are up once calls come
            if stand_in.api.stats(include_samples=False).ok_total >= start + SLOTS:
                break
            time.sleep(0.2)
        return _window(stand_in, window)
    finally:
        _kill([proc])
        redis.Redis.from_url(broker_url).flushdb()
        redis.Redis.from_url(server.url).delete(f"apipool:{{{POOL}}}:queue")
        time.sleep(1.0)  # the calls in flight end


def _measure(
    server: RedisServer, api_url: str, stand_in: StandInThread, mode: str, count: int,
    window: float, env: dict[str, str],
) -> tuple[float, float]:  # fmt: skip
    if mode == "celery":
        return _measure_celery(server, api_url, stand_in, count, window, env)
    broker_url = server.url.rsplit("/", 1)[0] + "/1"
    broker = redis.Redis.from_url(broker_url)
    queue = Queue(f"apis-{mode}-{count}", connection=broker)
    jobs = int(window * 1.5 * SLOTS * 1000 / CALL_MS) + 200
    with broker.pipeline() as pipe:
        for _ in range(jobs):
            queue.enqueue("rq_jobs.fetch", f"{api_url}/work?ms={CALL_MS}", 20.0, pipeline=pipe)
        pipe.execute()
    procs = _workers(broker_url, queue.name, count, preloaded=mode == "preloaded", env=env)
    try:
        deadline = time.monotonic() + 60
        while len(Worker.all(queue=queue)) < count and time.monotonic() < deadline:
            time.sleep(0.2)
        return _window(stand_in, window)
    finally:
        _kill(procs)
        queue.empty()
        redis.Redis.from_url(server.url).delete(f"apipool:{{{POOL}}}:queue")
        time.sleep(1.0)  # the calls in flight end


def run(*, quick: bool = False, seed: int = 1) -> Figures:
    window = QUICK_WINDOW_S if quick else WINDOW_S
    counts = QUICK_WORKERS if quick else WORKERS
    figures: Figures = {"slots": SLOTS, "call_ms": CALL_MS, "window_s": window,
                        "cpus": os.cpu_count() or 0}  # fmt: skip
    with ExitStack() as stack:
        server = RedisServer()
        server.start()
        stack.callback(server.close)
        stand_in = StandInThread(SLOTS)
        api = stand_in.start()
        stack.callback(stand_in.stop)
        write_pool_config(redis.Redis.from_url(server.url), POOL, slots=SLOTS)
        http = HttpPolicy(allow_urls=(f"{api.url}/",))
        for i in range(SLOTS):
            slot = SlotSubprocess(server.url, POOL, ["http"], slot=i, http=http)
            stack.enter_context(slot)
        env = subprocess_env(APIPOOL_REDIS_URL=server.url, APIPOOL_POOL=POOL)
        time.sleep(2.0)  # the slots take their leases
        for count in counts:
            for mode in MODES:
                util, rate = _measure(server, api.url, stand_in, mode, count, window, env)
                figures[f"util_{mode}_{count}"] = round(util, 3)
                figures[f"jobs_per_s_{mode}_{count}"] = round(rate, 1)
        stats = api.stats(include_samples=False)
        figures["max_concurrency"] = stats.max_concurrency
        figures["over_limit_s"] = round(stats.over_limit_seconds, 3)
    return figures
