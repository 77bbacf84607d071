"""The keeper and its warm standby (``apipool slot --standby true``), with real
processes and real signals.

One slot against a stand-in API whose hard limit is 1 connection, jobs kept
queued: across every transition of the keeper (the active worker killed, the
active worker hung, the standby killed, the keeper killed, SIGTERM during a
promotion, SIGTERM) the stand-in never sees more than one connection, so at most
one process of the slot called the API at any moment; and every job submitted
has exactly one outcome.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from apipool.client import Client
from apipool.layout import PoolKeys
from apipool.testing.polling import wait_for
from apipool.testing.standin import StandInApi
from apipool.testing.standin.server import StandInThread

from .conftest import SlotProcess
from .frameworks import Load

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(90)]

StartSlot = Callable[..., SlotProcess]
HANG_WINDOW = 0.5


@pytest.fixture
def api() -> Iterator[StandInApi]:
    thread = StandInThread(1, default_ms=100)
    yield thread.start()
    thread.stop()


def children(pid: int) -> set[int]:
    """The live child processes of ``pid``."""
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return set()
    return {int(c) for c in text.split() if _alive(int(c))}


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def active_pid(slot: SlotProcess) -> int | None:
    """The pid of the worker that answers /healthz (the active one)."""
    try:
        with urllib.request.urlopen(slot.base + "/healthz", timeout=1) as response:
            return int(json.loads(response.read())["pid"])
    except (OSError, ValueError, KeyError):
        return None


@pytest.fixture
def keeper(
    start_slot: StartSlot, api: StandInApi, redis_url: str, pool: str
) -> Callable[[], SlotProcess]:
    def start() -> SlotProcess:
        slot = start_slot(
            handler="http",
            extra=(
                "--standby", "true",
                "--hang-window", str(HANG_WINDOW),
                "--allow-url", f"{api.url}/",
            ),
        )  # fmt: skip
        wait_for(lambda: active_pid(slot), 20, what="the active worker serving /healthz")
        wait_for(lambda: len(children(slot.proc.pid)) == 2, 10, what="active + standby")
        return slot

    return start


def calls_done(api: StandInApi) -> int:
    return api.stats(include_samples=False).ok_total


def calling_again(api: StandInApi, after: int, more: int = 3) -> bool:
    return calls_done(api) >= after + more


def one_caller(api: StandInApi) -> None:
    stats = api.stats(include_samples=False)
    assert stats.max_concurrency <= 1, stats.over_limit_events
    assert stats.over_limit_seconds == 0
    assert stats.rejected_total == 0


def drained(load: Load, redis_url: str) -> None:
    r = redis.Redis.from_url(redis_url)
    try:
        keys = load.keys
        wait_for(
            lambda: r.llen(keys.queue) == 0 and r.llen(keys.inflight(0)) == 0,
            30,
            what="the queue drained",
        )
    finally:
        r.close()
    counts = load.outcomes()
    assert counts.get("lost", 0) == 0, counts
    assert counts.get("duplicated", 0) == 0, counts


def calling(slot: SlotProcess, api: StandInApi) -> tuple[int, int, int]:
    """Once the slot calls: its active worker's pid, its standby's, and the calls done."""
    wait_for(lambda: calling_again(api, 0), 10, what="calls")
    active = active_pid(slot)
    assert active is not None
    (standby,) = children(slot.proc.pid) - {active}
    return active, standby, calls_done(api)


def test_a_killed_worker_is_replaced_by_the_warm_standby(
    keeper: Callable[[], SlotProcess], api: StandInApi, redis_url: str, pool: str
) -> None:
    slot = keeper()
    load = Load(redis_url, pool, f"{api.url}/work?ms=100", depth=3, every=0.01)
    with load:
        old, standby, done = calling(slot, api)
        killed_at = time.monotonic()
        os.kill(old, signal.SIGKILL)
        wait_for(lambda: active_pid(slot) == standby, 10, what="the standby serving")
        wait_for(lambda: calling_again(api, done), 10, what="calls again")
        took = time.monotonic() - killed_at
        wait_for(lambda: len(children(slot.proc.pid)) == 2, 10, what="a new standby")
        assert old not in children(slot.proc.pid)
    drained(load, redis_url)
    load.close()
    one_caller(api)
    assert took < 5.0  # a figure for benchmarks; here only: far below a process start


def test_a_hung_worker_is_killed_and_reaped_before_the_standby_takes_over(
    keeper: Callable[[], SlotProcess], api: StandInApi, redis_url: str, pool: str
) -> None:
    slot = keeper()
    load = Load(redis_url, pool, f"{api.url}/work?ms=100", depth=3, every=0.01)
    with load:
        old, standby, done = calling(slot, api)
        os.kill(old, signal.SIGSTOP)
        wait_for(lambda: not _alive(old), 10, what="the hung worker killed and reaped")
        wait_for(lambda: active_pid(slot) == standby, 10, what="the standby serving")
        wait_for(lambda: calling_again(api, done), 10, what="calls again")
    drained(load, redis_url)
    load.close()
    one_caller(api)
    assert "silent for" in slot.log.read_text()


def test_a_killed_standby_is_replaced_and_the_worker_goes_on(
    keeper: Callable[[], SlotProcess], api: StandInApi, redis_url: str, pool: str
) -> None:
    slot = keeper()
    load = Load(redis_url, pool, f"{api.url}/work?ms=100", depth=3, every=0.01)
    with load:
        wait_for(lambda: calling_again(api, 0), 10, what="calls")
        active = active_pid(slot)
        (standby,) = children(slot.proc.pid) - {active}
        os.kill(standby, signal.SIGKILL)
        wait_for(
            lambda: (
                len(children(slot.proc.pid) - {active}) == 1
                and standby not in children(slot.proc.pid)
            ),
            10,
            what="a new standby",
        )
        done = calls_done(api)
        wait_for(lambda: calling_again(api, done), 10, what="calls go on")
        assert active_pid(slot) == active
    drained(load, redis_url)
    load.close()
    one_caller(api)


def test_a_killed_keeper_takes_its_children_with_it(
    keeper: Callable[[], SlotProcess], api: StandInApi, redis_url: str, pool: str
) -> None:
    slot = keeper()
    family = children(slot.proc.pid)
    assert len(family) == 2
    os.kill(slot.proc.pid, signal.SIGKILL)
    slot.proc.wait(5)
    wait_for(lambda: not any(_alive(pid) for pid in family), 5, what="no orphan left")


def test_sigterm_during_a_promotion_leaves_no_process_and_one_caller(
    keeper: Callable[[], SlotProcess], api: StandInApi, redis_url: str, pool: str
) -> None:
    slot = keeper()
    load = Load(redis_url, pool, f"{api.url}/work?ms=100", depth=3, every=0.01)
    with load:
        old, standby, _ = calling(slot, api)
        family = {old, standby}
        os.kill(old, signal.SIGKILL)
        os.kill(slot.proc.pid, signal.SIGTERM)
        # The keeper exits with its active worker's code: the killed one's (137),
        # or the promoted one's, stopped gracefully (0) or before its handlers
        # were in place (143).
        assert slot.proc.wait(30) in (0, 137, 143)
        wait_for(lambda: not any(_alive(pid) for pid in family), 5, what="no child left")
        # Nor the standby forked after the promotion, if it came to that.
        wait_for(lambda: not processes_of(pool), 5, what="no worker of the slot left")
    load.close()
    one_caller(api)


def test_sigterm_stops_the_worker_gracefully(
    keeper: Callable[[], SlotProcess], api: StandInApi, redis_url: str, pool: str
) -> None:
    slot = keeper()
    r = redis.Redis.from_url(redis_url)
    try:
        keys = PoolKeys(pool)
        wait_for(lambda: r.get(keys.lease(0)) is not None, 10, what="the lease held")
        family = children(slot.proc.pid)
        slot.proc.send_signal(signal.SIGTERM)
        assert slot.proc.wait(30) == 0
        assert r.get(keys.lease(0)) is None  # released by the worker on its way out
        assert not any(_alive(pid) for pid in family)
    finally:
        r.close()


def test_a_keeper_with_a_handler_that_cannot_load_exits_2(
    start_slot: StartSlot, api: StandInApi
) -> None:
    slot = start_slot(handler="tests.no_such_module:nothing", extra=("--standby", "true"))
    assert slot.proc.wait(20) == 2


def test_a_worker_that_keeps_dying_at_start_ends_the_keeper(
    start_slot: StartSlot, redis_url: str, pool: str, r: redis.Redis
) -> None:
    """A poison job kills every worker that takes it (each successor recovers it
    and calls it again): after three deaths within 2 s of a start the keeper
    gives up with the worker's code, so that its supervisor's back-off applies."""
    slot = start_slot(
        handler="tests.handlers:die",
        extra=("--standby", "true", "--max-attempts", "20"),
    )
    wait_for(lambda: active_pid(slot), 20, what="the active worker serving /healthz")
    with Client(redis_url, pool) as client:
        client.submit({})
        assert slot.proc.wait(30) == 3
    assert "keeps dying at start" in slot.log.read_text()
    wait_for(lambda: not processes_of(pool), 5, what="no worker left")


def processes_of(pool: str) -> list[int]:
    """Live processes whose command line names the pool (a keeper's forks keep it)."""
    found = subprocess.run(["pgrep", "-f", "--", f"--pool {pool} "], capture_output=True, text=True)
    return [pid for pid in map(int, found.stdout.split()) if _alive(pid)]


def test_sigusr1_to_the_keeper_reaches_the_worker(
    keeper: Callable[[], SlotProcess], api: StandInApi
) -> None:
    """SIGUSR1 asks a slot for every task's stack: under a keeper, the worker answers
    it, and neither process dies of it."""
    slot = keeper()
    worker = active_pid(slot)
    slot.proc.send_signal(signal.SIGUSR1)
    wait_for(lambda: "--- heartbeat" in slot.log.read_text(), 10, what="the worker's task dump")
    assert slot.proc.poll() is None
    assert active_pid(slot) == worker


def test_a_frozen_slot_is_not_a_hung_one(
    keeper: Callable[[], SlotProcess], api: StandInApi, redis_url: str, pool: str
) -> None:
    """The keeper, its worker and its standby stopped together for four hang
    windows (a paused VM, a frozen pod), then resumed, the keeper first: the time
    the keeper itself did not run is not counted as the worker's silence, so
    nothing is killed and the same worker calls on."""
    slot = keeper()
    load = Load(redis_url, pool, f"{api.url}/work?ms=100", depth=3, every=0.01)
    with load:
        active, standby, _ = calling(slot, api)
        family = (slot.proc.pid, active, standby)
        for pid in family:
            os.kill(pid, signal.SIGSTOP)
        time.sleep(4 * HANG_WINDOW)
        os.kill(slot.proc.pid, signal.SIGCONT)
        time.sleep(HANG_WINDOW / 5)  # the keeper looks before its worker can beat
        for pid in (active, standby):
            os.kill(pid, signal.SIGCONT)
        done = calls_done(api)
        wait_for(lambda: calling_again(api, done), 10, what="calls again")
        assert active_pid(slot) == active
        assert children(slot.proc.pid) == {active, standby}
    drained(load, redis_url)
    load.close()
    one_caller(api)
    assert "silent for" not in slot.log.read_text()


CPU_CGROUPS = Path("/sys/fs/cgroup/cpu")


@pytest.fixture
def quota() -> Iterator[Path]:
    """A cgroup (v1 cpu controller) allowing 50 ms of CPU per second, with a busy
    loop inside that spends it first in every period."""
    if not (os.access(CPU_CGROUPS, os.W_OK) and (CPU_CGROUPS / "cpu.cfs_quota_us").exists()):
        pytest.skip("needs a writable cgroup v1 cpu controller (root)")
    path = CPU_CGROUPS / f"apipool-test-{os.getpid()}-{time.monotonic_ns()}"
    path.mkdir()
    (path / "cpu.cfs_period_us").write_text("1000000")
    (path / "cpu.cfs_quota_us").write_text("50000")
    hog = subprocess.Popen(["python3", "-c", "while True: pass"])
    try:
        (path / "cgroup.procs").write_text(str(hog.pid))
        yield path
    finally:
        hog.kill()
        hog.wait()
        for pid in (path / "cgroup.procs").read_text().split():
            (CPU_CGROUPS / "cgroup.procs").write_text(pid)
        path.rmdir()


def test_a_worker_starved_of_cpu_is_not_a_hung_one(
    keeper: Callable[[], SlotProcess], api: StandInApi, redis_url: str, pool: str, quota: Path
) -> None:
    """The worker (not its keeper) under a CPU quota that a busy loop spends first:
    it stands still for most of every second, past the hang window, while the
    kernel counts it as waiting for a CPU. That wait is not silence: nothing is
    killed, and once the quota is lifted the same worker calls on."""
    slot = keeper()
    load = Load(redis_url, pool, f"{api.url}/work?ms=100", depth=3, every=0.01)
    with load:
        active, _, _ = calling(slot, api)
        (quota / "cgroup.procs").write_text(str(active))
        time.sleep(8 * HANG_WINDOW)
        stat = dict(line.split() for line in (quota / "cpu.stat").read_text().splitlines())
        assert int(stat["nr_throttled"]) >= 3  # it was held back, period after period
        (CPU_CGROUPS / "cgroup.procs").write_text(str(active))
        done = calls_done(api)
        wait_for(lambda: calling_again(api, done), 10, what="calls again")
        assert active_pid(slot) == active
    drained(load, redis_url)
    load.close()
    one_caller(api)
    assert "silent for" not in slot.log.read_text()
