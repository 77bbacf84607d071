"""examples/python/general_worker.py: its handling of the pool's typed errors."""

from __future__ import annotations

import importlib.util
import sys
import threading
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from apipool import JobExpired, JobFailed, QueueFull, ResultTimeout

pytestmark = pytest.mark.unit

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "python" / "general_worker.py"


@pytest.fixture(scope="module")
def worker() -> ModuleType:
    spec = importlib.util.spec_from_file_location("general_worker", SCRIPT)
    assert spec
    assert spec.loader
    module = importlib.util.module_from_spec(spec)
    # dataclasses look their module up in sys.modules while the class is built.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


class FakeClient:
    """Stands in for apipool.Client: scripted submit and result outcomes."""

    def __init__(self, submits: list[Any], result: Any) -> None:
        self.submits = submits
        self.result_outcome = result
        self.payloads: list[Any] = []

    def submit(self, payload: Any, *, deadline: float | None = None) -> str:
        self.payloads.append(payload)
        outcome = self.submits.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return str(outcome)

    def result(self, job_id: str, timeout: float) -> Any:
        if isinstance(self.result_outcome, Exception):
            raise self.result_outcome
        return self.result_outcome


def settings(worker: ModuleType) -> Any:
    return worker.Settings.from_env(
        {
            "APIPOOL_REDIS_URL": "redis://127.0.0.1:1/0",
            "APIPOOL_POOL": "billing",
            "APIPOOL_TARGET_URL": "https://api.example/v1/x",
            "APIPOOL_WORK_CPU_SECONDS": "0.001",
            "APIPOOL_WORK_SLEEP_SECONDS": "0",
            "APIPOOL_MAX_BACKOFF": "0.01",
        }
    )


def test_queue_full_backs_off_and_retries(worker: ModuleType) -> None:
    full = QueueFull("billing", depth=5, limit=5)
    client = FakeClient([full, full, "job-1"], {"status": 200})
    assert worker.run_round(client, settings(worker), threading.Event(), 1) == "ok"
    assert len(client.payloads) == 3
    assert client.payloads[0] == {"method": "GET", "url": "https://api.example/v1/x"}


@pytest.mark.parametrize(
    ("error", "outcome"),
    [
        (JobFailed("job-1", "HTTP 500", 3), "failed"),
        (JobExpired("job-1", "deadline passed"), "failed"),
        (ResultTimeout("job-1", 30), "timeout"),
    ],
)
def test_result_errors_are_handled(worker: ModuleType, error: Exception, outcome: str) -> None:
    client = FakeClient(["job-1"], error)
    assert worker.run_round(client, settings(worker), threading.Event(), 1) == outcome


def test_stop_while_queue_full(worker: ModuleType) -> None:
    stop = threading.Event()
    stop.set()
    client = FakeClient([], None)
    assert worker.run_round(client, settings(worker), stop, 1) == "stopped"


def test_backoff_is_capped(worker: ModuleType) -> None:
    for failures in range(1, 40):
        assert 0 <= worker.backoff_delay(failures, 2.0) <= 2.0


def test_settings_need_the_three_variables(worker: ModuleType) -> None:
    with pytest.raises(SystemExit, match="APIPOOL_TARGET_URL"):
        worker.Settings.from_env({"APIPOOL_REDIS_URL": "redis://x", "APIPOOL_POOL": "p"})
