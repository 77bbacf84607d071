"""examples/ruby/producer.rb, run by a real Ruby against a real pool and stand-in API.

Skipped when `ruby` or its `redis` gem is missing here, but failed when `CI=true`:
CI installs them (Debian: ruby, ruby-redis) and must run these tests.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from apipool.layout import PoolKeys
from apipool.protocol import SUBMIT
from apipool.stats import read_stats
from apipool.testing.standin import StandInApi, run_in_thread

from .conftest import ROOT, SUBPROCESS_ENV, wait_for

pytestmark = [pytest.mark.redis, pytest.mark.timeout(90)]

PRODUCER = ROOT / "examples" / "ruby" / "producer.rb"


def _ruby_missing() -> str | None:
    """Why the Ruby producer cannot run here, or None when it can."""
    ruby = shutil.which("ruby")
    if ruby is None:
        return "`ruby` is not installed (Debian: apt-get install ruby ruby-redis)"
    probe = subprocess.run(
        [ruby, "-e", 'require "redis"; print Redis::VERSION'],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if probe.returncode != 0:
        return f"the Ruby `redis` gem is missing (Debian: ruby-redis): {probe.stderr.strip()}"
    return None


@pytest.fixture(scope="module")
def ruby() -> str:
    why = _ruby_missing()
    if why is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but {why}")
        pytest.skip(why)
    return str(shutil.which("ruby"))


def produce(
    ruby: str, redis_url: str, pool: str, *args: str, timeout: float = 40
) -> tuple[int, list[dict[str, Any]], str]:
    """Run the producer; its exit code, its JSON lines, its stderr."""
    proc = subprocess.run(
        [ruby, str(PRODUCER), "--redis-url", redis_url, "--pool", pool, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        check=False,
    )
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    return proc.returncode, lines, proc.stderr


@pytest.fixture
def api() -> Iterator[StandInApi]:
    with run_in_thread(2) as standin:
        yield standin


@pytest.fixture
def pool_up(
    redis_url: str, pool: str, r: redis.Redis, tmp_path: Path, api: StandInApi
) -> Iterator[Path]:
    """`apipool up --slots 2 --handler http` for `pool`, allowed to call the
    stand-in API (a loopback address); yields its log file."""
    log = tmp_path / "up.log"
    cmd = [
        sys.executable, "-m", "apipool", "up",
        "--redis-url", redis_url, "--pool", pool, "--slots", "2",
        "--handler", "http", "--allow-url", f"{api.url}/",
        "--heartbeat-interval", "0.2", "--call-timeout", "5", "--liveness-window", "1",
        "--take-block", "0.2",
    ]  # fmt: skip
    with log.open("ab") as out:
        proc = subprocess.Popen(cmd, env=SUBPROCESS_ENV, stdout=out, stderr=out, cwd=ROOT)
    try:
        wait_for(
            lambda: len(read_stats(r, pool, slots=2).leases) == 2 or proc.poll() is not None,
            20,
            what="both slots holding leases",
        )
        assert proc.poll() is None, log.read_text(errors="replace")
        yield log
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        # its slots leave within a heartbeat once their supervisor is gone
        wait_for(lambda: read_stats(r, pool, slots=2).leases == {}, 10, what="slots gone")


def test_ruby_producer_against_a_real_pool(
    ruby: str, api: StandInApi, pool_up: Path, redis_url: str, pool: str, r: redis.Redis
) -> None:
    keys = PoolKeys(pool)
    api.reset()
    url = f"{api.url}/work?ms=20"
    code, lines, err = produce(
        ruby, redis_url, pool, "--count", "20", "--url", url, "--timeout", "30",
        "--deadline-in", "60", "--id-prefix", "rb-ok",
    )  # fmt: skip
    assert code == 0, (err, lines, pool_up.read_text(errors="replace")[-4000:])
    assert len(lines) == 20
    assert [line["id"] for line in lines] == [f"rb-ok-{i}" for i in range(1, 21)]
    assert {line["status"] for line in lines} == {"ok"}
    assert {line["http_status"] for line in lines} == {200}
    assert all(line["error"] is None for line in lines)
    stats = api.stats(include_samples=False)
    assert stats.ok_total == 20
    assert stats.max_concurrency <= 2
    assert stats.over_limit_seconds == 0
    # the records were read, not consumed: still there for any other reader
    for i in (1, 20):
        raw = r.lindex(keys.result(f"rb-ok-{i}"), -1)
        assert raw is not None
        assert json.loads(raw)["status"] == "ok"
    assert r.llen(keys.queue) == 0

    # An invalid http payload, through the SUBMIT script: a permanent error, dead at once.
    code, lines, err = produce(
        ruby, redis_url, pool, "--count", "1", "--payload", '{"url": "ftp://x"}',
        "--bounded", "--timeout", "30", "--id-prefix", "rb-dead",
    )  # fmt: skip
    assert code == 1, err
    [line] = lines
    assert line["id"] == "rb-dead-1"
    assert line["status"] == "dead"
    assert line["attempt"] == 1
    assert line["error"].startswith("attempt 1 of 3 failed for good:")
    assert "'url' must be an http(s) URL" in line["error"]
    dead = [json.loads(d) for d in r.lrange(keys.dead, 0, -1)]
    assert [d["id"] for d in dead] == ["rb-dead-1"]
    assert dead[0]["reason"] == line["error"]
    assert r.hget(keys.stats, "submitted") == b"1"  # only the SUBMIT script counts
    assert api.stats(include_samples=False).ok_total == 20  # never reached the API

    # A deadline already passed when a slot takes the job: expired, no call made.
    code, lines, err = produce(
        ruby, redis_url, pool, "--count", "1", "--url", url, "--deadline-in", "0",
        "--timeout", "30", "--id-prefix", "rb-late",
    )  # fmt: skip
    assert code == 1, err
    [line] = lines
    assert line["status"] == "expired"
    assert line["error"] == "deadline passed before the call could start"
    assert api.stats(include_samples=False).requests_total == 20


def test_ruby_bounded_submit_respects_max_queue_length(
    ruby: str, redis_url: str, pool: str, r: redis.Redis
) -> None:
    keys = PoolKeys(pool)
    r.hset(keys.config, "max_queue_length", 2)
    # no slots: two jobs fit the queue and time out unanswered, the third is refused
    code, lines, err = produce(
        ruby, redis_url, pool, "--count", "3", "--url", "http://127.0.0.1:9/x",
        "--bounded", "--timeout", "1", "--id-prefix", "rb-full",
    )  # fmt: skip
    assert code == 1, err
    assert [line["status"] for line in lines] == ["timeout", "timeout", "rejected"]
    assert "queue full (2 jobs queued)" in lines[2]["error"]
    assert r.llen(keys.queue) == 2
    assert r.hget(keys.stats, "submitted") == b"2"
    # the envelopes on the queue are first attempts in the documented shape
    for raw in r.lrange(keys.queue, 0, -1):
        env = json.loads(raw)
        assert set(env) == {"id", "payload", "submitted_at", "attempt"}
        assert env["attempt"] == 1
        assert env["payload"] == {"method": "GET", "url": "http://127.0.0.1:9/x"}


def test_ruby_submit_script_is_the_documented_one(ruby: str) -> None:
    proc = subprocess.run(
        [ruby, "-e", f"require {json.dumps(str(PRODUCER))}; print ApiPool::SUBMIT_SCRIPT"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert proc.stdout.strip() == SUBMIT.source.strip()


def test_ruby_producer_rejects_bad_arguments(ruby: str, redis_url: str, pool: str) -> None:
    code, lines, err = produce(ruby, redis_url, pool, "--count", "2")
    assert code == 2
    assert lines == []
    assert "--url" in err
