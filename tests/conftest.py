"""Fixtures: a real redis-server on a free loopback port, slot processes, polling."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from apipool.testing.polling import async_wait_for, wait_for
from apipool.testing.redis_server import RedisServer, RedisServerMissing, free_port

__all__ = ["ROOT", "SUBPROCESS_ENV", "async_wait_for", "wait_for"]

ROOT = Path(__file__).resolve().parent.parent
SUBPROCESS_ENV = dict(
    os.environ,
    PYTHONPATH=os.pathsep.join([str(ROOT / "operator"), str(ROOT)]),
    PYTHONUNBUFFERED="1",
)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    try:
        server.start()
    except RedisServerMissing as exc:
        pytest.fail(str(exc))
    yield server
    server.close()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    return redis_server.url


@pytest.fixture
def r(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url, socket_timeout=5)
    yield client
    client.close()


@pytest.fixture
def pool() -> str:
    return f"t-{uuid.uuid4().hex[:10]}"


class SlotProcess:
    """A real `apipool slot` process, stopped at teardown."""

    def __init__(self, proc: subprocess.Popen[bytes], port: int, log: Path) -> None:
        self.proc = proc
        self.port = port
        self.log = log

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def status(self, path: str) -> int:
        import urllib.error
        import urllib.request

        try:
            with urllib.request.urlopen(self.base + path, timeout=1) as response:
                return int(response.status)
        except urllib.error.HTTPError as exc:
            return int(exc.code)
        except OSError:
            return 0

    def text(self, path: str) -> str:
        import urllib.request

        with urllib.request.urlopen(self.base + path, timeout=1) as response:
            return str(response.read().decode())

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def signal(self, sig: signal.Signals) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout)


@pytest.fixture
def start_slot(redis_url: str, pool: str, tmp_path: Path) -> Iterator[Callable[..., SlotProcess]]:
    started: list[SlotProcess] = []

    def start(
        slot: int = 0,
        *,
        handler: str = "tests.handlers:echo",
        owner: str | None = None,
        extra: tuple[str, ...] = (),
        pool_name: str | None = None,
        call_timeout: float = 2.0,
        heartbeat: float = 0.2,
    ) -> SlotProcess:
        port = free_port()
        log = tmp_path / f"slot-{slot}-{len(started)}.log"
        env = dict(
            SUBPROCESS_ENV,
            APIPOOL_OWNER=owner or f"test-{uuid.uuid4().hex[:8]}",
            APIPOOL_REDIS_URL=redis_url,  # as the supervisor does: never on a command line
        )
        cmd = [
            sys.executable, "-m", "apipool", "slot",
            "--pool", pool_name or pool,
            "--slot", str(slot),
            "--handler", handler,
            "--health-port", str(port),
            "--call-timeout", str(call_timeout),
            "--heartbeat-interval", str(heartbeat),
            "--take-block", "0.2",
            # A plain worker unless the test asks for a keeper (test_keeper.py).
            *(() if "--standby" in extra else ("--standby", "false")),
            *extra,
        ]  # fmt: skip
        with log.open("wb") as out:
            proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=out, cwd=ROOT)
        slot_process = SlotProcess(proc, port, log)
        started.append(slot_process)
        return slot_process

    yield start
    for p in started:
        if p.proc.poll() is None:
            p.proc.send_signal(signal.SIGCONT)
            p.proc.kill()
            p.proc.wait(10)
