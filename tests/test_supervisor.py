"""`apipool up` as a real process: graceful stop, crash of the supervisor, bad config."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from apipool import Client
from apipool.layout import PoolKeys
from apipool.stats import read_stats

from .conftest import ROOT, SUBPROCESS_ENV, wait_for

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(90)]


@pytest.fixture
def up(redis_url: str, pool: str, tmp_path: Path) -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    # A slot left stopped (SIGSTOP) cannot notice that its supervisor is gone.
    subprocess.run(["pkill", "-CONT", "-f", "--", f"--pool {pool} "], check=False)
    subprocess.run(["pkill", "-KILL", "-f", "--", f"--pool {pool} "], check=False)


def start_up(
    procs: list[subprocess.Popen[bytes]], redis_url: str, pool: str, log: Path, *extra: str
) -> subprocess.Popen[bytes]:
    cmd = [
        sys.executable, "-m", "apipool", "up",
        "--redis-url", redis_url, "--pool", pool, "--slots", "2",
        "--handler", "tests.handlers:sleep",
        "--heartbeat-interval", "0.2", "--call-timeout", "2", "--liveness-window", "1",
        *extra,
    ]  # fmt: skip
    with log.open("ab") as out:
        proc = subprocess.Popen(cmd, env=SUBPROCESS_ENV, stdout=out, stderr=out, cwd=ROOT)
    procs.append(proc)
    return proc


def leases(r: redis.Redis, pool: str) -> dict[int, str]:
    return read_stats(r, pool, slots=2).leases


def test_up_serves_and_stops_gracefully_on_sigterm(
    up: list[subprocess.Popen[bytes]], redis_url: str, pool: str, r: redis.Redis, tmp_path: Path
) -> None:
    proc = start_up(up, redis_url, pool, tmp_path / "up.log")
    wait_for(lambda: len(leases(r, pool)) == 2, 20, what="both slots holding leases")
    with Client(redis_url, pool) as client:
        ids = client.submit_many([{"seconds": 0.5}] * 2)
        wait_for(lambda: read_stats(r, pool).busy == 2, 5, what="both slots busy")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        # the calls in progress were finished, not abandoned
        assert [client.wait(i, 1).status for i in ids] == ["ok", "ok"]
    assert leases(r, pool) == {}
    log = (tmp_path / "up.log").read_text()
    assert log.count("lease released") == 2


def test_slots_stop_by_themselves_when_the_supervisor_is_killed(
    up: list[subprocess.Popen[bytes]], redis_url: str, pool: str, r: redis.Redis, tmp_path: Path
) -> None:
    first = start_up(up, redis_url, pool, tmp_path / "up1.log")
    wait_for(lambda: len(leases(r, pool)) == 2, 20, what="both slots holding leases")
    old = set(leases(r, pool).values())
    first.send_signal(signal.SIGKILL)
    first.wait(10)
    # the orphaned slots notice within a heartbeat, finish and release their leases
    wait_for(lambda: leases(r, pool) == {}, 10, what="orphaned slots gone")
    start_up(up, redis_url, pool, tmp_path / "up2.log")
    wait_for(lambda: len(leases(r, pool)) == 2, 20, what="new slots holding leases")
    assert not old & set(leases(r, pool).values())
    with Client(redis_url, pool) as client:
        assert client.call({"seconds": 0.01}, timeout=10)["slept"] == 0.01
    assert r.llen(PoolKeys(pool).queue) == 0


def test_hung_slot_is_killed_and_reaped_before_its_replacement_starts(
    up: list[subprocess.Popen[bytes]], redis_url: str, pool: str, r: redis.Redis, tmp_path: Path
) -> None:
    log = tmp_path / "up.log"
    start_up(up, redis_url, pool, log)
    wait_for(lambda: "slot 0 healthy" in log.read_text(), 20, what="slot 0 seen healthy")
    holder = leases(r, pool)[0]
    pid = int(subprocess.check_output(["pgrep", "-f", "--", f"--pool {pool} --slot 0 "]).split()[0])
    stopped_at = time.monotonic()
    subprocess.run(["kill", "-STOP", str(pid)], check=True)
    wait_for(lambda: leases(r, pool).get(0) not in (None, holder), 10, what="slot 0 replaced")
    took = time.monotonic() - stopped_at
    assert 1.0 <= took < 4.0, took
    text = log.read_text()
    killed = text.index("slot 0 killed /healthz unanswered")
    assert text.index("slot 0 started", killed) > killed  # kill (and reap) first, then start
    assert subprocess.run(["kill", "-0", str(pid)], check=False).returncode != 0  # reaped


def test_up_with_an_unloadable_handler_exits_with_a_clear_error(
    redis_url: str, pool: str, tmp_path: Path
) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "apipool", "up", "--redis-url", redis_url, "--pool", pool,
         "--slots", "2", "--handler", "nowhere:fn"],
        env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=30, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "cannot import 'nowhere'" in proc.stderr


def test_up_without_redis_url_says_how_to_give_one(pool: str) -> None:
    env = {k: v for k, v in SUBPROCESS_ENV.items() if k != "APIPOOL_REDIS_URL"}
    proc = subprocess.run(
        [sys.executable, "-m", "apipool", "up", "--pool", pool, "--slots", "1"],
        env=env, capture_output=True, text=True, timeout=30, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "APIPOOL_REDIS_URL" in proc.stderr
