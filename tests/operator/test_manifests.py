"""Spec parsing and slot pod manifests, on plain dicts."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from apipool import defaults
from apipool.cli import build_parser, slot_settings
from apipool.operator.manifests import (
    HEALTH_PORT,
    LABEL_HASH,
    OWNER,
    grace_period,
    pod_name,
    selector,
    slot_index,
    slot_pod,
    template_hash,
)
from apipool.operator.spec import InvalidSpec, PoolSpec, parse_spec
from apipool.settings import HttpPolicy, Limits, SlotSettings, Timings

pytestmark = pytest.mark.unit

SPEC: dict[str, Any] = {
    "slots": 3,
    "image": "ghcr.io/example/apipool:0.1.0",
    "handler": "http",
    "redis": {"secretRef": {"name": "redis", "key": "url"}},
    "callTimeoutSeconds": 10,
}


def spec(**changes: Any) -> PoolSpec:
    return parse_spec("billing", {**SPEC, **changes})


def test_pod_has_stable_name_labels_and_probes() -> None:
    pod = slot_pod(spec(), "billing", "ns", 2)
    assert pod["metadata"]["name"] == "billing-slot-2"
    labels = pod["metadata"]["labels"]
    assert labels.items() >= selector("billing").items()
    assert labels["apipool.dev/slot"] == "2"
    container = pod["spec"]["containers"][0]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "health"}
    args = container["args"]
    assert args[:5] == ["slot", "--pool", "billing", "--slot", "2"]
    assert args[args.index("--handler") + 1] == "http"
    env = {e["name"]: e for e in container["env"]}
    assert env["APIPOOL_REDIS_URL"]["valueFrom"]["secretKeyRef"] == {"name": "redis", "key": "url"}
    assert env["APIPOOL_OWNER"]["value"] == "k8s-pod-$(APIPOOL_POD_UID)"


def test_the_slot_command_line_is_slot_settings_to_argv() -> None:
    s = spec(
        callTimeoutSeconds=2.5,
        heartbeatIntervalSeconds=0.5,
        maxAttempts=5,
        resultTtlSeconds=600,
        extraHandlers=["refund=billing.calls:refund"],
        maxEnvelopeBytes=4096,
        maxResultBytes=2048,
        maxResponseBytes=65536,
        maxDeadLetters=0,
        http={
            "allowUrls": ["https://api.example.com/", "http://billing.team-a.svc:8080/"],
            "followRedirects": True,
            "redactHeaders": ["X-Billing-Token", "X-Other"],
        },
        allowRedisEviction=True,
    )
    expected = SlotSettings(
        pool="billing",
        slot=1,
        handlers=("http", "refund=billing.calls:refund"),
        timings=Timings(call_timeout=2.5, heartbeat_interval=0.5),
        max_attempts=5,
        result_ttl=600,
        limits=Limits(
            max_envelope_bytes=4096,
            max_result_bytes=2048,
            max_response_bytes=65536,
            max_dead_letters=0,
        ),
        http=HttpPolicy(
            allow_urls=("https://api.example.com/", "http://billing.team-a.svc:8080/"),
            follow_redirects=True,
            redact_headers=("X-Billing-Token", "X-Other"),
        ),
        allow_eviction=True,
        owner=OWNER,
        health_host="::",
        health_port=defaults.HEALTH_PORT,
    )
    (container,) = slot_pod(s, "billing", "ns", 1)["spec"]["containers"]
    assert container["args"] == expected.to_argv()
    assert container["ports"][0]["containerPort"] == HEALTH_PORT == defaults.HEALTH_PORT
    # `apipool slot` reads these arguments back into the same settings; the Redis
    # URL is never among them (it comes from the Secret, through the environment).
    assert not any("redis" in arg for arg in container["args"])
    parsed = slot_settings(
        build_parser().parse_args([*container["args"], "--redis-url", "redis://r:6379/0"])
    )
    assert parsed == dataclasses.replace(expected, redis_url="redis://r:6379/0", owner=parsed.owner)


def test_a_spec_without_limits_runs_the_slot_with_apipools_defaults() -> None:
    (container,) = slot_pod(spec(), "billing", "ns", 0)["spec"]["containers"]
    args = container["args"]
    assert args[args.index("--max-envelope-bytes") + 1] == str(defaults.MAX_ENVELOPE_BYTES)
    assert args[args.index("--max-result-bytes") + 1] == str(defaults.MAX_RESULT_BYTES)
    assert args[args.index("--max-response-bytes") + 1] == str(defaults.MAX_RESPONSE_BYTES)
    assert args[args.index("--max-dead-letters") + 1] == str(defaults.MAX_DEAD_LETTERS)
    for flag in ("--allow-url", "--redact-header", "--follow-redirects", "--allow-eviction"):
        assert flag not in args


def test_pod_is_hardened() -> None:
    pod = slot_pod(spec(), "billing", "ns", 0)
    sc = pod["spec"]["containers"][0]["securityContext"]
    assert sc["runAsNonRoot"] is True
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert pod["spec"]["automountServiceAccountToken"] is False


def test_grace_period_outlasts_the_call_timeout() -> None:
    for timeout in (1, 10, 60):
        s = spec(callTimeoutSeconds=timeout)
        assert slot_pod(s, "billing", "ns", 0)["spec"]["terminationGracePeriodSeconds"] > timeout
        assert grace_period(s) > timeout


def test_template_hash_changes_with_the_template_not_with_the_index() -> None:
    a = slot_pod(spec(), "billing", "ns", 0)["metadata"]["labels"][LABEL_HASH]
    b = slot_pod(spec(), "billing", "ns", 5)["metadata"]["labels"][LABEL_HASH]
    assert a == b == template_hash(spec(), "billing")
    assert template_hash(spec(image="other:1"), "billing") != a
    assert template_hash(spec(callTimeoutSeconds=5), "billing") != a
    assert template_hash(spec(slots=7), "billing") == a  # scaling replaces nothing
    # Every setting a slot reads from its command line replaces the pods when it changes.
    for changes in (
        {"maxEnvelopeBytes": 4096},
        {"maxResultBytes": 4096},
        {"maxResponseBytes": 4096},
        {"maxDeadLetters": 5},
        {"http": {"allowUrls": ["http://billing.svc/"]}},
        {"http": {"followRedirects": True}},
        {"http": {"redactHeaders": ["X-Token"]}},
        {"allowRedisEviction": True},
    ):
        assert template_hash(spec(**changes), "billing") != a, changes
    # Spelling out a default is no change.
    same = spec(maxDeadLetters=defaults.MAX_DEAD_LETTERS, http={}, allowRedisEviction=False)
    assert template_hash(same, "billing") == a


def test_template_overrides_reach_the_pod() -> None:
    template = {
        "resources": {"limits": {"cpu": "500m"}},
        "env": [{"name": "X", "value": "1"}],
        "nodeSelector": {"pool": "api"},
        "tolerations": [{"key": "k", "operator": "Exists"}],
        "serviceAccountName": "slots",
        "priorityClassName": "high",
        "labels": {"team": "billing"},
    }
    pod = slot_pod(spec(template=template), "billing", "ns", 0)
    container = pod["spec"]["containers"][0]
    assert container["resources"] == {"limits": {"cpu": "500m"}}
    assert {"name": "X", "value": "1"} in container["env"]
    for key in ("nodeSelector", "tolerations", "serviceAccountName", "priorityClassName"):
        assert pod["spec"][key] == template[key]
    assert pod["metadata"]["labels"]["team"] == "billing"


def test_slot_index_reads_only_this_pools_names() -> None:
    assert slot_index("billing", pod_name("billing", 12)) == 12
    assert slot_index("billing", "billing-slot-x") is None
    assert slot_index("billing", "billing-slot-01") is None
    assert slot_index("billing", "billing-other-slot-1") is None
    assert slot_index("billing", "billing-slot-\u00b2") is None  # isdigit(), yet no int()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"slots": None}, "spec.slots is required"),
        ({"slots": -1}, "between 0 and 1000"),
        ({"slots": True}, "must be an integer"),
        ({"image": ""}, "spec.image is required"),
        ({"handler": "not a handler"}, "is not a handler"),
        ({"handler": "mod.fn"}, "is not a handler"),
        ({"redis": {}}, "secretRef.name is required"),
        ({"callTimeoutSeconds": 0}, "callTimeoutSeconds must be > 0"),
        ({"maxAttempts": 0}, "maxAttempts must be >= 1"),
        ({"maxUnavailable": 0}, "maxUnavailable must be >= 1"),
        ({"template": {"hostNetwork": True}}, "does not support: hostNetwork"),
        ({"colour": "red"}, "unknown field(s) in spec: colour"),
        ({"maxEnvelopeBytes": 255}, "maxEnvelopeBytes must be >= 256"),
        ({"http": {"allowUrls": ["https://api.example.com/\n"]}}, "must be a URL prefix"),
        ({"http": {"allowUrls": [None]}}, "allowUrls.0. None must be a URL prefix"),
        ({"allowRedisEviction": "false"}, "allowRedisEviction must be true or false"),
    ],
)
def test_invalid_specs_say_why(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidSpec, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_spec("billing", {k: v for k, v in {**SPEC, **changes}.items() if v is not None})


def test_pool_name_must_leave_room_for_pod_names() -> None:
    with pytest.raises(InvalidSpec, match="DNS label"):
        parse_spec("x" * 51, SPEC)
    with pytest.raises(InvalidSpec, match="DNS label"):
        parse_spec("Billing", SPEC)


def test_template_env_may_not_set_the_operators_variables() -> None:
    # A fixed APIPOOL_OWNER would let a new pod take a slot's lease from a live one.
    for name in ("APIPOOL_OWNER", "APIPOOL_REDIS_URL", "APIPOOL_POD_UID"):
        with pytest.raises(InvalidSpec, match=f"may not set {name}"):
            spec(template={"env": [{"name": name, "value": "x"}]})


def test_handler_names_must_be_unique() -> None:
    with pytest.raises(InvalidSpec, match="given twice: http"):
        spec(handler="http", extraHandlers=["http"])
    with pytest.raises(InvalidSpec, match="given twice: a"):
        spec(handler="a=m:f", extraHandlers=["a=m:g"])


@pytest.mark.parametrize("handler", ["http\n", "môd:fn", "m:f ", " http"])
def test_handlers_are_matched_whole_and_ascii(handler: str) -> None:
    with pytest.raises(InvalidSpec, match="is not a handler"):
        spec(handler=handler)


@pytest.mark.parametrize(
    ("liveness", "message"),
    [
        ({"periodSeconds": "2"}, "periodSeconds must be an integer >= 1"),
        ({"failureThreshold": True}, "failureThreshold must be an integer >= 1"),
        ({"timeoutSeconds": 1.5}, "timeoutSeconds must be an integer >= 1"),
    ],
)
def test_liveness_values_are_checked(liveness: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidSpec, match=message):
        spec(liveness=liveness)


def test_good_handlers() -> None:
    for handler in ("http", "billing.api:charge", "charge=billing.api:charge", "a.b.c:d.e"):
        assert spec(handler=handler).handler == handler


def test_slot_pods_run_a_keeper_with_a_standby_unless_switched_off() -> None:
    def args(**changes: Any) -> list[str]:
        return list(slot_pod(spec(**changes), "billing", "ns", 0)["spec"]["containers"][0]["args"])

    default = args()
    assert default[default.index("--standby") + 1] == "true"
    assert default[default.index("--hang-window") + 1] == "0.5"
    off = args(standby=False, hangWindowSeconds=2.5)
    assert off[off.index("--standby") + 1] == "false"
    assert off[off.index("--hang-window") + 1] == "2.5"
    with pytest.raises(InvalidSpec, match="hangWindowSeconds"):
        spec(hangWindowSeconds=0.1)
