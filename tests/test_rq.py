"""RQ, for real: `rq worker` processes (a work horse forked per job) run jobs that
hand their API call to a pool of N http slots (examples/python/rq_jobs.py), some
with RQ's default import in each horse, some preloaded. The stand-in API never
sees more than N connections and every RQ job gets its answer. A job stopped by
its RQ job_timeout takes its still-queued call off the pool's queue."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import redis
from rq import Queue
from rq.job import Job, JobStatus

from apipool.layout import PoolKeys

from . import frameworks as fw
from .conftest import wait_for

pytestmark = [pytest.mark.redis, pytest.mark.timeout(60)]

N = 4
JOBS = 30


def rq_worker(broker: str, queue: str, *, preloaded: bool) -> list[str]:
    cmd = [sys.executable, "-m", "rq.cli", "worker", "--url", broker,
           "--path", "examples/python", "--quiet"]  # fmt: skip
    return [*cmd, *(["--worker-class", "rq_jobs.PreloadedWorker"] if preloaded else []), queue]


def test_rq_workers_hand_their_calls_to_the_pool_within_the_cap(
    start_slot: fw.StartSlot,
    redis_url: str,
    pool: str,
    r: redis.Redis,
    tmp_path: Path,
) -> None:
    with fw.http_pool(start_slot, r, pool, N) as api:
        broker_url = fw.other_db(redis_url, 1)
        broker = redis.Redis.from_url(broker_url)
        queue = Queue(f"apis-{pool}", connection=broker)
        url = f"{api.url}/work?ms=100"
        jobs = [queue.enqueue("rq_jobs.fetch", url, 20.0, job_timeout=60) for _ in range(JOBS)]
        # 8 general workers for 4 slots: 3 as RQ starts them by default, 5 preloaded.
        commands = [rq_worker(broker_url, queue.name, preloaded=i >= 3) for i in range(8)]
        with fw.processes(commands, fw.framework_env(redis_url, pool), tmp_path) as workers:

            def finished() -> bool:
                statuses = [Job.fetch(j.id, connection=broker).get_status() for j in jobs]
                assert JobStatus.FAILED not in statuses, fw.worker_logs(tmp_path)
                return all(s == JobStatus.FINISHED for s in statuses)

            wait_for(finished, 40, interval=0.2, what="every RQ job finished")
            assert all(w.poll() is None for w in workers), fw.worker_logs(tmp_path)
        answers = [Job.fetch(j.id, connection=broker).return_value() for j in jobs]
        fw.check_answers(answers, api, N)
        # Each job ran in a work horse of its own (RQ forks per job): a client made
        # before the fork (preloaded) or in the horse served all of them.
        assert len({a["pid"] for a in answers}) == JOBS
        assert int(r.hget(f"apipool:{{{pool}}}:stats", "ok") or 0) == JOBS


def test_an_rq_job_stopped_by_its_job_timeout_cancels_its_queued_call(
    redis_url: str, pool: str, r: redis.Redis, tmp_path: Path
) -> None:
    """No slot serves the pool: RQ's job_timeout interrupts each wait, and the job
    takes its call off the pool's queue on the way out (nobody is billed for it)."""
    keys = PoolKeys(pool)
    broker_url = fw.other_db(redis_url, 1)
    broker = redis.Redis.from_url(broker_url)
    queue = Queue(f"apis-{pool}", connection=broker)
    jobs = [queue.enqueue("rq_jobs.fetch", "http://127.0.0.1:9/", 30.0, job_timeout=2)
            for _ in range(3)]  # fmt: skip
    commands = [rq_worker(broker_url, queue.name, preloaded=True) for _ in range(3)]
    with fw.processes(commands, fw.framework_env(redis_url, pool), tmp_path):

        def failed() -> bool:
            statuses = [Job.fetch(j.id, connection=broker).get_status() for j in jobs]
            return all(s == JobStatus.FAILED for s in statuses)

        wait_for(failed, 30, interval=0.2, what="every RQ job stopped by its job_timeout")
    for job in jobs:
        latest = Job.fetch(job.id, connection=broker).latest_result()
        assert latest is not None
        assert "JobTimeoutException" in str(latest.exc_string)
    assert r.hget(keys.stats, "submitted") == b"3"
    assert r.hget(keys.stats, "cancelled") == b"3"
    assert r.llen(keys.queue) == 0
