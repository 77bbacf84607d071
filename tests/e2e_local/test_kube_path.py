"""The cap through the Kubernetes path: operator -> pods -> kubelet -> slots.

One run, faults one after another with recovery in between, against a pool of
``SLOTS`` slots and a stand-in whose hard limit is ``SLOTS``. It asserts I1 (the
stand-in never saw more than ``spec.slots`` connections) and I2 (every job has
exactly one outcome), bounds each recovery, and prints the figures as one JSON
object (also written to ``$APIPOOL_E2E_LOCAL_OUT`` when set).
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from apipool import defaults
from apipool.testing.polling import wait_for

from .cluster import LocalCluster
from .kube_chaos import KubeChaos, Load

pytestmark = [pytest.mark.e2e_local, pytest.mark.timeout(600)]

SLOTS = 4
POOL = "kube"
HANG_WINDOW = defaults.HANG_WINDOW  # the keeper's (spec.hangWindowSeconds, default)


def under_load(cluster: LocalCluster) -> tuple[Load, KubeChaos]:
    """Producers keeping the queue full, the pool at full width, the stand-in's
    counters zeroed: the measured window starts."""
    load = Load(cluster, POOL, depth=3 * SLOTS).start()
    chaos = KubeChaos(cluster, POOL, SLOTS)
    try:
        chaos.settle()
        cluster.api.reset()
        chaos.settle()
    except BaseException:
        load.stop()
        raise
    return load, chaos


def test_cap_holds_through_the_kubernetes_path() -> None:
    with LocalCluster(SLOTS) as cluster:
        cluster.create_pool(POOL, SLOTS)
        cluster.wait_pool_ready(POOL, SLOTS)
        load, chaos = under_load(cluster)
        try:
            # The worker dies or hangs: its keeper promotes the warm standby.
            chaos.signal_worker("kill_worker", 0, signal.SIGKILL, timeout=30)
            chaos.signal_worker("hang_worker", 1, signal.SIGSTOP, timeout=30)
            # The whole container dies (its first process, the keeper): the kubelet
            # restarts it; the same container again within 10 minutes: its back-off.
            chaos.signal_slot("kill_container", 0, signal.SIGKILL, timeout=30)
            chaos.signal_slot("kill_container_again", 0, signal.SIGKILL, timeout=60)
            chaos.delete_slot("graceful_delete", 2, grace=None, timeout=60)
            chaos.delete_slot("force_delete", 3, grace=0, timeout=60)
            chaos.scale(SLOTS - 1, timeout=60)
            chaos.scale(SLOTS, timeout=60)
            chaos.change_template(timeout=120)
        finally:
            load.stop()
        wait_for(lambda: load.unfinished(SLOTS) == 0, 60, interval=0.2, what="a drained pool")
        figures = chaos.figures(load, SLOTS)
    text = json.dumps(figures, indent=1, sort_keys=True)
    print(text)
    if out := os.environ.get("APIPOOL_E2E_LOCAL_OUT"):
        Path(out).write_text(text + "\n")

    # I1: never more connections than slots, counted at the stand-in.
    assert figures["max_concurrency"] <= SLOTS, text
    assert figures["over_limit_seconds"] == 0, text
    # I2: every job exactly one outcome.
    assert figures["lost"] == 0, text
    assert figures["duplicated"] == 0, text
    assert (
        figures["outcomes"]["ok"] + figures["outcomes"].get("dead", 0)
        == (figures["outcomes"]["submitted"])
    ), text
    recovery = figures["recovery_s"]
    for kind in (
        "kill_worker",
        "hang_worker",
        "kill_container",
        "graceful_delete",
        "force_delete",
        "scale_up",
    ):
        assert recovery[kind]["max"] is not None, f"{kind} never recovered: {text}"
    # A dead worker: the keeper's standby, no restart at all.
    assert recovery["kill_worker"]["max"] < 2, text
    # A hung worker: the keeper's hang window (1 s), not the liveness window + grace.
    assert recovery["hang_worker"]["max"] < HANG_WINDOW + 3, text
    # A dead container: the kubelet notices at its next relist and restarts at once ...
    assert recovery["kill_container"]["max"] < 10, text
    # ... and a second time within 10 minutes only after its 10 s back-off.
    assert 10 <= recovery["kill_container_again"]["max"] < 10 + 10, text


def _is_slot_0(pod: Mapping[str, Any]) -> bool:
    return str(pod["metadata"]["name"]).endswith("-slot-0")


STANDIN_IDLE = 10.0
"""The stand-in closes a connection idle this long (its keep-alive timeout)."""


@pytest.mark.parametrize(
    "api_idle",
    [pytest.param(0, id="no-quarantine"), pytest.param(int(STANDIN_IDLE), id="quarantine")],
)
def test_a_frozen_node_whose_pod_is_force_deleted(api_idle: int) -> None:
    """A machine pauses (kubelet and processes stop: a suspended VM); an admin
    force-deletes its slot pod; the replacement starts on another node; the
    machine resumes. The woken slot calls nothing (its lease is gone), so calls
    in flight never exceed the limit. But its TCP connection stayed open at the
    API until the API's idle timeout closed it: with ``apiIdleTimeoutSeconds``
    0 the replacement opens its own before that, and the stand-in counts one
    connection over the limit (and answers 429); with ``apiIdleTimeoutSeconds``
    set to the API's idle timeout the slot stays in quarantine until then, and
    the limit holds for connections too."""
    nodes = {"frozen": _is_slot_0, "spare": lambda pod: not _is_slot_0(pod)}
    with LocalCluster(SLOTS, nodes=nodes, idle_timeout=STANDIN_IDLE) as cluster:
        cluster.create_pool(POOL, SLOTS, apiIdleTimeoutSeconds=api_idle, callTimeoutSeconds=2)
        cluster.wait_pool_ready(POOL, SLOTS)
        frozen, spare = cluster.nodes["frozen"], cluster.nodes["spare"]
        victim = f"{POOL}-slot-0"
        old_pid = frozen.pid(victim)
        assert old_pid is not None
        load, chaos = under_load(cluster)
        try:
            spare.claim(None)  # the spare node now takes any pod
            at = chaos.now()
            frozen.freeze()
            cluster.delete_pod(victim, grace=0)
            held: list[dict[str, Any]] = []
            if api_idle:
                held = wait_for(
                    lambda: (cluster.pool(POOL) or {}).get("status", {}).get("quarantinedSlots"),
                    30,
                    what="the slot in quarantine",
                )
            replaced = chaos.wait_full(at + 0.2, 90.0, "the replacement calling") - at
            new_pid = spare.pid(victim)
            time.sleep(2.0)
            woke = chaos.now()
            frozen.thaw()
            wait_for(lambda: not _alive(old_pid), 30, what="the woken slot killed")
            gone = chaos.now() - woke
            chaos.settle()
        finally:
            load.stop()
        wait_for(lambda: load.unfinished(SLOTS) == 0, 60, interval=0.2, what="a drained pool")
        figures = chaos.figures(load, SLOTS)
        figures["frozen_node"] = {
            "api_idle_timeout_s": api_idle,
            "standin_idle_timeout_s": STANDIN_IDLE,
            "replacement_calling_s": round(replaced, 3),
            "quarantined": held,
            "events": sorted({e["reason"] for e in cluster.events() if e.get("reason")}),
            "old_pid": old_pid,
            "new_pid": new_pid,
            "woken_until_killed_s": round(gone, 3),
        }
    text = json.dumps(figures, indent=1, sort_keys=True)
    print(text)
    if out := os.environ.get("APIPOOL_E2E_LOCAL_OUT"):
        Path(out).with_suffix(f".frozen-{api_idle}.json").write_text(text + "\n")
    # The woken slot calls nothing: calls at once never exceed the limit.
    assert figures["max_in_flight"] <= SLOTS, text
    assert figures["lost"] == 0, text
    assert figures["duplicated"] == 0, text
    if api_idle:
        # Quarantined until the API closed the frozen connection: the cap holds.
        assert [q["slot"] for q in figures["frozen_node"]["quarantined"]] == [0], text
        assert "SlotQuarantined" in figures["frozen_node"]["events"], text
        # Not before the lease TTL (6.5 s with callTimeoutSeconds 2) + the idle timeout.
        assert figures["frozen_node"]["replacement_calling_s"] > api_idle + 6, text
        assert figures["max_concurrency"] <= SLOTS, text
        assert figures["over_limit_seconds"] == 0, text
    else:
        # What the quarantine prevents: the frozen connection and the new one.
        assert figures["max_concurrency"] == SLOTS + 1, text
        assert figures["over_limit_seconds"] > 0, text


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
