"""The local node's kubelet rules as pure code: environment and command line,
crash-loop back-off, probe specs and verdicts, pod status and phase, exit codes."""

from __future__ import annotations

import base64
from collections.abc import Mapping
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from apipool.testing.node.backoff import Backoff, BackoffPolicy
from apipool.testing.node.container import exit_code
from apipool.testing.node.environment import (
    ConfigProblem,
    command_line,
    expand,
    field_value,
    resolve_env,
)
from apipool.testing.node.probing import ProbeSpec, ProbeTracker, port_number
from apipool.testing.node.status import ContainerView, pod_phase, pod_status

pytestmark = pytest.mark.unit

# -- expand -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("$(A)", "a"),
        ("x$(A)y$(B)z", "xaybz"),
        ("$$(A)", "$(A)"),
        ("$$$(A)", "$a"),
        ("$$$$", "$$"),
        ("$(UNKNOWN)", "$(UNKNOWN)"),
        ("$(A)$(UNKNOWN)", "a$(UNKNOWN)"),
        ("$(A", "$(A"),
        ("pre $(A $(B)", "pre $(A $(B)"),
        ("$", "$"),
        ("a$", "a$"),
        ("$A", "$A"),
        ("$()", "$()"),
        ("cost: 5$", "cost: 5$"),
    ],
)
def test_expand(text: str, expected: str) -> None:
    assert expand(text, {"A": "a", "B": "b"}) == expected


def test_expand_does_not_expand_what_it_substituted() -> None:
    assert expand("$(A)", {"A": "$(B)", "B": "b"}) == "$(B)"


_names = st.text(alphabet="ABCXYZ_abc019", min_size=0, max_size=4)
_values = st.dictionaries(_names, st.text(max_size=8), max_size=4)


@given(st.text(), _values)
def test_expand_never_raises_on_arbitrary_text(text: str, values: dict[str, str]) -> None:
    assert isinstance(expand(text, values), str)


@given(st.text().filter(lambda t: "$" not in t), _values)
def test_expand_is_the_identity_on_text_without_a_dollar(text: str, values: dict[str, str]) -> None:
    assert expand(text, values) == text


@given(st.text(alphabet=st.sampled_from("$()AB x")), _values)
def test_doubling_every_dollar_escapes_the_text(text: str, values: dict[str, str]) -> None:
    assert expand(text.replace("$", "$$"), values) == text


@given(st.text(alphabet=st.sampled_from("$()ABC x"), max_size=30).filter(lambda t: "$$" not in t))
def test_with_nothing_defined_and_no_escape_expand_keeps_the_text(text: str) -> None:
    assert expand(text, {}) == text


@given(st.lists(st.sampled_from(["A", "B", "x", " ", "(", ")", "$$"]), max_size=12))
def test_a_defined_reference_becomes_its_value(parts: list[str]) -> None:
    # Pieces without a lone "$", joined by references to defined names.
    text = "$(A)".join(parts)
    expected = "a".join(p.replace("$$", "$") for p in parts)
    assert expand(text, {"A": "a"}) == expected


# -- resolve_env ----------------------------------------------------------------------

POD: dict[str, Any] = {
    "metadata": {
        "name": "p-1",
        "namespace": "ns",
        "uid": "uid-1",
        "labels": {"app": "web", "tier": "back"},
        "annotations": {"note": "hi"},
    },
    "spec": {"nodeName": "node-a", "serviceAccountName": "sa"},
    "status": {"podIP": "10.0.0.5", "hostIP": "10.0.0.1"},
}


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def lookup_of(objects: Mapping[tuple[str, str], Mapping[str, Any]]) -> Any:
    return lambda kind, name: objects.get((kind, name))


NO_OBJECTS = lookup_of({})


def env_of(*items: dict[str, Any], objects: Any = NO_OBJECTS) -> dict[str, str]:
    return resolve_env(POD, {"name": "c", "env": list(items)}, objects)


def secret_ref(name: str, key: str, **more: Any) -> dict[str, Any]:
    return {"secretKeyRef": {"name": name, "key": key, **more}}


def test_values_expand_earlier_variables_only() -> None:
    env = env_of(
        {"name": "A", "value": "a"},
        {"name": "B", "value": "$(A)-$(C)-$$(A)"},
        {"name": "C", "value": "c"},
        {"name": "EMPTY"},
    )
    assert env == {"A": "a", "B": "a-$(C)-$(A)", "C": "c", "EMPTY": ""}


def test_a_later_definition_wins_and_sees_the_earlier_one() -> None:
    env = env_of({"name": "A", "value": "1"}, {"name": "A", "value": "$(A)2"})
    assert env == {"A": "12"}


def test_secret_key_ref_is_base64_decoded() -> None:
    objects = lookup_of({("secrets", "s"): {"data": {"k": b64("pa$$ wörd")}}})
    env = env_of({"name": "S", "valueFrom": secret_ref("s", "k")}, objects=objects)
    assert env == {"S": "pa$$ wörd"}  # not expanded: only value strings are


def test_secret_string_data_is_not_read() -> None:
    objects = lookup_of({("secrets", "s"): {"stringData": {"k": "plain"}}})
    with pytest.raises(ConfigProblem, match="couldn't find key k in Secret s"):
        env_of({"name": "S", "valueFrom": secret_ref("s", "k")}, objects=objects)


@pytest.mark.parametrize(
    ("objects", "message"),
    [
        ({}, 'secret "s" not found'),
        ({("secrets", "s"): {"data": {"other": b64("x")}}}, "couldn't find key k in Secret s"),
        ({("secrets", "s"): {}}, "couldn't find key k in Secret s"),
        ({("secrets", "s"): {"data": {"k": "not base64!"}}}, "not valid"),
    ],
)
def test_a_missing_or_broken_secret_is_a_config_problem(
    objects: dict[tuple[str, str], Any], message: str
) -> None:
    with pytest.raises(ConfigProblem, match=message):
        env_of({"name": "S", "valueFrom": secret_ref("s", "k")}, objects=lookup_of(objects))


@pytest.mark.parametrize(
    "objects", [{}, {("secrets", "s"): {"data": {"other": b64("x")}}}], ids=["object", "key"]
)
def test_an_optional_secret_ref_that_is_missing_leaves_the_variable_unset(
    objects: dict[tuple[str, str], Any],
) -> None:
    env = env_of(
        {"name": "S", "valueFrom": secret_ref("s", "k", optional=True)},
        {"name": "T", "value": "[$(S)]"},
        objects=lookup_of(objects),
    )
    assert env == {"T": "[$(S)]"}


def test_config_map_key_ref() -> None:
    objects = lookup_of({("configmaps", "cm"): {"data": {"k": "v"}}})
    ref = {"configMapKeyRef": {"name": "cm", "key": "k"}}
    assert env_of({"name": "V", "valueFrom": ref}, objects=objects) == {"V": "v"}
    missing_key = {"configMapKeyRef": {"name": "cm", "key": "nope"}}
    with pytest.raises(ConfigProblem, match="couldn't find key nope in ConfigMap cm"):
        env_of({"name": "V", "valueFrom": missing_key}, objects=objects)
    with pytest.raises(ConfigProblem, match='configmap "other" not found'):
        env_of({"name": "V", "valueFrom": {"configMapKeyRef": {"name": "other", "key": "k"}}})
    optional = {"configMapKeyRef": {"name": "other", "key": "k", "optional": True}}
    assert env_of({"name": "V", "valueFrom": optional}) == {}


def test_the_secret_kind_is_not_confused_with_a_config_map() -> None:
    objects = lookup_of({("configmaps", "x"): {"data": {"k": "v"}}})
    with pytest.raises(ConfigProblem, match='secret "x" not found'):
        env_of({"name": "S", "valueFrom": secret_ref("x", "k")}, objects=objects)


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("metadata.name", "p-1"),
        ("metadata.namespace", "ns"),
        ("metadata.uid", "uid-1"),
        ("metadata.labels['app']", "web"),
        ("metadata.labels['tier']", "back"),
        ("metadata.labels['missing']", ""),
        ("metadata.annotations['note']", "hi"),
        ("spec.nodeName", "node-a"),
        ("spec.serviceAccountName", "sa"),
        ("status.podIP", "10.0.0.5"),
        ("status.hostIP", "10.0.0.1"),
    ],
)
def test_field_ref(path: str, expected: str) -> None:
    item = {"name": "F", "valueFrom": {"fieldRef": {"fieldPath": path}}}
    assert env_of(item) == {"F": expected}
    assert field_value(POD, path) == expected


@pytest.mark.parametrize("path", ["metadata.labels", "spec.containers", "status.phase", ""])
def test_an_unsupported_field_ref_is_a_config_problem(path: str) -> None:
    with pytest.raises(ConfigProblem, match="unsupported fieldRef"):
        env_of({"name": "F", "valueFrom": {"fieldRef": {"fieldPath": path}}})


def test_an_unknown_value_from_is_a_config_problem() -> None:
    with pytest.raises(ConfigProblem, match="unsupported valueFrom"):
        env_of({"name": "F", "valueFrom": {"resourceFieldRef": {"resource": "limits.cpu"}}})


# -- command_line ---------------------------------------------------------------------


def test_command_and_args_expand_against_the_environment() -> None:
    env = {"A": "a", "B": "b c"}
    container = {"command": ["run", "$(A)"], "args": ["--x=$(B)", "$$(A)", "$(NOPE)", "$("]}
    assert command_line(container, ["entry"], env) == [
        "run",
        "a",
        "--x=b c",
        "$(A)",
        "$(NOPE)",
        "$(",
    ]


def test_without_a_command_the_entrypoint_runs_with_the_args() -> None:
    container = {"args": ["slot", "--id=$(A)"]}
    assert command_line(container, ["python", "-m", "apipool"], {"A": "7"}) == [
        "python",
        "-m",
        "apipool",
        "slot",
        "--id=7",
    ]
    assert command_line({}, ["entry"], {}) == ["entry"]


def test_the_entrypoint_is_not_expanded() -> None:
    assert command_line({}, ["$(A)"], {"A": "a"}) == ["$(A)"]


# -- back-off -------------------------------------------------------------------------


def test_the_classic_crash_loop_curve() -> None:
    backoff = Backoff()
    delays = [backoff.next_delay(ran_for=1.0) for _ in range(8)]
    assert delays == [0, 10, 20, 40, 80, 160, 300, 300]


def test_the_curve_starts_again_after_ten_minutes_of_running() -> None:
    backoff = Backoff()
    for _ in range(5):
        backoff.next_delay(ran_for=5.0)
    assert backoff.next_delay(ran_for=599.0) == 160
    assert backoff.next_delay(ran_for=600.0) == 0
    assert backoff.next_delay(ran_for=1.0) == 10


def test_a_tuned_curve() -> None:
    backoff = Backoff(BackoffPolicy(initial=0.5, cap=2.0, reset_after=30.0))
    assert [backoff.next_delay(0.1) for _ in range(6)] == [0, 0.5, 1.0, 2.0, 2.0, 2.0]
    assert backoff.next_delay(30.0) == 0


# -- probes ---------------------------------------------------------------------------

GET = {"httpGet": {"path": "/healthz", "port": 8080}}


def test_probe_defaults() -> None:
    spec = ProbeSpec.from_api("liveness", GET)
    assert (spec.initial_delay, spec.period, spec.timeout) == (0.0, 10.0, 1.0)
    assert (spec.success_threshold, spec.failure_threshold, spec.kill_grace) == (1, 3, None)
    assert spec.action == GET


def test_probe_minimums() -> None:
    spec = ProbeSpec.from_api(
        "readiness",
        {
            **GET,
            "periodSeconds": 0,
            "timeoutSeconds": 0,
            "failureThreshold": 0,
            "successThreshold": 0,
            "initialDelaySeconds": -5,
        },
    )
    assert (spec.period, spec.timeout, spec.failure_threshold) == (1.0, 1.0, 1)
    assert (spec.success_threshold, spec.initial_delay) == (1, 0.0)


@pytest.mark.parametrize(("kind", "expected"), [("liveness", 1), ("startup", 1), ("readiness", 3)])
def test_success_threshold_is_one_for_liveness_and_startup(kind: str, expected: int) -> None:
    assert ProbeSpec.from_api(kind, {**GET, "successThreshold": 3}).success_threshold == expected


@pytest.mark.parametrize(
    ("kind", "expected"), [("liveness", 5.0), ("startup", 5.0), ("readiness", None)]
)
def test_the_probe_level_grace_is_for_kills_only(kind: str, expected: float | None) -> None:
    spec = ProbeSpec.from_api(kind, {**GET, "terminationGracePeriodSeconds": 5})
    assert spec.kill_grace == expected


@pytest.mark.parametrize(
    "probe",
    [{}, {**GET, "tcpSocket": {"port": 1}}, {"periodSeconds": 1}],
    ids=["none", "two", "no-action"],
)
def test_a_probe_needs_exactly_one_action(probe: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="exactly one action"):
        ProbeSpec.from_api("liveness", probe)


def tracker(**fields: Any) -> ProbeTracker:
    return ProbeTracker(ProbeSpec.from_api("readiness", {**GET, **fields}))


def test_failures_in_a_row_make_the_verdict() -> None:
    t = tracker(failureThreshold=3)
    assert [t.record(False), t.record(False)] == [None, None]
    assert t.passing is None
    assert t.record(False) is False
    assert t.record(False) is None  # no change, no verdict
    assert t.passing is False


def test_a_success_breaks_a_run_of_failures() -> None:
    t = tracker(failureThreshold=2)
    assert t.record(True) is True
    assert [t.record(False), t.record(True), t.record(False)] == [None, None, None]
    assert t.passing is True
    assert t.record(False) is False


def test_successes_in_a_row_make_it_pass_again() -> None:
    t = tracker(failureThreshold=1, successThreshold=2)
    assert t.record(False) is False
    assert [t.record(True), t.record(False), t.record(True)] == [None, None, None]
    assert t.record(True) is True


@given(st.lists(st.booleans(), max_size=40), st.integers(1, 4), st.integers(1, 4))
def test_the_verdict_follows_the_last_run_of_results(
    results: list[bool], failures: int, successes: int
) -> None:
    t = tracker(failureThreshold=failures, successThreshold=successes)
    verdict: bool | None = None
    for ok in results:
        changed = t.record(ok)
        if changed is not None:
            assert changed != verdict
            verdict = changed
    assert t.passing == verdict
    if len(results) >= failures and not any(results[-failures:]):
        assert t.passing is False
    if len(results) >= successes and all(results[-successes:]):
        assert t.passing is True


def test_port_number() -> None:
    ports = [{"name": "http", "containerPort": 8080}]
    assert port_number(9000, ports) == 9000
    assert port_number("9000", ports) == 9000
    assert port_number("http", ports) == 8080
    with pytest.raises(ValueError, match="no port named"):
        port_number("metrics", ports)


# -- status and phase -----------------------------------------------------------------


def view(state: str, *, code: int = 0, restarts: int = 0, ready: bool = False) -> ContainerView:
    states: dict[str, dict[str, Any]] = {
        "waiting": {"waiting": {"reason": "ContainerCreating"}},
        "running": {"running": {"startedAt": "2026-01-01T00:00:00Z"}},
        "terminated": {
            "terminated": {"exitCode": code, "reason": "Error" if code else "Completed"}
        },
    }
    return ContainerView(
        name="c", image="i", state=states[state], restart_count=restarts, ready=ready
    )


@pytest.mark.parametrize(
    ("views", "policy", "ended", "phase"),
    [
        ([view("waiting")], "Always", False, "Pending"),
        ([view("running")], "Always", False, "Running"),
        ([view("running"), view("waiting")], "Always", False, "Running"),
        ([view("waiting", restarts=2)], "Always", False, "Running"),  # back-off
        ([view("terminated", code=1)], "Always", False, "Running"),  # restart due
        ([view("terminated", code=0)], "Never", False, "Succeeded"),
        ([view("terminated", code=2)], "Never", False, "Failed"),
        ([view("terminated", code=0), view("running")], "Never", False, "Running"),
        ([view("terminated", code=0), view("terminated", code=1)], "Never", False, "Failed"),
        ([view("terminated", code=0)], "OnFailure", False, "Succeeded"),
        ([view("terminated", code=1)], "OnFailure", False, "Running"),  # restart due
        ([view("terminated", code=0)], "Always", True, "Succeeded"),
        ([view("terminated", code=137)], "Always", True, "Failed"),
        ([view("terminated", code=1)], "OnFailure", True, "Failed"),
    ],
)
def test_pod_phase(views: list[ContainerView], policy: str, ended: bool, phase: str) -> None:
    assert pod_phase(views, policy, ended) == phase


def status_of(views: list[ContainerView], previous: Mapping[str, Any], now: str) -> dict[str, Any]:
    return pod_status(
        views,
        restart_policy="Always",
        ended=False,
        pod_ip="10.1.0.2",
        host_ip="10.1.0.1",
        start_time="T0",
        previous=previous,
        now=now,
    )


def conditions(status: Mapping[str, Any]) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["lastTransitionTime"]) for c in status["conditions"]}


def test_pod_status_shape() -> None:
    status = status_of([view("running", ready=True)], {}, "T1")
    assert status["phase"] == "Running"
    assert [c["type"] for c in status["conditions"]] == [
        "PodScheduled",
        "Initialized",
        "ContainersReady",
        "Ready",
    ]
    assert (status["podIP"], status["podIPs"]) == ("10.1.0.2", [{"ip": "10.1.0.2"}])
    assert (status["hostIP"], status["hostIPs"]) == ("10.1.0.1", [{"ip": "10.1.0.1"}])
    assert status["startTime"] == "T0"
    [cs] = status["containerStatuses"]
    assert cs == {
        "name": "c",
        "image": "i",
        "imageID": "local-node://i",
        "ready": True,
        "started": False,
        "restartCount": 0,
        "state": {"running": {"startedAt": "2026-01-01T00:00:00Z"}},
        "lastState": {},
    }
    cid = ContainerView(name="c", image="i", container_id="local-node://x")
    assert cid.as_api()["containerID"] == "local-node://x"


def test_ready_needs_every_container_ready_and_a_live_pod() -> None:
    both = status_of([view("running", ready=True), view("running", ready=False)], {}, "T1")
    assert conditions(both)["Ready"][0] == "False"
    assert conditions(both)["ContainersReady"][0] == "False"
    assert conditions(status_of([], {}, "T1"))["Ready"][0] == "False"
    ended = pod_status(
        [view("running", ready=True)],
        restart_policy="Always",
        ended=True,
        pod_ip="",
        host_ip="",
        start_time="T0",
        previous={},
        now="T1",
    )
    assert conditions(ended)["Ready"][0] == "False"


def test_last_transition_time_is_kept_while_a_condition_keeps_its_value() -> None:
    first = status_of([view("running", ready=False)], {}, "T1")
    assert conditions(first)["Ready"] == ("False", "T1")
    same = status_of([view("running", ready=False)], first, "T2")
    assert conditions(same)["Ready"] == ("False", "T1")
    assert conditions(same)["PodScheduled"] == ("True", "T1")
    flipped = status_of([view("running", ready=True)], same, "T3")
    assert conditions(flipped)["Ready"] == ("True", "T3")
    assert conditions(flipped)["ContainersReady"] == ("True", "T3")
    assert conditions(flipped)["Initialized"] == ("True", "T1")
    back = status_of([view("running", ready=False)], flipped, "T4")
    assert conditions(back)["Ready"] == ("False", "T4")


# -- exit codes -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("returncode", "code"), [(0, 0), (1, 1), (3, 3), (255, 255), (-9, 137), (-15, 143), (-6, 134)]
)
def test_exit_code(returncode: int, code: int) -> None:
    assert exit_code(returncode) == code
