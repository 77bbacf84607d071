"""The keeper's silence clock (pure): what counts towards a hang and what does not."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from hypothesis import given
from hypothesis import strategies as st

from apipool.silence import Sample, SilenceClock, sample
from apipool.testing.polling import wait_for

TICK = 0.05
SLEEPING = Sample(runnable=False, cpu=1.0)


def test_a_stopped_worker_under_an_on_time_keeper_is_hung_after_the_window() -> None:
    clock = SilenceClock(window=0.5)
    clock.heard(SLEEPING)
    looks = 0
    while not clock.hung:
        clock.look(TICK, SLEEPING)  # not runnable: stopped, or blocked for good
        looks += 1
    assert looks == 11  # ten looks make exactly the window; one more passes it
    assert clock.waited == 0.0


def test_a_worker_spinning_with_its_loop_held_is_hung() -> None:
    clock = SilenceClock(window=0.5)
    cpu = 1.0
    clock.heard(Sample(runnable=True, cpu=cpu))
    for _ in range(11):
        cpu += TICK  # it has the CPU all along and still does not beat
        clock.look(TICK, Sample(runnable=True, cpu=cpu))
    assert clock.hung


def test_a_worker_waiting_for_a_cpu_is_never_hung() -> None:
    clock = SilenceClock(window=0.5)
    clock.heard(Sample(runnable=True, cpu=3.0))
    for _ in range(1000):  # 50 s runnable without being run (a spent CPU quota)
        clock.look(TICK, Sample(runnable=True, cpu=3.0))
    assert not clock.hung
    assert clock.silent == 0.0
    assert abs(clock.waited - 50.0) < 1e-6


def test_only_the_cpu_a_runnable_worker_got_counts() -> None:
    clock = SilenceClock(window=0.5)
    cpu = 0.0
    clock.heard(Sample(runnable=True, cpu=cpu))
    for _ in range(100):  # 5 s, a tenth of it on a CPU: 0.5 s counted
        cpu += TICK / 10
        clock.look(TICK, Sample(runnable=True, cpu=cpu))
    assert abs(clock.silent - 0.5) < 1e-6


def test_a_late_keeper_credits_one_step_only() -> None:
    clock = SilenceClock(window=0.5, max_step=0.1)
    clock.heard(SLEEPING)
    clock.look(30.0, SLEEPING)  # the keeper was frozen 30 s along with its worker
    assert clock.silent == 0.1
    assert not clock.hung
    assert abs(clock.waited - 29.9) < 1e-9


def test_a_beat_starts_the_silence_again() -> None:
    clock = SilenceClock(window=0.5)
    for _ in range(9):
        clock.look(TICK, None)
    clock.heard(None)
    for _ in range(9):
        clock.look(TICK, None)
    assert not clock.hung


def test_a_worker_that_cannot_be_read_counts_wall_time() -> None:
    clock = SilenceClock(window=0.3)
    for _ in range(7):
        clock.look(TICK, None)
    assert clock.hung


samples = st.tuples(
    st.floats(min_value=-1.0, max_value=100.0, allow_nan=False),
    st.booleans(),
    st.floats(min_value=0.0, max_value=100.0, allow_nan=False),
)


@given(st.lists(samples, max_size=200), st.floats(min_value=0.01, max_value=1.0))
def test_counted_silence_is_bounded_and_accounts_for_all_time(
    looks: list[tuple[float, bool, float]], max_step: float
) -> None:
    clock = SilenceClock(window=1.0, max_step=max_step)
    cpu = 0.0
    clock.heard(Sample(False, cpu))
    bound = 0.0
    for elapsed, runnable, ran in looks:
        cpu += ran
        clock.look(elapsed, Sample(runnable, cpu))
        bound += min(max(0.0, elapsed), max_step)
        assert 0.0 <= clock.silent <= bound + 1e-9
    total = sum(max(0.0, elapsed) for elapsed, _, _ in looks)
    assert abs(clock.silent + clock.waited - total) < 1e-6 * max(1.0, total)


def test_sample_reads_this_kernels_view_of_a_process() -> None:
    """A busy process is runnable and gains CPU; a stopped one is not runnable."""
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        first = sample(busy.pid)
        assert first is not None
        wait_for(lambda: (s := sample(busy.pid)) is not None and s.cpu > first.cpu, 10,
                 what="CPU time growing")  # fmt: skip
        os.kill(busy.pid, signal.SIGSTOP)
        wait_for(lambda: (s := sample(busy.pid)) is not None and not s.runnable, 10,
                 what="stopped")  # fmt: skip
        stopped = sample(busy.pid)
        time.sleep(0.05)
        again = sample(busy.pid)
        assert stopped is not None
        assert again is not None
        assert again.cpu == stopped.cpu
    finally:
        busy.kill()
        busy.wait()


def test_sample_of_no_process_is_none() -> None:
    assert sample(2**22 + 12345) is None
