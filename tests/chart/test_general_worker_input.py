"""examples/python/general_worker.py: its input list, the backlog an autoscaler measures."""

from __future__ import annotations

import threading
from types import ModuleType
from typing import Any

import pytest
from redis import RedisError

from .test_general_worker import worker

pytestmark = pytest.mark.unit

__all__ = ["worker"]  # the module fixture, shared

BASE_ENV = {
    "APIPOOL_REDIS_URL": "redis://127.0.0.1:1/0",
    "APIPOOL_POOL": "billing",
    "APIPOOL_TARGET_URL": "https://api.example/v1/x",
    "APIPOOL_MAX_BACKOFF": "0.01",
}


class FakeSource:
    """Stands in for redis.Redis: scripted BLPOP outcomes, the calls recorded."""

    def __init__(self, outcomes: list[Any]) -> None:
        self.outcomes = outcomes
        self.calls: list[tuple[list[str], float]] = []

    def blpop(self, keys: list[str], timeout: float) -> Any:
        self.calls.append((keys, timeout))
        outcome = self.outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome


def test_settings_read_the_input_list(worker: ModuleType) -> None:
    env = {**BASE_ENV, "APIPOOL_INPUT_LIST": " rq:queue:default ", "APIPOOL_INPUT_WAIT": "2"}
    settings = worker.Settings.from_env(env)
    assert (settings.input_list, settings.input_wait) == ("rq:queue:default", 2.0)
    assert worker.Settings.from_env(BASE_ENV).input_list == ""


def test_an_input_wait_of_zero_is_refused(worker: ModuleType) -> None:
    """BLPOP with timeout 0 blocks forever and would never see SIGTERM."""
    with pytest.raises(SystemExit, match="APIPOOL_INPUT_WAIT must be > 0"):
        worker.Settings.from_env({**BASE_ENV, "APIPOOL_INPUT_WAIT": "0"})


@pytest.mark.parametrize(
    ("outcome", "item"),
    [
        ((b"rq:queue:default", b"job-7"), "job-7"),
        (("rq:queue:default", "job-8"), "job-8"),
        (None, None),
        (RedisError("connection reset"), None),
    ],
)
def test_take_item_pops_one_item_from_the_input_list(
    worker: ModuleType, outcome: Any, item: str | None
) -> None:
    settings = worker.Settings.from_env({**BASE_ENV, "APIPOOL_INPUT_LIST": "rq:queue:default"})
    source = FakeSource([outcome])
    assert worker.take_item(source, settings, threading.Event()) == item
    assert source.calls == [(["rq:queue:default"], settings.input_wait)]
