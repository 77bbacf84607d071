"""What tests/test_rq.py and tests/test_celery.py share: a pool of http slots in
front of the stand-in API, and the framework's worker processes, started as a
user would start them and killed at the end; and the load that keeps a pool's
queue filled (tests/test_keeper.py, tests/test_adaptive.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import redis

from apipool.client import Client
from apipool.layout import PoolKeys
from apipool.stats import write_pool_config
from apipool.testing.standin import StandInApi
from apipool.testing.standin.server import StandInThread

from .conftest import ROOT, SUBPROCESS_ENV, SlotProcess, wait_for

EXAMPLES = ROOT / "examples" / "python"
StartSlot = Callable[..., SlotProcess]


def other_db(redis_url: str, db: int) -> str:
    """``redis_url`` with database ``db``: the framework's broker, apart from the pool."""
    base, _, last = redis_url.rpartition("/")
    return f"{base}/{db}" if last.isdigit() else f"{redis_url.rstrip('/')}/{db}"


@contextmanager
def http_pool(start_slot: StartSlot, r: redis.Redis, pool: str, n: int) -> Iterator[StandInApi]:
    """The stand-in API (limit ``n``) and N ready slots with the http handler,
    allowed to call it; the stand-in stops at the end (the slots at teardown)."""
    thread = StandInThread(n)
    api = thread.start()
    try:
        write_pool_config(r, pool, slots=n)
        slots = [start_slot(i, handler="http", extra=("--allow-url", f"{api.url}/"))
                 for i in range(n)]  # fmt: skip
        for slot in slots:
            wait_for(lambda slot=slot: slot.status("/readyz") == 200, 15, what="slot ready")
        yield api
    finally:
        thread.stop()


def framework_env(redis_url: str, pool: str, **more: str) -> dict[str, str]:
    """The environment of a framework worker: the examples importable, the pool named."""
    path = os.pathsep.join([str(EXAMPLES), SUBPROCESS_ENV["PYTHONPATH"]])
    return dict(SUBPROCESS_ENV, PYTHONPATH=path, APIPOOL_REDIS_URL=redis_url,
                APIPOOL_POOL=pool, **more)  # fmt: skip


@contextmanager
def processes(
    commands: Sequence[Sequence[str]], env: dict[str, str], logs: Path
) -> Iterator[list[subprocess.Popen[bytes]]]:
    """Start each command (in its own process group: a worker and the children it
    forks); at the end TERM then KILL every group still there."""
    started: list[subprocess.Popen[bytes]] = []
    try:
        for i, cmd in enumerate(commands):
            with (logs / f"worker-{i}.log").open("wb") as out:
                started.append(subprocess.Popen(cmd, env=env, stdout=out, stderr=out,
                                                cwd=ROOT, start_new_session=True))  # fmt: skip
        yield started
    finally:
        for proc in started:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in started:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)


def worker_logs(logs: Path) -> str:
    return "\n".join(p.read_text(errors="replace")[-3000:] for p in sorted(logs.glob("*.log")))


def check_answers(answers: Sequence[dict[str, Any]], api: StandInApi, n: int) -> None:
    """Every job got the API's answer; the API never saw more than N connections."""
    for answer in answers:
        assert answer["status"] == 200, answer
        body = json.loads(answer["body"])
        assert body["ok"] is True
        assert body["active"] <= n
    stats = api.stats(include_samples=False)
    assert stats.ok_total == len(answers)  # one call per job, none lost or repeated
    assert stats.max_concurrency <= n
    assert stats.over_limit_seconds == 0


class Load:
    """Keeps ``depth`` jobs GETting ``url`` queued for pool ``pool`` (topped up
    every ``every`` seconds while entered); remembers every job id."""

    def __init__(self, redis_url: str, pool: str, url: str, *, depth: int, every: float) -> None:
        self.client = Client(redis_url, pool)
        self.r = redis.Redis.from_url(redis_url)
        self.keys = PoolKeys(pool)
        self.url = url
        self.depth = depth
        self.every = every
        self.ids: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            if int(self.r.llen(self.keys.queue)) < self.depth:
                self.ids.append(self.client.submit({"method": "GET", "url": self.url}))
            self._stop.wait(self.every)

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def outcomes(self) -> dict[str, int]:
        """How many jobs have no result (lost), one, or more (duplicated)."""
        counts: dict[str, int] = {}
        for job_id in self.ids:
            copies = int(self.r.llen(self.keys.result(job_id)))
            key = "lost" if copies == 0 else "duplicated" if copies > 1 else "one"
            counts[key] = counts.get(key, 0) + 1
        return counts

    def close(self) -> None:
        self.client.close()
        self.r.close()
