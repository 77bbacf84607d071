"""plan(): every rule on plain data."""

from __future__ import annotations

import pytest

from apipool.operator.planning import Create, Delete, Desired, ObservedPod, plan

pytestmark = pytest.mark.unit

NEW, OLD = "new", "old"


def pod(i: int, digest: str = NEW, **kw: object) -> ObservedPod:
    base: dict[str, object] = {"phase": "Running", "ready": True, "terminating": False}
    base.update(kw)
    return ObservedPod(index=i, name=f"p-slot-{i}", template_hash=digest, **base)  # type: ignore[arg-type]


def test_empty_pool_creates_every_slot() -> None:
    assert plan(Desired(3, NEW), []) == [Create(0), Create(1), Create(2)]


def test_a_complete_pool_needs_nothing() -> None:
    assert plan(Desired(3, NEW), [pod(0), pod(1), pod(2)]) == []


def test_missing_slot_is_created_even_while_others_are_not_ready() -> None:
    observed = [pod(0, ready=False), pod(2, ready=False)]
    assert plan(Desired(3, NEW), observed) == [Create(1)]


def test_terminating_pod_is_not_replaced_until_it_is_gone() -> None:
    observed = [pod(0), pod(1, terminating=True), pod(2)]
    assert plan(Desired(3, NEW), observed) == []
    assert plan(Desired(3, NEW), [pod(0), pod(2)]) == [Create(1)]


def test_scale_down_deletes_highest_first_and_only_once() -> None:
    observed = [pod(i) for i in range(5)]
    assert plan(Desired(2, NEW), observed) == [
        Delete(4, "p-slot-4", "scale-down to 2 slots"),
        Delete(3, "p-slot-3", "scale-down to 2 slots"),
        Delete(2, "p-slot-2", "scale-down to 2 slots"),
    ]
    observed = [pod(0), pod(1), pod(2, terminating=True)]
    assert plan(Desired(2, NEW), observed) == []


def test_scale_to_zero() -> None:
    assert plan(Desired(0, NEW), [pod(0)]) == [Delete(0, "p-slot-0", "scale-down to 0 slots")]


def test_failed_pod_is_deleted_then_recreated() -> None:
    observed = [pod(0), pod(1, phase="Failed", ready=False)]
    assert plan(Desired(2, NEW), observed) == [Delete(1, "p-slot-1", "pod failed")]
    assert plan(Desired(2, NEW), [pod(0)]) == [Create(1)]


def test_rolling_replacement_one_at_a_time_highest_first() -> None:
    desired = Desired(3, NEW, max_unavailable=1)
    observed = [pod(0, OLD), pod(1, OLD), pod(2, OLD)]
    assert plan(desired, observed) == [Delete(2, "p-slot-2", "pod template changed")]
    # while slot 2 terminates, nothing else is touched
    observed = [pod(0, OLD), pod(1, OLD), pod(2, OLD, terminating=True)]
    assert plan(desired, observed) == []
    # once it is gone it is recreated; while the new one is not ready, wait
    assert plan(desired, [pod(0, OLD), pod(1, OLD)]) == [Create(2)]
    observed = [pod(0, OLD), pod(1, OLD), pod(2, NEW, ready=False)]
    assert plan(desired, observed) == []
    # ready: next one
    observed = [pod(0, OLD), pod(1, OLD), pod(2, NEW)]
    assert plan(desired, observed) == [Delete(1, "p-slot-1", "pod template changed")]


def test_max_unavailable_two_replaces_two_at_a_time() -> None:
    desired = Desired(4, NEW, max_unavailable=2)
    observed = [pod(i, OLD) for i in range(4)]
    assert plan(desired, observed) == [
        Delete(3, "p-slot-3", "pod template changed"),
        Delete(2, "p-slot-2", "pod template changed"),
    ]


def test_replacement_never_runs_more_than_n_pods() -> None:
    """Simulate a rollout: at no step do more than N slot pods exist."""
    n = 4
    desired = Desired(n, NEW, max_unavailable=2)
    pods = {i: pod(i, OLD) for i in range(n)}
    for _ in range(50):
        actions = plan(desired, pods.values())
        if not actions:
            break
        for action in actions:
            if isinstance(action, Delete):
                pods.pop(action.index)  # deleted (terminating, then gone)
            else:
                assert action.index not in pods  # kill-before-replace
                pods[action.index] = pod(action.index, NEW)
        assert len(pods) <= n
    assert all(p.template_hash == NEW for p in pods.values())
    assert sorted(pods) == list(range(n))


def test_not_ready_outdated_pods_are_replaced_without_waiting() -> None:
    desired = Desired(3, NEW, max_unavailable=1)
    observed = [pod(0, OLD, ready=False), pod(1, OLD), pod(2, OLD)]
    assert plan(desired, observed) == [Delete(0, "p-slot-0", "pod template changed")]


def test_a_broken_new_template_stops_the_rollout() -> None:
    desired = Desired(3, NEW, max_unavailable=1)
    observed = [pod(0, OLD), pod(1, OLD), pod(2, NEW, ready=False, phase="Running")]
    assert plan(desired, observed) == []
