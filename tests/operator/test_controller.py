"""The kopf wiring (an explicit registry, built from settings) and the plan step of a
reconcile, without a cluster."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from typing import Any

import pytest

from apipool.operator.config import OperatorSettings
from apipool.operator.planning import Create, Delete, ObservedPod
from apipool.operator.reconcile import Observation, Reconciler
from apipool.operator.spec import parse_spec
from apipool.operator.status import Problem

from ..conftest import ROOT, SUBPROCESS_ENV

pytestmark = pytest.mark.unit

SETTINGS = OperatorSettings(timer_interval=7.5, metrics_port=0, liveness_endpoint="")


def handler_ids(registry: Any) -> dict[str, set[str]]:
    """The ids of the handlers of a kopf registry, by kind (kopf 1.45's registries)."""
    kinds = {
        "activities": registry._activities,
        "changing": registry._changing,
        "watching": registry._watching,
        "spawning": registry._spawning,
    }
    return {kind: {h.id for h in reg.get_all_handlers()} for kind, reg in kinds.items()}


def test_the_registry_holds_every_handler_with_the_timer_of_the_settings() -> None:
    import kopf

    from apipool.operator.controller import build_registry

    reconciler = Reconciler(SETTINGS)
    registry = build_registry(SETTINGS, reconciler)
    assert isinstance(registry, kopf.OperatorRegistry)
    assert handler_ids(registry) == {
        "activities": {"configure", "login_via_client"},
        "changing": {"pool_changed", "pool_deleted"},
        "watching": {"slot_pod_event"},
        "spawning": {"pool_timer"},
    }
    (timer,) = registry._spawning.get_all_handlers()
    assert (timer.interval, timer.sharp) == (7.5, False)
    # Two registries share nothing: each operator has its own handlers and state.
    other = build_registry(dataclasses.replace(SETTINGS, timer_interval=2.0))
    (timer2,) = other._spawning.get_all_handlers()
    assert timer2.interval == 2.0
    assert timer.interval == 7.5


def test_importing_the_operator_reads_no_setting_and_registers_nothing() -> None:
    """Settings come from ``apipool operator`` alone: a broken APIPOOL_* variable
    does not break an import, and kopf's default registry stays empty."""
    code = (
        "import kopf\n"
        "from kopf._core.intents import registries\n"
        "import apipool.operator.controller, apipool.operator.run\n"
        "default = registries.get_default_registry()\n"
        "ours = [h.id for reg in (default._changing, default._watching, default._spawning)\n"
        "        for h in reg.get_all_handlers()]\n"
        "print(ours)\n"
    )
    env = dict(SUBPROCESS_ENV, APIPOOL_TIMER_INTERVAL="not a number", APIPOOL_METRICS_PORT="x")
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


SPEC = {
    "slots": 2,
    "image": "ghcr.io/example/apipool:0.1.0",
    "redis": {"secretRef": {"name": "redis"}},
}
BODY = {"metadata": {"namespace": "default", "name": "billing"}, "spec": SPEC}


def pod(index: int, digest: str, *, ready: bool = True) -> ObservedPod:
    return ObservedPod(index, f"billing-slot-{index}", digest, "Running", ready=ready)


def test_plan_takes_every_action_of_a_healthy_pool() -> None:
    spec = parse_spec("billing", SPEC)
    seen = Observation(BODY, [pod(0, "new"), pod(3, "new")], spec, "new", "redis://r")
    todo = Reconciler(SETTINGS).plan(seen)
    assert todo.actions == [Delete(3, "billing-slot-3", "scale-down to 2 slots"), Create(1)]
    assert todo.allowed == todo.actions


def test_plan_with_a_problem_only_scales_down() -> None:
    """Without the Secret new pods could not start: nothing is created or replaced."""
    spec = parse_spec("billing", {**SPEC, "maxUnavailable": 2})
    pods = [pod(0, "old"), pod(3, "new")]
    problem = Problem("RedisSecretMissing", "no Secret")
    seen = Observation(BODY, pods, spec, "new", None, problem)
    todo = Reconciler(SETTINGS).plan(seen)
    assert todo.actions == [
        Delete(3, "billing-slot-3", "scale-down to 2 slots"),
        Create(1),
        Delete(0, "billing-slot-0", "pod template changed"),
    ]
    assert todo.allowed == [Delete(3, "billing-slot-3", "scale-down to 2 slots")]


def test_plan_of_an_invalid_spec_is_empty() -> None:
    seen = Observation(BODY, [pod(0, "old")], None, problem=Problem("InvalidSpec", "bad"))
    todo = Reconciler(SETTINGS).plan(seen)
    assert (todo.actions, todo.allowed) == ([], [])
