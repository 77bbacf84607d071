"""Sidekiq for real: a `sidekiq` process (Debian's ruby-sidekiq) with several
threads runs clients/ruby/examples/sidekiq/api_call_job.rb, whose jobs hand
their calls to a real pool of http slots in front of the stand-in API. The API
never sees more than N connections, and every Sidekiq job gets its answer.

Skipped when Ruby, its redis gem or Sidekiq is missing here, failed when
`CI=true` (CI installs ruby, ruby-redis and ruby-sidekiq).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest
import redis

from apipool.layout import PoolKeys
from apipool.testing.polling import wait_for
from apipool.testing.redis_server import RedisServer
from apipool.testing.standin import StandInApi
from apipool.testing.standin.server import StandInThread

from .conftest import SlotProcess
from .test_ruby_client import GEM, gem_env, require, require_ruby, ruby_eval

pytestmark = [pytest.mark.redis, pytest.mark.timeout(90)]

N = 3  # slots, and the stand-in API's connection limit
THREADS = 5  # Sidekiq's -c
JOBS = 40
CALL_MS = 100  # the stand-in's time per call
JOB_FILE = GEM / "examples" / "sidekiq" / "api_call_job.rb"
SIDEKIQ_DB = 3  # Sidekiq's own Redis database on the test's redis-server


@pytest.fixture(scope="module")
def ruby() -> str:
    return require_ruby()


@pytest.fixture(scope="module")
def sidekiq(ruby: str) -> str:
    """The path of `sidekiq`, once Ruby can load it."""
    path = shutil.which("sidekiq")
    probe = subprocess.run(
        [ruby, "-e", 'require "sidekiq"'], capture_output=True, text=True, timeout=30, check=False
    )
    missing = path is None or probe.returncode != 0
    require("sidekiq", "not installed (Debian: ruby-sidekiq)" if missing else None)
    return str(path)


@pytest.fixture
def api() -> Iterator[StandInApi]:
    thread = StandInThread(N, default_ms=CALL_MS)
    yield thread.start()
    thread.stop()


@pytest.fixture
def sidekiq_url(redis_server: RedisServer) -> Iterator[str]:
    url = f"redis://127.0.0.1:{redis_server.port}/{SIDEKIQ_DB}"
    client = redis.Redis.from_url(url)
    client.flushdb()  # Sidekiq's database only: queues, stats, processes
    yield url
    client.flushdb()
    client.close()


@contextmanager
def running_sidekiq(sidekiq: str, env: dict[str, str], log: Path) -> Iterator[Callable[[], None]]:
    """A `sidekiq` process running the job class with THREADS threads; yields a
    check that it is still alive. Stopped (TERM, then KILL) at exit."""
    cmd = [sidekiq, "-r", str(JOB_FILE), "-q", "api", "-c", str(THREADS), "-t", "5"]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=out, cwd=GEM)

    def alive() -> None:
        assert proc.poll() is None, log.read_text(errors="replace")[-4000:]

    try:
        yield alive
    finally:
        for end, grace in ((proc.terminate, 15.0), (proc.kill, 10.0)):
            end()  # a no-op once it has exited
            with suppress(subprocess.TimeoutExpired):
                proc.wait(grace)
            if proc.returncode is not None:
                break


def push_jobs(ruby: str, env: dict[str, str], urls: list[str], reply: str) -> None:
    """Sidekiq::Client.push one ApiCallJob per URL (a GET through the http handler)."""
    jobs = [[{"method": "GET", "url": url}, reply] for url in urls]
    code = (
        'require "json"; require "sidekiq"; Redis.silence_deprecations = true; '
        "JSON.parse(STDIN.read).each { |args| "
        "Sidekiq::Client.push('class' => 'ApiCallJob', 'queue' => 'api', 'args' => args) }"
    )
    ruby_eval(ruby, code, stdin=json.dumps(jobs), env=env)


def pool_env(sidekiq_url: str, redis_url: str, pool: str, wait_seconds: float) -> dict[str, str]:
    return gem_env(
        REDIS_URL=sidekiq_url,  # Sidekiq's Redis
        APIPOOL_REDIS_URL=redis_url,  # the pool's
        APIPOOL_POOL=pool,
        APIPOOL_WAIT_SECONDS=str(wait_seconds),
    )


def test_sidekiq_jobs_share_the_pool_and_keep_the_cap(
    ruby: str,
    sidekiq: str,
    api: StandInApi,
    start_slot: Callable[..., SlotProcess],
    redis_url: str,
    sidekiq_url: str,
    pool: str,
    tmp_path: Path,
) -> None:
    allow = ("--allow-url", f"{api.url}/")
    slots = [start_slot(i, handler="http", extra=allow, call_timeout=5) for i in range(N)]
    wait_for(lambda: all(s.status("/readyz") == 200 for s in slots), 20, what="slots ready")
    env = pool_env(sidekiq_url, redis_url, pool, 30)
    reply = f"answers-{uuid.uuid4().hex[:8]}"
    # All queued before Sidekiq starts: its threads find them waiting.
    push_jobs(ruby, env, [f"{api.url}/work?ms={CALL_MS}&n={i}" for i in range(JOBS)], reply)
    r = redis.Redis.from_url(sidekiq_url)
    assert r.llen("queue:api") == JOBS
    api.reset()
    with running_sidekiq(sidekiq, env, tmp_path / "sidekiq.log") as alive:
        wait_for(lambda: r.llen(reply) == JOBS, 45, what=f"{JOBS} answers from Sidekiq")
        alive()
    entries = [json.loads(raw) for raw in r.lrange(reply, 0, -1)]
    r.close()
    stats = api.stats(include_samples=False)
    # From the first job's start to the last job's answer, as the jobs saw it.
    wall = max(e["finished_at"] for e in entries) - min(e["started_at"] for e in entries)
    figures = {
        "jobs": JOBS, "sidekiq_threads": THREADS, "slots": N, "call_ms": CALL_MS,
        "wall_s": round(wall, 2), "max_connections": stats.max_concurrency,
        "max_in_flight": stats.max_in_flight,
        "utilization": round(JOBS * CALL_MS / 1000 / (N * wall), 2),
    }  # fmt: skip
    print("sidekiq figures:", json.dumps(figures))
    # The cap: never more than N connections, no time over the limit.
    assert stats.max_concurrency == N, figures
    assert stats.over_limit_seconds == 0
    assert stats.rejected_total == 0
    # Every job got its own answer; each call made exactly once.
    assert stats.ok_total == JOBS
    assert len({e["jid"] for e in entries}) == JOBS
    assert sorted(int(e["request"]["url"].rsplit("=", 1)[1]) for e in entries) == list(range(JOBS))
    assert {e["answer"]["status"] for e in entries} == {200}
    assert {json.loads(e["answer"]["body"])["ms"] for e in entries} == {CALL_MS}
    # One Sidekiq process, several of its threads waiting side by side.
    assert len({e["pid"] for e in entries}) == 1
    assert len({e["thread"] for e in entries}) > N, figures


def test_a_sidekiq_job_that_stops_waiting_cancels_its_call(
    ruby: str,
    sidekiq: str,
    r: redis.Redis,
    redis_url: str,
    sidekiq_url: str,
    pool: str,
    tmp_path: Path,
) -> None:
    """No slot serves the pool: each job waits 1 s, gets ResultTimeout, takes its
    call off the queue (nobody will pay for it) and leaves it to Sidekiq's retry."""
    keys = PoolKeys(pool)
    env = pool_env(sidekiq_url, redis_url, pool, 1)
    push_jobs(ruby, env, [f"https://api.example.com/v1/x?n={i}" for i in range(3)], "unused")
    sk = redis.Redis.from_url(sidekiq_url)
    with running_sidekiq(sidekiq, env, tmp_path / "sidekiq.log") as alive:
        wait_for(lambda: sk.zcard("retry") == 3, 30, what="three jobs waiting for a retry")
        alive()
    retries = [json.loads(raw) for raw in sk.zrange("retry", 0, -1)]
    sk.close()
    assert {job["error_class"] for job in retries} == {"Apipool::ResultTimeout"}
    assert r.hget(keys.stats, "submitted") == b"3"
    assert r.hget(keys.stats, "cancelled") == b"3"
    assert r.llen(keys.queue) == 0
