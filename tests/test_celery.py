"""Celery, for real: two `celery worker` processes with the prefork pool (-c 4:
8 general workers) run tasks that hand their API call to a pool of N http slots
(examples/python/celery_tasks.py), with a Redis broker on the test's
redis-server (a database of its own). The stand-in API never sees more than N
connections and every Celery task gets its answer."""

from __future__ import annotations

import gc
import sys
from pathlib import Path

import pytest
import redis
from celery import Celery

from . import frameworks as fw

pytestmark = [pytest.mark.redis, pytest.mark.timeout(90)]

N = 4
TASKS = 30


def celery_worker(queue: str, name: str) -> list[str]:
    return [sys.executable, "-m", "celery", "-A", "celery_tasks", "worker", "--pool", "prefork",
            "-c", "4", "-Q", queue, "-n", name, "--loglevel", "WARNING",
            "--without-gossip", "--without-mingle", "--without-heartbeat"]  # fmt: skip


def test_celery_prefork_workers_hand_their_calls_to_the_pool_within_the_cap(
    start_slot: fw.StartSlot,
    redis_url: str,
    pool: str,
    r: redis.Redis,
    tmp_path: Path,
) -> None:
    with fw.http_pool(start_slot, r, pool, N) as api:
        broker = fw.other_db(redis_url, 2)
        queue = f"apis-{pool}"
        caller = Celery("caller", broker=broker, backend=broker)
        url = f"{api.url}/work?ms=100"
        results = [
            caller.send_task("celery_tasks.fetch", args=[url, 20.0], queue=queue)
            for _ in range(TASKS)
        ]
        env = fw.framework_env(
            redis_url, pool, CELERY_BROKER_URL=broker, CELERY_RESULT_BACKEND=broker
        )
        commands = [celery_worker(queue, f"w{i}-{pool}@%h") for i in range(2)]
        with fw.processes(commands, env, tmp_path) as workers:
            try:
                answers = [result.get(timeout=45) for result in results]
            except Exception:
                print(fw.worker_logs(tmp_path))
                raise
            finally:
                # Celery's results unsubscribe when collected: now, while Redis is up.
                results.clear()
                gc.collect()
            assert all(w.poll() is None for w in workers), fw.worker_logs(tmp_path)
        fw.check_answers(answers, api, N)
        pids = {a["pid"] for a in answers}
        assert 1 < len(pids) <= 8  # the prefork pool's processes, each reused for many tasks
        assert int(r.hget(f"apipool:{{{pool}}}:stats", "ok") or 0) == TASKS
        caller.close()
