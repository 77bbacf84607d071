"""The command line as a user runs it."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
import redis

from apipool import __version__
from apipool.exitcodes import ExitCode
from apipool.layout import PoolKeys
from apipool.protocol import Outcome
from apipool.settings import SlotSettings
from apipool.testing.redis_server import RedisServer, free_port

from .conftest import ROOT, SUBPROCESS_ENV, wait_for

pytestmark = pytest.mark.timeout(60)


def test_version() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "apipool", "--version"],
        env=SUBPROCESS_ENV,
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
        cwd=ROOT,
    )
    assert out.stdout.strip() == f"apipool {__version__}"


def test_standin_serves_and_stops_on_sigterm() -> None:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "apipool", "standin", "--limit", "2", "--port", str(port)],
        env=SUBPROCESS_ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=ROOT,
    )
    try:

        def answers() -> bytes | None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/work?ms=1", timeout=1) as r:
                    return bytes(r.read())
            except OSError:
                return None

        body = wait_for(answers, 15, interval=0.1, what="the stand-in to answer")
        assert b'"ok":true' in body  # type: ignore[operator]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_standin_with_a_shared_limit_says_slow_down() -> None:
    """``--shared-limit 0 --retry-after 7``: every call refused with the header."""
    port = free_port()
    argv = ["standin", "--limit", "2", "--port", str(port), "--shared-limit", "0"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "apipool", *argv, "--retry-after", "7"],
        env=SUBPROCESS_ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=ROOT,
    )
    try:

        def refused() -> tuple[int, str | None] | None:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/work?ms=1", timeout=1)
            except urllib.error.HTTPError as exc:
                return exc.code, exc.headers.get("Retry-After")
            except OSError:
                return None
            return 200, None

        assert wait_for(refused, 15, interval=0.1, what="the stand-in") == (429, "7")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)


def apipool(*args: str, redis_url: str | None = None, stdin: str | None = None) -> Completed:
    env = dict(SUBPROCESS_ENV)
    env.pop("APIPOOL_REDIS_URL", None)
    if redis_url is not None:
        env["APIPOOL_REDIS_URL"] = redis_url
    return subprocess.run(
        [sys.executable, "-m", "apipool", "--log-level", "ERROR", *args],
        env=env,
        capture_output=True,
        text=True,
        input=stdin,
        timeout=45,
        cwd=ROOT,
    )


Completed = subprocess.CompletedProcess[str]


def test_the_exit_codes_are_the_documented_table() -> None:
    doc = (ROOT / "operator" / "apipool" / "exitcodes.py").read_text()
    for code in ExitCode:
        assert re.search(rf"^{code.value}\s+{code.name}\s", doc, re.M), code
    assert [c.value for c in ExitCode] == sorted(c.value for c in ExitCode)


def test_no_redis_is_a_usage_error() -> None:
    out = apipool("stats", "--pool", "p")
    assert out.returncode == ExitCode.USAGE
    assert "APIPOOL_REDIS_URL" in out.stderr


def test_a_payload_that_is_not_json_is_a_usage_error(redis_url: str, pool: str) -> None:
    out = apipool("submit", "--pool", pool, "{not json", redis_url=redis_url)
    assert out.returncode == ExitCode.USAGE
    assert "payload is not valid JSON" in out.stderr


def test_unreachable_redis(pool: str) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    for args in (("stats", "--pool", pool), ("submit", "--pool", pool, "{}")):
        out = apipool(*args, redis_url=url)
        assert out.returncode == ExitCode.REDIS_UNAVAILABLE, (args, out.stderr)
        assert "Traceback" not in out.stderr


@pytest.mark.timeout(90)
def test_a_redis_that_stops_answering_is_unavailable_too(pool: str) -> None:
    """A timeout (Redis hangs) is reported like a refused connection."""
    with RedisServer() as server:
        server.pause()
        try:
            out = apipool("stats", "--pool", pool, redis_url=server.url)
        finally:
            server.resume()
    assert out.returncode == ExitCode.REDIS_UNAVAILABLE, out.stderr
    assert "Redis" in out.stderr
    assert "Traceback" not in out.stderr


def test_no_result_in_time(redis_url: str, pool: str) -> None:
    out = apipool("result", "--pool", pool, "no-such-job", "--timeout", "0.5", redis_url=redis_url)
    assert out.returncode == ExitCode.RESULT_TIMEOUT
    assert "no result for job no-such-job" in out.stderr


def test_a_full_queue(redis_url: str, r: redis.Redis, pool: str) -> None:
    r.hset(PoolKeys(pool).config, "max_queue_length", 1)
    assert apipool("submit", "--pool", pool, "{}", redis_url=redis_url).returncode == 0
    out = apipool("submit", "--pool", pool, "{}", redis_url=redis_url)
    assert out.returncode == ExitCode.QUEUE_FULL
    assert "is full" in out.stderr


def test_submit_wait_and_result_agree_on_every_outcome(
    redis_url: str, r: redis.Redis, pool: str
) -> None:
    """The same job's record and exit code, whether waited for at submit or later."""
    cases = [
        ("tests.handlers:echo", [], Outcome.OK, ExitCode.OK),
        ("tests.handlers:always_raise", [], Outcome.DEAD, ExitCode.JOB_FAILED),
        ("tests.handlers:echo", ["--deadline-in", "0.001"], Outcome.EXPIRED, ExitCode.JOB_EXPIRED),
    ]
    for i, (handler, extra, status, code) in enumerate(cases):
        r.delete(PoolKeys(pool).queue)
        settings = SlotSettings(
            pool=pool, slot=i, handlers=(handler,), max_attempts=1, health_port=0
        )
        slot = subprocess.Popen(
            [sys.executable, "-m", "apipool", *settings.to_argv()],
            env=dict(SUBPROCESS_ENV, APIPOOL_REDIS_URL=redis_url, APIPOOL_OWNER=f"cli-{i}"),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=ROOT,
        )
        try:
            time.sleep(0.01)  # the deadline of the expired case passes before any take
            waited = apipool(
                "submit", "--pool", pool, "{}", "--wait", "20", *extra, redis_url=redis_url
            )
            record = json.loads(waited.stdout)
            later = apipool("result", "--pool", pool, record["id"], redis_url=redis_url)
        finally:
            slot.kill()
            slot.wait(10)
        assert record["status"] == status, waited.stderr
        assert (waited.returncode, later.returncode) == (code, code)
        assert json.loads(later.stdout) == record
