"""The local supervisor: pure rules, in process with real slot processes, and `apipool up`.

In-process tests run :class:`Supervisor` on the test's event loop; its slots are
real ``apipool slot`` processes, stopped and killed with real signals, against
a real redis-server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
import redis

from apipool import Client, JobFailed
from apipool import supervisor as supervisor_module
from apipool.errors import ConfigError
from apipool.layout import PoolKeys
from apipool.settings import ENV_OWNER, ENV_REDIS_URL, HttpPolicy, Limits, Timings
from apipool.stats import read_stats
from apipool.supervisor import (
    SlotEvent,
    Supervisor,
    SupervisorSettings,
    exit_detail,
    free_port,
    restart_backoff,
    slot_environment,
)

from .conftest import ROOT, SUBPROCESS_ENV, async_wait_for, wait_for

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
        # plain slots: these tests stop and kill the slot process itself
        *(() if "--standby" in extra else ("--standby", "false")),
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


# -- pure rules ------------------------------------------------------------------------------


@pytest.mark.unit
def test_a_slot_that_lived_long_enough_restarts_at_once() -> None:
    lived = supervisor_module.CRASH_LOOP_LIFETIME + 0.1
    assert restart_backoff(0.0, lived, 5.0) == 0.0
    assert restart_backoff(4.0, lived, 5.0) == 0.0  # a long life forgives earlier crashes


@pytest.mark.unit
def test_a_crash_loop_backs_off_doubling_up_to_the_cap() -> None:
    backoff, seen = 0.0, []
    for _ in range(8):
        backoff = restart_backoff(backoff, 0.2, 2.0)
        seen.append(backoff)
    assert seen == [0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0, 2.0]


@pytest.mark.unit
def test_exit_detail_names_the_signal_or_the_code() -> None:
    assert exit_detail(-9) == "signal 9"
    assert exit_detail(-15) == "signal 15"
    assert exit_detail(0) == "code 0"
    assert exit_detail(2) == "code 2"


@pytest.mark.unit
def test_the_slot_environment_carries_the_url_and_the_owner() -> None:
    base = {"PATH": "/bin", ENV_REDIS_URL: "redis://old:1/0"}
    env = slot_environment("sup-x", "redis://:secret@h:6379/0", base)
    assert env == {"PATH": "/bin", ENV_OWNER: "sup-x", ENV_REDIS_URL: "redis://:secret@h:6379/0"}
    assert base[ENV_REDIS_URL] == "redis://old:1/0"  # the caller's mapping is left alone
    assert slot_environment("o", "u")["PATH"] == os.environ["PATH"]


def settings_for(
    redis_url: str, pool: str, tmp_path: Path, **changes: object
) -> SupervisorSettings:
    values: dict[str, object] = {
        "redis_url": redis_url,
        "pool": pool,
        "slots": 1,
        "handlers": ("tests.handlers:echo",),
        "timings": Timings(call_timeout=1, heartbeat_interval=0.2, take_block=0.2),
        "liveness_window": 1.0,
        "probe_interval": 0.1,
        "probe_timeout": 0.5,
        "startup_timeout": 30.0,
        "log_dir": str(tmp_path / "slots"),
        "standby": False,  # plain slots: these tests kill and stop the slot process itself
    }
    values.update(changes)
    return SupervisorSettings(**values)  # type: ignore[arg-type]


@pytest.mark.unit
def test_slot_settings_follow_the_supervisor_settings(tmp_path: Path) -> None:
    timings = Timings(call_timeout=3, heartbeat_interval=0.5)
    sup = Supervisor(
        settings_for(
            "redis://:pw@h:1/0",
            "billing",
            tmp_path,
            slots=3,
            timings=timings,
            max_attempts=4,
            result_ttl=60,
            limits=Limits(max_envelope_bytes=4096, max_dead_letters=5),
            http=HttpPolicy(allow_urls=("http://127.0.0.1:9/",)),
            allow_eviction=True,
        )
    )
    slot = sup.slot_settings(2, 4321)
    assert (slot.pool, slot.slot, slot.health_port) == ("billing", 2, 4321)
    assert slot.handlers == ("tests.handlers:echo",)
    assert slot.timings == timings
    assert (slot.max_attempts, slot.result_ttl) == (4, 60)
    assert slot.limits == Limits(max_envelope_bytes=4096, max_dead_letters=5)
    assert slot.http.allow_urls == ("http://127.0.0.1:9/",)
    assert slot.allow_eviction
    assert slot.owner == sup.owner
    assert slot.parent_pid == os.getpid()
    assert slot.redis_url == ""  # not part of what travels on a command line


@pytest.mark.unit
def test_the_slot_command_line_is_its_settings_argv_without_the_url(tmp_path: Path) -> None:
    url = "redis://:hunter2@redis.example:6379/0"
    sup = Supervisor(settings_for(url, "billing", tmp_path, log_level="DEBUG"))
    command = sup.command(0, 4321)
    argv = sup.slot_settings(0, 4321).to_argv()
    assert command == [sys.executable, "-m", "apipool", "--log-level", "DEBUG", *argv]
    text = " ".join(command)
    assert "redis://" not in text
    assert "hunter2" not in text
    assert "--parent-pid" in command


@pytest.mark.unit
@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"slots": -1}, "slots must be >= 0"),
        ({"liveness_window": 0}, "must be > 0"),
        ({"probe_interval": 0}, "must be > 0"),
        ({"probe_timeout": -1}, "must be > 0"),
        ({"max_attempts": 0}, "max_attempts must be >= 1"),
        ({"max_queue_length": -1}, "max_queue_length must be >= 0"),
    ],
)
def test_supervisor_settings_are_checked(
    tmp_path: Path, changes: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        settings_for("redis://h:1/0", "p", tmp_path, **changes)


@pytest.mark.unit
def test_an_unloadable_handler_fails_before_any_slot_starts(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot import 'nowhere_at_all'"):
        Supervisor(settings_for("redis://h:1/0", "p", tmp_path, handlers=("nowhere_at_all:fn",)))


@pytest.mark.unit
def test_each_supervisor_is_an_owner_of_its_own(tmp_path: Path) -> None:
    settings = settings_for("redis://h:1/0", "p", tmp_path, slots=2)
    first, second = Supervisor(settings), Supervisor(settings)
    assert first.owner != second.owner
    assert "/" not in first.owner  # a lease token is <owner>/<incarnation>
    assert [s.index for s in first.slots] == [0, 1]
    assert first.pids() == {}
    assert first.restarts == 0


@pytest.mark.unit
def test_free_port_can_be_listened_on() -> None:
    port = free_port()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", port))
        sock.listen()


# -- in process, with real slot processes ----------------------------------------------------


class Running:
    """A Supervisor running on the test's loop; its events as they happened."""

    def __init__(self, settings: SupervisorSettings, on_event: Callable[[SlotEvent], None]):
        self.seen: list[SlotEvent] = []

        def record(event: SlotEvent) -> None:
            self.seen.append(event)
            on_event(event)

        self.sup = Supervisor(settings, on_event=record)
        self.task = asyncio.create_task(self.sup.run(install_signals=False))

    def events(self, kind: str, slot: int = 0) -> list[SlotEvent]:
        return [e for e in self.sup.events if e.kind == kind and e.slot == slot]

    def log(self, slot: int = 0) -> str:
        assert self.sup.settings.log_dir is not None
        path = Path(self.sup.settings.log_dir) / f"slot-{slot}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    async def healthy(self, slot: int = 0, count: int = 1) -> int:
        """Wait for slot's ``count``-th healthy event; returns its pid then."""
        await async_wait_for(
            lambda: len(self.events("healthy", slot)) >= count, 30, what=f"slot {slot} healthy"
        )
        pid = self.sup.pids().get(slot)
        assert pid is not None
        return pid

    async def stop(self) -> None:
        self.sup.stop()
        await asyncio.wait_for(self.task, 60)


@contextlib.asynccontextmanager
async def supervising(
    settings: SupervisorSettings, on_event: Callable[[SlotEvent], None] = lambda e: None
) -> AsyncIterator[Running]:
    running = Running(settings, on_event)
    try:
        yield running
    finally:
        if not running.task.done():
            for pid in running.sup.pids().values():  # a stopped slot could not stop
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
            await running.stop()


def proc_file(pid: int, name: str) -> bytes:
    with open(f"/proc/{pid}/{name}", "rb") as f:
        return f.read()


def alive(pid: int) -> bool:
    """The process exists and is not a zombie (a zombie is not yet reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.redis
@pytest.mark.asyncio
async def test_run_publishes_the_pool_size_and_queue_limit(
    redis_url: str, pool: str, r: redis.Redis, tmp_path: Path
) -> None:
    settings = settings_for(redis_url, pool, tmp_path, slots=0, max_queue_length=7)
    async with supervising(settings) as running:
        await async_wait_for(lambda: r.exists(PoolKeys(pool).config), 10, what="config")
        assert r.hgetall(PoolKeys(pool).config) == {b"slots": b"0", b"max_queue_length": b"7"}
        await running.stop()
        assert running.task.result() == 0


@pytest.mark.redis
@pytest.mark.asyncio
async def test_a_slot_starts_becomes_healthy_and_serves(
    redis_url: str, pool: str, r: redis.Redis, tmp_path: Path
) -> None:
    async with supervising(settings_for(redis_url, pool, tmp_path)) as running:
        pid = await running.healthy()
        assert running.events("started")[0].detail == f"pid {pid}"
        holder = await async_wait_for(lambda: r.get(PoolKeys(pool).lease(0)), 10, what="lease")
        assert holder.decode().startswith(f"{running.sup.owner}/")
        with Client(redis_url, pool) as client:
            answer = await asyncio.to_thread(client.call, {"hello": 1}, timeout=10)
        assert answer["echo"] == {"hello": 1}
        assert "lease acquired" in running.log()
        assert running.seen == running.sup.events  # on_event saw each one, in order


@pytest.mark.redis
@pytest.mark.asyncio
async def test_a_killed_slot_is_started_again(redis_url: str, pool: str, tmp_path: Path) -> None:
    async with supervising(settings_for(redis_url, pool, tmp_path)) as running:
        pid = await running.healthy()
        os.kill(pid, signal.SIGKILL)
        new_pid = await running.healthy(count=2)
        assert new_pid != pid
        assert running.events("exited")[0].detail == "signal 9"
        kinds = [e.kind for e in running.sup.events]
        assert kinds[:5] == ["started", "healthy", "exited", "started", "healthy"]
        assert running.sup.restarts == 1
        assert running.sup.pids() == {0: new_pid}


@pytest.mark.redis
@pytest.mark.asyncio
async def test_a_slot_that_exits_on_its_own_is_started_again(
    redis_url: str, pool: str, tmp_path: Path
) -> None:
    async with supervising(settings_for(redis_url, pool, tmp_path)) as running:
        pid = await running.healthy()
        os.kill(pid, signal.SIGTERM)  # a graceful exit is still an exit
        await running.healthy(count=2)
        assert running.events("exited")[0].detail == "code 0"
        assert "slot 0: stopping" in running.log()


@pytest.mark.redis
@pytest.mark.asyncio
async def test_a_hung_slot_is_killed_and_reaped_before_its_replacement_starts(
    redis_url: str, pool: str, tmp_path: Path
) -> None:
    reaped_at_start: list[bool] = []
    hung: list[int] = []

    def on_event(event: SlotEvent) -> None:
        if event.kind == "started" and hung:
            reaped_at_start.append(not alive(hung[0]))

    settings = settings_for(redis_url, pool, tmp_path)
    async with supervising(settings, on_event) as running:
        pid = await running.healthy()
        hung.append(pid)
        stopped_at = time.monotonic()
        os.kill(pid, signal.SIGSTOP)
        await running.healthy(count=2)
        (killed,) = running.events("killed")
        assert killed.detail.startswith("/healthz unanswered for ")
        silent = float(killed.detail.split()[3])
        assert silent >= settings.liveness_window  # counted from the last good probe,
        slack = settings.probe_interval + settings.probe_timeout  # which came before the stop
        assert killed.at - stopped_at >= settings.liveness_window - slack
        assert reaped_at_start == [True]
        assert not alive(pid)


@pytest.mark.redis
@pytest.mark.asyncio
async def test_a_short_stop_within_the_liveness_window_is_tolerated(
    redis_url: str, pool: str, tmp_path: Path
) -> None:
    settings = settings_for(redis_url, pool, tmp_path, liveness_window=2.0)
    async with supervising(settings) as running:
        pid = await running.healthy()
        stopped_at = time.monotonic()
        os.kill(pid, signal.SIGSTOP)
        await asyncio.sleep(0.3)  # the fault itself: a 0.3 s freeze
        os.kill(pid, signal.SIGCONT)
        await async_wait_for(
            lambda: (
                time.monotonic() - stopped_at > 2 * settings.liveness_window
                and running.sup.slots[0].healthy
            ),
            20,
            what="twice the liveness window, healthy",
        )
        assert running.events("killed") == []
        assert running.sup.pids() == {0: pid}


@pytest.mark.redis
@pytest.mark.asyncio
async def test_a_slot_never_healthy_is_killed_after_the_startup_timeout(
    redis_url: str, pool: str, tmp_path: Path
) -> None:
    frozen: list[int] = []

    def freeze_the_first(event: SlotEvent) -> None:
        if event.kind == "started" and not frozen:
            frozen.append(int(event.detail.split()[1]))
            os.kill(frozen[0], signal.SIGSTOP)

    settings = settings_for(redis_url, pool, tmp_path, startup_timeout=1.5)
    async with supervising(settings, freeze_the_first) as running:
        await running.healthy()
        (killed,) = running.events("killed")
        assert killed.detail == "not healthy 1.5 s after start"
        assert killed.at - running.events("started")[0].at >= 1.5 - 0.01
        assert not alive(frozen[0])
        assert running.sup.restarts == 1


@pytest.mark.redis
@pytest.mark.asyncio
async def test_a_slot_whose_healthz_fails_is_replaced_and_its_job_recovered(
    redis_url: str, pool: str, tmp_path: Path
) -> None:
    """A call that ignores its cancellation makes /healthz answer 503: the slot
    is killed, the replacement retries the job, and after its last attempt the
    job is dead-lettered, not lost."""
    settings = settings_for(
        redis_url,
        pool,
        tmp_path,
        handlers=("tests.handlers:ignore_cancel",),
        timings=Timings(call_timeout=0.5, heartbeat_interval=0.2, take_block=0.2, health_grace=0.2),
        max_attempts=2,
    )
    async with supervising(settings) as running:
        await running.healthy()
        with Client(redis_url, pool) as client:
            job_id = client.submit({"seconds": 120})
            with pytest.raises(JobFailed, match="slot died during attempt 2 of 2"):
                await asyncio.to_thread(client.result, job_id, timeout=60)
        killed = running.events("killed")
        assert len(killed) == 2
        assert all(e.detail.startswith("/healthz unanswered") for e in killed)


@pytest.mark.redis
@pytest.mark.asyncio
async def test_stop_sigterms_every_slot_and_each_stops_gracefully(
    redis_url: str, pool: str, r: redis.Redis, tmp_path: Path
) -> None:
    async with supervising(settings_for(redis_url, pool, tmp_path, slots=2)) as running:
        await running.healthy(0)
        await running.healthy(1)
        await async_wait_for(
            lambda: len(read_stats(r, pool).leases) == 2, 10, what="both leases held"
        )
        procs = [slot.proc for slot in running.sup.slots]
        await running.stop()
        assert [p.returncode for p in procs if p is not None] == [0, 0]
        assert {e.slot for e in running.sup.events if e.kind == "stopped"} == {0, 1}
        assert read_stats(r, pool).leases == {}
        assert running.sup.pids() == {}
        for index in (0, 1):
            assert f"slot {index}: stopping" in running.log(index)
            assert "lease released" in running.log(index)


@pytest.mark.redis
@pytest.mark.asyncio
async def test_a_slot_that_cannot_stop_is_killed_after_the_shutdown_grace(
    redis_url: str, pool: str, tmp_path: Path
) -> None:
    # A long liveness window: the frozen slot is left to the shutdown, not to the probes.
    settings = settings_for(redis_url, pool, tmp_path, slots=2, liveness_window=30.0)
    async with supervising(settings) as running:
        await running.healthy(0)
        frozen = await running.healthy(1)
        os.kill(frozen, signal.SIGSTOP)  # SIGTERM stays pending
        procs = [slot.proc for slot in running.sup.slots]
        started = time.monotonic()
        await running.stop()
        assert time.monotonic() - started >= settings.timings.shutdown_grace + 1.0
        assert [p.returncode for p in procs if p is not None] == [0, -signal.SIGKILL]
        assert not alive(frozen)


@pytest.mark.redis
@pytest.mark.asyncio
async def test_a_real_slots_command_line_holds_no_redis_url(
    redis_url: str, pool: str, tmp_path: Path
) -> None:
    async with supervising(settings_for(redis_url, pool, tmp_path)) as running:
        pid = await running.healthy()
        cmdline = proc_file(pid, "cmdline").split(b"\0")[:-1]
        environ = proc_file(pid, "environ").split(b"\0")
        port = running.sup.slots[0].port
        assert [arg.decode() for arg in cmdline] == running.sup.command(0, port)
        assert b"redis://" not in b" ".join(cmdline)
        assert f"{ENV_REDIS_URL}={redis_url}".encode() in environ
        assert f"{ENV_OWNER}={running.sup.owner}".encode() in environ


def importable_here_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A handler module the supervisor can import and its slots cannot: each
    slot exits at once with a usage error, a crash loop."""
    name = f"handlers_here_only_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text("def handle(payload, call):\n    return payload\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return f"{name}:handle"


@pytest.mark.redis
@pytest.mark.asyncio
async def test_a_crash_loop_is_restarted_with_a_growing_back_off(
    redis_url: str, pool: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    handler = importable_here_only(tmp_path, monkeypatch)
    settings = settings_for(redis_url, pool, tmp_path, handlers=(handler,), restart_backoff_max=0.4)
    async with supervising(settings) as running:
        await async_wait_for(lambda: running.sup.slots[0].starts >= 5, 60, what="5 starts")
        await running.stop()
    exits = running.events("exited")
    starts = running.events("started")
    assert [e.detail for e in exits[:4]] == ["code 2"] * 4, running.log()
    gaps = [starts[k + 1].at - exits[k].at for k in range(4)]
    for gap, backoff in zip(gaps, [0.1, 0.2, 0.4, 0.4], strict=True):
        assert gap >= backoff, gaps
    assert running.events("healthy") == []
    assert "cannot import" in running.log()


@pytest.mark.redis
@pytest.mark.asyncio
async def test_a_stop_during_a_back_off_does_not_wait_it_out(
    redis_url: str, pool: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(supervisor_module, "FIRST_BACKOFF", 30.0)
    handler = importable_here_only(tmp_path, monkeypatch)
    settings = settings_for(redis_url, pool, tmp_path, handlers=(handler,), restart_backoff_max=60)
    async with supervising(settings) as running:
        await async_wait_for(lambda: running.events("exited"), 30, what="the first crash")
        started = time.monotonic()
        await running.stop()
        assert time.monotonic() - started < 10
        assert len(running.events("started")) == 1


@pytest.mark.redis
@pytest.mark.asyncio
async def test_a_slot_that_lived_long_enough_is_restarted_without_a_back_off(
    redis_url: str, pool: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(supervisor_module, "FIRST_BACKOFF", 30.0)
    monkeypatch.setattr(supervisor_module, "CRASH_LOOP_LIFETIME", 0.5)
    async with supervising(settings_for(redis_url, pool, tmp_path)) as running:
        pid = await running.healthy()
        await async_wait_for(
            lambda: time.monotonic() - running.events("started")[0].at > 1.0, 10, what="1 s"
        )
        os.kill(pid, signal.SIGKILL)
        await async_wait_for(lambda: len(running.events("started")) == 2, 20, what="restart")
        gap = running.events("started")[1].at - running.events("exited")[0].at
        assert gap < 10  # not the 30 s back-off of a crash loop


@pytest.mark.redis
@pytest.mark.asyncio
async def test_each_slot_has_its_own_index_port_and_lease(
    redis_url: str, pool: str, r: redis.Redis, tmp_path: Path
) -> None:
    import aiohttp

    async with supervising(settings_for(redis_url, pool, tmp_path, slots=3)) as running:
        for index in range(3):
            await running.healthy(index)
        ports = [slot.port for slot in running.sup.slots]
        assert len(set(ports)) == 3
        async with aiohttp.ClientSession() as http:
            for index, port in enumerate(ports):
                async with http.get(f"http://127.0.0.1:{port}/healthz") as response:
                    assert (await response.json())["slot"] == index

        def three_leases() -> dict[int, str] | None:
            held = read_stats(r, pool).leases
            return held if len(held) == 3 else None

        leases = await async_wait_for(three_leases, 10, what="three leases")
        assert len(set(leases.values())) == 3  # three processes, one per slot


@pytest.mark.redis
@pytest.mark.asyncio
async def test_the_replacement_of_a_killed_slot_takes_its_lease_over_at_once(
    redis_url: str, pool: str, r: redis.Redis, tmp_path: Path
) -> None:
    timings = Timings(call_timeout=10, heartbeat_interval=0.2, take_block=0.2)
    async with supervising(settings_for(redis_url, pool, tmp_path, timings=timings)) as running:
        pid = await running.healthy()
        old = await async_wait_for(lambda: r.get(PoolKeys(pool).lease(0)), 10, what="lease")
        assert r.pttl(PoolKeys(pool).lease(0)) > 10_000  # it would outlive the process
        killed_at = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        new = await async_wait_for(
            lambda: (token := r.get(PoolKeys(pool).lease(0))) not in (None, old) and token,
            20,
            what="the lease taken over",
        )
        assert time.monotonic() - killed_at < 8
        assert new.decode().startswith(f"{running.sup.owner}/")
        assert f"took over the lease of dead predecessor {old.decode()}" in running.log()


def test_up_stops_gracefully_on_sigint_too(
    up: list[subprocess.Popen[bytes]], redis_url: str, pool: str, r: redis.Redis, tmp_path: Path
) -> None:
    proc = start_up(up, redis_url, pool, tmp_path / "up.log")
    wait_for(lambda: len(leases(r, pool)) == 2, 20, what="both slots holding leases")
    proc.send_signal(signal.SIGINT)
    assert proc.wait(20) == 0
    assert leases(r, pool) == {}
    assert (tmp_path / "up.log").read_text().count("lease released") == 2


@pytest.mark.redis
@pytest.mark.asyncio
async def test_a_handler_that_kills_its_process_is_logged_and_its_job_recovered(
    redis_url: str, pool: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """``os._exit(7)`` in a handler takes the process with it: the supervisor
    says so with the exit code, starts the slot again, and the replacement
    retries the job it finds in flight (attempt 2 answers)."""
    caplog.set_level(logging.INFO, logger="apipool.supervisor")
    calls = tmp_path / "calls"
    settings = settings_for(
        redis_url, pool, tmp_path, handlers=("tests.handlers:exit_on_first_attempt",)
    )
    async with supervising(settings) as running:
        pid = await running.healthy()
        with Client(redis_url, pool) as client:
            job_id = client.submit({"log": str(calls)})
            finished = await asyncio.to_thread(client.wait, job_id, 30)
        assert (finished.status, finished.result) == ("ok", {"attempt": 2})
        assert running.events("exited")[0].detail == "code 7"
        new_pid = await running.healthy(count=2)
        assert new_pid != pid
    warnings = [
        record.getMessage()
        for record in caplog.records
        if record.name == "apipool.supervisor" and record.levelno == logging.WARNING
    ]
    assert "slot 0 exited with code 7" in warnings
    rows = [line.split() for line in calls.read_text().splitlines()]
    assert [(int(p), job, int(a)) for p, job, a in rows] == [(pid, job_id, 1), (new_pid, job_id, 2)]


@pytest.mark.unit
def test_a_stop_or_a_clean_exit_is_no_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    sup = Supervisor(settings_for("redis://127.0.0.1:1/0", "p", tmp_path))
    caplog.set_level(logging.INFO, logger="apipool.supervisor")
    sup._exited(0, 0)
    sup._exited(0, -9)
    sup.stopping.set()
    sup._exited(0, -15)
    levels = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert levels == [
        (logging.INFO, "slot 0 exited with code 0"),
        (logging.WARNING, "slot 0 exited with signal 9"),
        (logging.INFO, "slot 0 exited with signal 15"),
    ]
