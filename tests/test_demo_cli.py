"""``apipool demo`` as a command: its exit codes in-process, then the real CLI end to end."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from apipool.demo import chaos_interval, run_demo
from apipool.demo import run as demo_run
from apipool.errors import ApipoolError
from apipool.testing.harness import FAULT_KINDS, Scenario, ScenarioResult, Snapshot

from .conftest import ROOT, wait_for
from .test_demo import demo_args, result

# -- exit codes, in-process ------------------------------------------------------------


@pytest.mark.unit
@pytest.mark.parametrize(
    ("changes", "message"),
    [
        pytest.param({"slots": 0}, "--slots must be >= 1", id="no slots"),
        pytest.param({"duration": 0.0}, "--duration and --call-ms must be > 0", id="no time"),
        pytest.param({"call_ms": -1.0}, "--duration and --call-ms must be > 0", id="no calls"),
        pytest.param({"redis_url": "nope://127.0.0.1/0"}, "bad --redis-url", id="bad redis url"),
    ],
)
def test_bad_arguments_exit_2(
    changes: dict[str, Any], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_demo(demo_args(json=True, **changes)) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert message in captured.err


def test_unreachable_redis_exits_7_without_showing_its_password(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert run_demo(demo_args(json=True, redis_url="redis://:secret@127.0.0.1:1/0")) == 7
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "cannot reach Redis at redis://:***@127.0.0.1:1/0" in captured.err
    assert "secret" not in captured.err


RunScenario = Callable[..., Any]


def fake_run_scenario(outcome: ScenarioResult | BaseException | signal.Signals) -> RunScenario:
    """A stand-in for the harness's ``run_scenario``: returns ``outcome``, raises it,
    or sends the process that signal and waits to be stopped."""

    async def run_scenario(
        scenario: Scenario, *, on_tick: Callable[[Snapshot], None], tick: float
    ) -> ScenarioResult:
        if isinstance(outcome, ScenarioResult):
            return outcome
        if isinstance(outcome, BaseException):
            raise outcome
        os.kill(os.getpid(), outcome)
        await asyncio.sleep(60)  # cancelled by the demo's signal handler
        raise AssertionError("not stopped by the signal")

    return run_scenario


@pytest.mark.redis
@pytest.mark.parametrize(
    ("outcome", "code"),
    [
        pytest.param(result(), 0, id="cap held, nothing lost"),
        pytest.param(result(max_concurrency=5, over_limit_seconds=0.2), 7, id="cap broken"),
        pytest.param(result(lost=1), 7, id="a job lost"),
    ],
)
def test_a_finished_run_exits_with_its_verdict(
    outcome: ScenarioResult,
    code: int,
    redis_url: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(demo_run, "run_scenario", fake_run_scenario(outcome))
    assert run_demo(demo_args(json=True, redis_url=redis_url)) == code
    doc = json.loads(capsys.readouterr().out)
    assert (doc["cap_held"] and doc["nothing_lost"]) is (code == 0)


@pytest.mark.redis
@pytest.mark.parametrize(
    ("outcome", "code", "message"),
    [
        pytest.param(RuntimeError("boom"), 7, "the run failed: RuntimeError: boom", id="an error"),
        pytest.param(ApipoolError("no pool"), 7, "error: no pool", id="an apipool error"),
        pytest.param(
            KeyboardInterrupt(), 130, "interrupted; everything it started", id="ctrl-c raised"
        ),
        pytest.param(signal.SIGINT, 130, "interrupted; everything it started", id="ctrl-c signal"),
        pytest.param(signal.SIGTERM, 143, "terminated; everything it started", id="sigterm signal"),
    ],
)
def test_a_run_that_did_not_finish_exits_with_why(
    outcome: BaseException | signal.Signals,
    code: int,
    message: str,
    redis_url: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(demo_run, "run_scenario", fake_run_scenario(outcome))
    assert run_demo(demo_args(json=True, redis_url=redis_url)) == code
    captured = capsys.readouterr()
    assert captured.out == ""
    assert message in captured.err


# -- the real CLI --------------------------------------------------------------------------


def cli_env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "operator"), PYTHONUNBUFFERED="1")
    env.pop("APIPOOL_REDIS_URL", None)  # the demo must start its own throwaway redis-server
    return env


def demo_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "apipool", "demo", *args]


def run_cli(*args: str, timeout: float = 90.0) -> tuple[int, dict[str, Any], str]:
    proc = subprocess.run(
        demo_command(*args),
        env=cli_env(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    try:
        doc = json.loads(proc.stdout)
    except ValueError:
        pytest.fail(
            f"stdout is not one JSON object (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        )
    assert isinstance(doc, dict)
    return proc.returncode, doc, proc.stderr


def assert_cap_held_and_nothing_lost(
    code: int, doc: dict[str, Any], stderr: str, limit: int
) -> None:
    assert doc["limit"] == limit
    assert doc["max_concurrency"] <= limit, doc["over_limit_events"]
    assert doc["over_limit_seconds"] == 0, doc["over_limit_events"]
    assert (doc["lost"], doc["duplicated"], doc["unfinished"]) == (0, 0, 0), doc
    assert doc["cap_held"] is True
    assert doc["nothing_lost"] is True
    assert code == 0, stderr


@pytest.mark.redis
@pytest.mark.timeout(120)
def test_demo_json_holds_the_cap_and_loses_nothing() -> None:
    code, doc, stderr = run_cli("--duration", "4", "--slots", "3", "--json")
    assert doc["utilization"] > 0.8, doc
    assert doc["completed"] > 0
    assert doc["chaos"] is False
    assert doc["faults_by_kind"] == dict.fromkeys(FAULT_KINDS, 0)
    assert_cap_held_and_nothing_lost(code, doc, stderr, limit=3)


@pytest.mark.redis
@pytest.mark.timeout(120)
def test_demo_svg_saves_the_final_view_with_the_slot_time(tmp_path: Path) -> None:
    """``--svg``: the demo's own view, its slot-time bar included, as a picture."""
    picture = tmp_path / "demo.svg"
    proc = subprocess.run(
        demo_command("--duration", "4", "--slots", "2", "--svg", str(picture)),
        env=cli_env(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    text = picture.read_text()
    assert text.startswith("<svg")
    for words in ("apipool", "demo", "slot", "time", "calling"):
        assert words in text, words
    assert "cap held" in proc.stdout or "held" in proc.stdout


def early_fault_seed(slots: int) -> int:
    """A seed whose first chaos interval is short, so a 6 s run surely sees a fault.

    The harness draws the wait before each fault from ``random.Random(seed)``, the
    first draw first; at one fault every 8 / 3 s on average, an unlucky unseeded
    run would see none in 6 s about one time in ten.
    """
    return next(
        seed
        for seed in range(1000)
        if random.Random(seed).expovariate(1.0 / chaos_interval(slots)) < 1.0
    )


@pytest.mark.redis
@pytest.mark.chaos
@pytest.mark.timeout(120)
def test_demo_with_chaos_holds_the_cap_and_loses_nothing() -> None:
    seed = early_fault_seed(3)
    code, doc, stderr = run_cli(
        "--chaos", "--duration", "6", "--slots", "3", "--seed", str(seed), "--json"
    )
    assert doc["chaos"] is True
    assert len(doc["faults"]) > 0, doc
    assert sum(doc["faults_by_kind"].values()) == len(doc["faults"])
    assert_cap_held_and_nothing_lost(code, doc, stderr, limit=3)


def children_of(pid: int) -> set[int]:
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may hold spaces, so split after the ")"
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.add(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.redis
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
@pytest.mark.timeout(90)
@pytest.mark.parametrize(
    ("signum", "code", "said"),
    [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")],
)
def test_a_stop_signal_stops_everything_and_exits_128_plus_it(
    signum: signal.Signals, code: int, said: str
) -> None:
    proc = subprocess.Popen(
        demo_command("--duration", "60", "--slots", "2", "--json"),
        env=cli_env(),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # redis-server and two slot processes: the pool is up and running.
        wait_for(
            lambda: len(children_of(proc.pid)) >= 3 or proc.poll() is not None,
            30,
            what="the demo's redis-server and slot processes",
        )
        assert proc.poll() is None, "the demo exited before starting its processes"
        time.sleep(1.0)  # let the pool run for a moment, so the signal lands mid-run
        started = children_of(proc.pid)
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=45)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == code, err
    assert said in err
    assert out == ""
    assert len(started) >= 3
    left = [pid for pid in started if alive(pid)]
    assert not left, f"still running after the demo exited: {left}"
