"""The harness's fault injection: who is hit, in which order, and what is recorded."""

from __future__ import annotations

import asyncio
import random
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import cast

import pytest

from apipool.supervisor import Supervisor
from apipool.testing.harness import ChaosPlan, ScheduledFault
from apipool.testing.harness.chaos import FaultInjector, pick_victim
from apipool.testing.polling import async_wait_for

PIDS = {0: 100, 1: 101, 2: 102, 3: 103}
ALL = set(PIDS)


@pytest.mark.unit
@pytest.mark.parametrize(
    ("healthy", "stopped"),
    [
        (set(), set()),  # replacements still starting
        (ALL, set(PIDS.values())),  # all stopped already
        ({0}, {100}),
    ],
)
def test_pick_victim_finds_none(healthy: set[int], stopped: set[int]) -> None:
    assert pick_victim(PIDS, healthy, stopped, {}, random.Random(1), 1.0) is None


@pytest.mark.unit
def test_pick_victim_only_among_healthy_and_not_stopped() -> None:
    rng = random.Random(3)
    seen = {pick_victim(PIDS, {0, 1, 2}, {101}, {}, rng, 0.85) for _ in range(50)}
    assert seen == {(0, 100, False), (2, 102, False)}


@pytest.mark.unit
@pytest.mark.parametrize(
    ("prefer_busy", "expected"),
    [(1.0, {(1, 101, True), (3, 103, True)}), (0.0, None)],
)
def test_pick_victim_prefers_slots_in_a_call(
    prefer_busy: float, expected: set[tuple[int, int, bool]] | None
) -> None:
    busy = {0: False, 1: True, 2: False, 3: True}
    rng = random.Random(5)
    seen = {pick_victim(PIDS, ALL, set(), busy, rng, prefer_busy) for _ in range(200)}
    if expected is not None:
        assert seen == expected
    else:  # never preferred, yet a busy victim is still marked as in a call
        assert {(slot, in_call) for slot, _, in_call in seen} == {
            (0, False),
            (1, True),
            (2, False),
            (3, True),
        }


@pytest.mark.unit
@pytest.mark.parametrize("busy", [{}, {2: True}])
def test_pick_victim_draws_in_a_fixed_order(busy: dict[int, bool]) -> None:
    """A seed replays the same victims: one ``random()`` only when a slot is in a call,
    then one ``choice``."""
    picks = [pick_victim(PIDS, ALL, set(), busy, random.Random(seed), 0.5) for seed in range(20)]
    again = [pick_victim(PIDS, ALL, set(), busy, random.Random(seed), 0.5) for seed in range(20)]
    assert picks == again
    for seed, pick in enumerate(picks):
        rng = random.Random(seed)
        live = sorted(PIDS)
        in_call = [i for i in live if busy.get(i)]
        slot = rng.choice(in_call if in_call and rng.random() < 0.5 else live)
        assert pick == (slot, PIDS[slot], slot in in_call)


@dataclass
class FakeSlot:
    index: int
    proc: subprocess.Popen[bytes]
    healthy: bool = True


@dataclass
class FakeSupervisor:
    """The two things the injector asks a supervisor: its slots and their pids."""

    slots: list[FakeSlot] = field(default_factory=list)

    def pids(self) -> dict[int, int]:
        return {s.index: s.proc.pid for s in self.slots if s.proc.poll() is None}


@pytest.fixture
def sleepers() -> Iterator[FakeSupervisor]:
    sup = FakeSupervisor([FakeSlot(i, subprocess.Popen(["sleep", "30"])) for i in range(2)])
    yield sup
    for slot in sup.slots:
        slot.proc.send_signal(signal.SIGCONT)
        slot.proc.kill()
        slot.proc.wait(10)


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rpartition(")")[2].split()[0]


@pytest.mark.timeout(30)
def test_scheduled_faults_are_struck_and_recorded(sleepers: FakeSupervisor) -> None:
    plan = ChaosPlan(
        schedule=(ScheduledFault(0.3, "kill"), ScheduledFault(0.1, "stop_short", hold=0.5))
    )

    async def scenario() -> FaultInjector:
        running = True
        injector = FaultInjector(
            plan, cast(Supervisor, sleepers), {}, random.Random(7), lambda: running
        )
        task = asyncio.create_task(injector.run(time.monotonic(), None))
        await async_wait_for(lambda: len(injector.faults) == 2, 5, what="both faults")
        stopped = injector.faults[0].pid
        assert injector.stopped_pids == {stopped}
        assert _state(stopped) == "T"
        await async_wait_for(lambda: not injector.stopped_pids, 5, what="the SIGCONT")
        assert _state(stopped) != "T"
        running = False
        await asyncio.wait_for(task, 5)
        return injector

    injector = asyncio.run(scenario())
    stop, kill = injector.faults
    assert (stop.kind, kill.kind) == ("stop_short", "kill")  # in time order
    assert kill.pid != stop.pid  # a stopped process is not picked again
    assert 0.1 <= stop.at < kill.at
    assert kill.at >= 0.3
    assert stop.in_call is kill.in_call is False  # nobody is busy here
    procs = {s.proc.pid: s.proc for s in sleepers.slots}
    assert procs[kill.pid].wait(5) == -signal.SIGKILL
    assert procs[stop.pid].poll() is None


@pytest.mark.asyncio
async def test_worker_pid_reads_the_pid_a_slot_names_on_healthz() -> None:
    """Under keepers the chaos hits the active worker, found through /healthz."""
    from prometheus_client import CollectorRegistry

    from apipool.health import HealthServer
    from apipool.supervisor import free_port
    from apipool.testing.harness.chaos import worker_pid

    server = HealthServer(
        health=lambda: (True, "ok"),
        readiness=lambda: (True, "ok"),
        registry=CollectorRegistry(),
        info={"pid": 4242},
    )
    port = await server.start()
    assert port is not None
    try:
        assert await worker_pid(port) == 4242
    finally:
        await server.stop()
    assert await worker_pid(port) is None  # nobody listens: no victim
    assert await worker_pid(free_port()) is None
