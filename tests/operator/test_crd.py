"""The CRD, the RBAC and the operator Deployment, checked against parse_spec and
each other: plain YAML files, read without a cluster."""

from __future__ import annotations

import copy
import dataclasses
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from apipool import defaults
from apipool.ledger import LOSSES
from apipool.operator.spec import (
    DEFAULT_SECRET_KEY,
    GROUP,
    HANDLER,
    KIND,
    MAX_API_IDLE_TIMEOUT,
    MAX_LIMIT_BYTES,
    MAX_LIST_ITEMS,
    MAX_SLOTS,
    MIN_LIMIT_BYTES,
    PLURAL,
    TEMPLATE_KEYS,
    VERSION,
    InvalidSpec,
    Liveness,
    PoolSpec,
    parse_spec,
)
from apipool.settings import HttpPolicy

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
CRD_PATH = ROOT / "crds" / "apiconcurrencypool.yaml"
RBAC_PATH = ROOT / "deploy" / "rbac.yaml"
OPERATOR_PATH = ROOT / "deploy" / "operator.yaml"

SA_NAME = "apipool-operator"
SA_NAMESPACE = "apipool-system"

# The spec fields parse_spec accepts. spec.py keeps them in a private literal;
# test_spec_fields_match_parse_spec checks this list against parse_spec itself
# (every one accepted) and against PoolSpec (nothing parsed that is not listed).
SPEC_FIELDS = frozenset(
    {
        "slots",
        "image",
        "handler",
        "extraHandlers",
        "redis",
        "callTimeoutSeconds",
        "heartbeatIntervalSeconds",
        "maxAttempts",
        "resultTtlSeconds",
        "maxQueueLength",
        "liveness",
        "maxUnavailable",
        "apiIdleTimeoutSeconds",
        "standby",
        "hangWindowSeconds",
        "adaptive",
        "maxPauseSeconds",
        "template",
        "maxEnvelopeBytes",
        "maxResultBytes",
        "maxResponseBytes",
        "maxDeadLetters",
        "http",
        "allowRedisEviction",
    }
)
SIZE_LIMITS = ("maxEnvelopeBytes", "maxResultBytes", "maxResponseBytes")
# PoolSpec attributes that do not map one to one onto a camelCase spec field.
POOLSPEC_TO_FIELD = {"redis_secret": "redis", "redis_secret_key": "redis"}

MINIMAL: dict[str, Any] = {
    "slots": 3,
    "image": "ghcr.io/example/apipool:0.1.0",
    "redis": {"secretRef": {"name": "redis"}},
}
FULL: dict[str, Any] = {
    "slots": 4,
    "image": "ghcr.io/example/apipool:0.1.0",
    "handler": "fast=billing.calls:charge",
    "extraHandlers": ["http", "refund=billing.calls:Refunds.run"],
    "redis": {"secretRef": {"name": "redis-url", "key": "REDIS_URL"}},
    "callTimeoutSeconds": 2.5,
    "heartbeatIntervalSeconds": 0.5,
    "maxAttempts": 5,
    "resultTtlSeconds": 600,
    "maxQueueLength": 1000,
    "liveness": {"periodSeconds": 2, "failureThreshold": 2, "timeoutSeconds": 1},
    "maxUnavailable": 2,
    "apiIdleTimeoutSeconds": 30,
    "standby": False,
    "hangWindowSeconds": 0.5,
    "adaptive": False,
    "maxPauseSeconds": 60,
    "maxEnvelopeBytes": 65536,
    "maxResultBytes": 32768,
    "maxResponseBytes": 1 << 20,
    "maxDeadLetters": 500,
    "http": {
        "allowUrls": ["https://api.example.com/v2/", "http://billing.team-a.svc:8080/"],
        "followRedirects": True,
        "redactHeaders": ["X-Billing-Token"],
    },
    "allowRedisEviction": True,
    "template": {
        "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}, "limits": {"memory": 1}},
        "env": [
            {"name": "API_BASE", "value": "https://api.example.com"},
            {"name": "API_KEY", "valueFrom": {"secretKeyRef": {"name": "api", "key": "key"}}},
        ],
        "nodeSelector": {"kubernetes.io/os": "linux"},
        "tolerations": [{"key": "spot", "operator": "Exists", "effect": "NoSchedule"}],
        "affinity": {"nodeAffinity": {}},
        "serviceAccountName": "billing-slots",
        "priorityClassName": "high",
        "imagePullPolicy": "IfNotPresent",
        "imagePullSecrets": [{"name": "registry"}],
        "labels": {"team": "billing"},
        "annotations": {"example.com/owner": "billing"},
    },
}


# -- loading ------------------------------------------------------------------


def load_all(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as f:
        return [doc for doc in yaml.safe_load_all(f) if doc]


@pytest.fixture(scope="module")
def crd() -> dict[str, Any]:
    (doc,) = load_all(CRD_PATH)
    return doc


@pytest.fixture(scope="module")
def version(crd: dict[str, Any]) -> dict[str, Any]:
    (entry,) = crd["spec"]["versions"]
    return entry


@pytest.fixture(scope="module")
def schema(version: dict[str, Any]) -> dict[str, Any]:
    return version["schema"]["openAPIV3Schema"]


@pytest.fixture(scope="module")
def spec_schema(schema: dict[str, Any]) -> dict[str, Any]:
    return schema["properties"]["spec"]


@pytest.fixture(scope="module")
def validator(schema: dict[str, Any]) -> jsonschema.Draft4Validator:
    json_schema = to_json_schema(schema)
    jsonschema.Draft4Validator.check_schema(json_schema)
    return jsonschema.Draft4Validator(json_schema)


def to_json_schema(node: Any) -> Any:
    """The CRD's structural schema as JSON Schema draft 4.

    Structural schemas are a subset of OpenAPI v3.0 schema objects, which share
    draft 4's keywords where we use them (``exclusiveMinimum`` is a boolean
    modifier of ``minimum`` in both). The ``x-kubernetes-*`` extensions steer
    pruning, list merging and int-or-string; they say nothing a validator must
    check here, so they are dropped. (jsonschema would ignore them anyway; they
    are dropped so that no one wonders.) What this cannot show: the API server
    *prunes* unknown fields where JSON Schema lets them through, and applies
    ``default`` (see apply_defaults)."""
    if isinstance(node, dict):
        return {k: to_json_schema(v) for k, v in node.items() if not k.startswith("x-kubernetes-")}
    if isinstance(node, list):
        return [to_json_schema(v) for v in node]
    return node


def apply_defaults(node: dict[str, Any], value: Any) -> Any:
    """Defaulting as the API server does it for a structural schema: a missing
    property with a ``default`` gets a copy of it, then every present value is
    defaulted in turn (so the members of a defaulted ``{}`` get theirs)."""
    value = copy.deepcopy(value)
    if isinstance(value, dict):
        for key, sub in node.get("properties", {}).items():
            if key not in value and "default" in sub:
                value[key] = copy.deepcopy(sub["default"])
            if key in value:
                value[key] = apply_defaults(sub, value[key])
        extra = node.get("additionalProperties")
        if isinstance(extra, dict):
            for key in set(value) - set(node.get("properties", {})):
                value[key] = apply_defaults(extra, value[key])
    elif isinstance(value, list) and "items" in node:
        value = [apply_defaults(node["items"], item) for item in value]
    return value


def walk(node: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every schema node with its path: ``.a.b`` for properties, ``[]`` for
    items, ``{}`` for additionalProperties, ``|n`` for the n-th anyOf branch."""
    yield path, node
    for key, sub in node.get("properties", {}).items():
        yield from walk(sub, f"{path}.{key}")
    if isinstance(node.get("items"), dict):
        yield from walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from walk(node["additionalProperties"], f"{path}{{}}")
    for i, sub in enumerate(node.get("anyOf", [])):
        yield from walk(sub, f"{path}|{i}")


def cr(spec: dict[str, Any], name: str = "billing") -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "metadata": {"name": name, "namespace": "default"},
        "spec": spec,
    }


DELETE = object()


def changed(base: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A copy of ``base`` with dotted ``path`` set to ``value`` (``DELETE``: removed)."""
    doc = copy.deepcopy(base)
    *parents, last = path.split(".")
    node = doc
    for key in parents:
        node = node.setdefault(key, {})
    if value is DELETE:
        node.pop(last, None)
    else:
        node[last] = value
    return doc


def is_valid(validator: jsonschema.Draft4Validator, doc: dict[str, Any]) -> bool:
    return not list(validator.iter_errors(doc))


def parses(name: str, spec: dict[str, Any]) -> bool:
    try:
        parse_spec(name, spec)
    except InvalidSpec:
        return False
    return True


def camel(snake: str) -> str:
    head, *rest = snake.split("_")
    return head + "".join(part.title() for part in rest)


# -- names and versions -------------------------------------------------------


def test_names_group_version_and_scope(crd: dict[str, Any], version: dict[str, Any]) -> None:
    assert crd["apiVersion"] == "apiextensions.k8s.io/v1"
    assert crd["kind"] == "CustomResourceDefinition"
    assert crd["metadata"]["name"] == f"{PLURAL}.{GROUP}"
    spec = crd["spec"]
    assert spec["group"] == GROUP == "apipool.dev"
    assert spec["scope"] == "Namespaced"
    assert spec["names"] == {
        "kind": KIND,
        "listKind": f"{KIND}List",
        "plural": PLURAL,
        "singular": "apiconcurrencypool",
        "shortNames": ["acp"],
        "categories": ["apipool"],
    }
    assert version["name"] == VERSION == "v1alpha1"
    assert version["served"] is True
    assert version["storage"] is True


# -- spec schema against parse_spec -------------------------------------------


def test_required_fields(schema: dict[str, Any], spec_schema: dict[str, Any]) -> None:
    assert schema["required"] == ["spec"]
    assert set(spec_schema["required"]) == {"slots", "image", "redis"}
    redis = spec_schema["properties"]["redis"]
    assert redis["required"] == ["secretRef"]
    assert redis["properties"]["secretRef"]["required"] == ["name"]
    # parse_spec insists on the same three.
    for field in ("slots", "image", "redis"):
        assert not parses("billing", changed(MINIMAL, field, DELETE)), field


def test_spec_fields_match_parse_spec(spec_schema: dict[str, Any]) -> None:
    props = spec_schema["properties"]
    assert set(props) == SPEC_FIELDS
    # parse_spec accepts every one of them: a spec naming them all plus one
    # unknown key is refused for that key alone.
    everything = {**FULL, "bogus": 1}
    assert set(everything) == SPEC_FIELDS | {"bogus"}
    with pytest.raises(InvalidSpec, match=r"unknown field\(s\) in spec: bogus$"):
        parse_spec("billing", everything)
    parse_spec("billing", FULL)
    # ...and it parses nothing that the schema does not have: every PoolSpec
    # attribute comes from a schema field.
    for f in dataclasses.fields(PoolSpec):
        assert POOLSPEC_TO_FIELD.get(f.name, camel(f.name)) in props, f.name
    assert set(props["liveness"]["properties"]) == {
        camel(f.name) for f in dataclasses.fields(Liveness)
    }
    assert set(props["redis"]["properties"]["secretRef"]["properties"]) == {"name", "key"}
    assert set(props["template"]["properties"]) == TEMPLATE_KEYS
    assert set(props["http"]["properties"]) == {
        camel(f.name) for f in dataclasses.fields(HttpPolicy)
    }


def test_bounds(spec_schema: dict[str, Any]) -> None:
    props = spec_schema["properties"]
    assert props["slots"]["type"] == "integer"
    assert (props["slots"]["minimum"], props["slots"]["maximum"]) == (0, MAX_SLOTS)
    for name in ("callTimeoutSeconds", "heartbeatIntervalSeconds"):
        assert props[name]["type"] == "number"
        assert props[name]["minimum"] == 0, name
        assert props[name]["exclusiveMinimum"] is True, name
    assert props["callTimeoutSeconds"]["maximum"] == 3600
    for name, low in {
        "maxAttempts": 1,
        "resultTtlSeconds": 1,
        "maxQueueLength": 0,
        "maxUnavailable": 1,
    }.items():
        assert (props[name]["type"], props[name]["minimum"]) == ("integer", low), name
    for name, sub in props["liveness"]["properties"].items():
        assert (sub["type"], sub["minimum"]) == ("integer", 1), name
    assert props["image"]["minLength"] == 1
    for name in SIZE_LIMITS:
        assert props[name]["type"] == "integer", name
        assert (props[name]["minimum"], props[name]["maximum"]) == (
            MIN_LIMIT_BYTES,
            MAX_LIMIT_BYTES,
        ), name
    assert (props["maxDeadLetters"]["type"], props["maxDeadLetters"]["minimum"]) == ("integer", 0)
    assert props["allowRedisEviction"]["type"] == "boolean"
    idle = props["apiIdleTimeoutSeconds"]
    assert (idle["type"], idle["minimum"], idle["maximum"]) == ("integer", 0, MAX_API_IDLE_TIMEOUT)
    http = props["http"]["properties"]
    for name in ("allowUrls", "redactHeaders"):
        assert (http[name]["type"], http[name]["maxItems"]) == ("array", MAX_LIST_ITEMS), name
    assert http["followRedirects"]["type"] == "boolean"


CRD_DEFAULTS: dict[str, Any] = {
    "handler": defaults.HANDLER,
    "callTimeoutSeconds": defaults.CALL_TIMEOUT,
    "heartbeatIntervalSeconds": defaults.HEARTBEAT_INTERVAL,
    "maxAttempts": defaults.MAX_ATTEMPTS,
    "resultTtlSeconds": defaults.RESULT_TTL,
    "maxQueueLength": defaults.MAX_QUEUE_LENGTH,
    "maxUnavailable": defaults.MAX_UNAVAILABLE,
    "apiIdleTimeoutSeconds": defaults.API_IDLE_TIMEOUT,
    "standby": defaults.STANDBY,
    "hangWindowSeconds": defaults.HANG_WINDOW,
    "adaptive": defaults.ADAPTIVE,
    "maxPauseSeconds": defaults.MAX_PAUSE,
    "liveness": {},
    "maxEnvelopeBytes": defaults.MAX_ENVELOPE_BYTES,
    "maxResultBytes": defaults.MAX_RESULT_BYTES,
    "maxResponseBytes": defaults.MAX_RESPONSE_BYTES,
    "maxDeadLetters": defaults.MAX_DEAD_LETTERS,
    "http": {},
    "allowRedisEviction": False,
}
"""The spec's schema defaults, as apipool.defaults defines them."""
LIVENESS_DEFAULTS = {
    "periodSeconds": defaults.LIVENESS_PERIOD,
    "failureThreshold": defaults.LIVENESS_FAILURE_THRESHOLD,
    "timeoutSeconds": defaults.LIVENESS_TIMEOUT,
}
HTTP_DEFAULTS = {"followRedirects": HttpPolicy().follow_redirects}


def test_schema_defaults_are_apipool_defaults(spec_schema: dict[str, Any]) -> None:
    """Every default the API server fills in is the one apipool.defaults defines."""
    props = spec_schema["properties"]
    assert {k: v["default"] for k, v in props.items() if "default" in v} == CRD_DEFAULTS
    liveness = props["liveness"]["properties"]
    assert {k: v["default"] for k, v in liveness.items()} == LIVENESS_DEFAULTS
    http = props["http"]["properties"]
    assert {k: v["default"] for k, v in http.items() if "default" in v} == HTTP_DEFAULTS
    secret_ref = props["redis"]["properties"]["secretRef"]["properties"]
    assert secret_ref["key"]["default"] == DEFAULT_SECRET_KEY
    # Of the field's type too: an integer for an integer field, a number for a number.
    types = {
        "string": str,
        "integer": int,
        "number": (int, float),
        "object": dict,
        "boolean": bool,
    }
    for name, value in CRD_DEFAULTS.items():
        assert isinstance(value, types[props[name]["type"]]), name
        # bool is an int in Python, not in JSON.
        assert isinstance(value, bool) == (props[name]["type"] == "boolean"), name


def test_defaults_agree_with_parse_spec(spec_schema: dict[str, Any]) -> None:
    """What the API server fills in is what parse_spec assumes when it is left out."""
    defaulted = apply_defaults(spec_schema, MINIMAL)
    assert defaulted["liveness"] == LIVENESS_DEFAULTS
    assert defaulted["redis"]["secretRef"] == {"name": "redis", "key": DEFAULT_SECRET_KEY}
    assert defaulted["http"] == HTTP_DEFAULTS
    assert parse_spec("billing", defaulted) == parse_spec("billing", MINIMAL)
    parsed = parse_spec("billing", MINIMAL)
    assert parsed == PoolSpec(
        slots=3,
        image=MINIMAL["image"],
        handler=defaults.HANDLER,
        redis_secret="redis",
        call_timeout_seconds=defaults.CALL_TIMEOUT,
        heartbeat_interval_seconds=defaults.HEARTBEAT_INTERVAL,
        max_attempts=defaults.MAX_ATTEMPTS,
        result_ttl_seconds=defaults.RESULT_TTL,
        max_queue_length=defaults.MAX_QUEUE_LENGTH,
        liveness=Liveness(
            defaults.LIVENESS_PERIOD, defaults.LIVENESS_FAILURE_THRESHOLD, defaults.LIVENESS_TIMEOUT
        ),
        max_unavailable=defaults.MAX_UNAVAILABLE,
        api_idle_timeout_seconds=defaults.API_IDLE_TIMEOUT,
        standby=defaults.STANDBY,
        hang_window_seconds=defaults.HANG_WINDOW,
        adaptive=defaults.ADAPTIVE,
        max_pause_seconds=defaults.MAX_PAUSE,
        max_envelope_bytes=defaults.MAX_ENVELOPE_BYTES,
        max_result_bytes=defaults.MAX_RESULT_BYTES,
        max_response_bytes=defaults.MAX_RESPONSE_BYTES,
        max_dead_letters=defaults.MAX_DEAD_LETTERS,
        http=HttpPolicy(),
        allow_redis_eviction=False,
    )


def test_every_default_is_valid_for_its_own_schema(schema: dict[str, Any]) -> None:
    """The API server refuses a CRD whose defaults do not validate."""
    defaults = [(path, node) for path, node in walk(schema) if "default" in node]
    assert len(defaults) >= 12
    for path, node in defaults:
        sub = to_json_schema(node)
        jsonschema.Draft4Validator(sub).validate(apply_defaults(node, node["default"]))
        assert path.startswith(".spec."), path


def re2(python_pattern: str) -> str:
    """A Python regex of spec.py in the dialect the CRD needs.

    The API server evaluates ``pattern`` with Go's RE2, and OpenAPI itself
    means ECMA-262. ECMA-262 lacks Python's named groups ``(?P<name>...)``
    (it spells them ``(?<name>...)``), so the group becomes a numbered one; and
    Python's ``\\w`` in a str pattern matches any Unicode word character where
    RE2 and ECMA-262 match ASCII ones only, so it is spelled out as ASCII.
    The CRD is therefore stricter for non-ASCII module names, which Python can
    import but which no one should use here."""
    return re.sub(r"\(\?P<\w+>", "(", python_pattern).replace(r"\w", "A-Za-z0-9_")


HANDLER_SAMPLES = [
    "http",
    "billing:charge",
    "billing.calls:Refunds.run",
    "_private:_fn",
    "fast=billing.calls:charge",
    "v1.fast-path=http",
    "",
    "HTTP",
    "httpx",
    "http:",
    ":charge",
    "billing:",
    "billing.charge",
    "1billing:charge",
    "billing:charge:more",
    "=billing:charge",
    "a=b=billing:charge",
    "fast =billing:charge",
    "billing:charge ",
    "billing-calls:charge",
]


def test_handler_pattern_is_spec_handler_in_re2(spec_schema: dict[str, Any]) -> None:
    props = spec_schema["properties"]
    pattern = props["handler"]["pattern"]
    assert pattern == re2(HANDLER.pattern)
    assert props["extraHandlers"]["items"]["pattern"] == pattern
    assert props["extraHandlers"]["items"]["type"] == "string"
    # Same answers on ASCII input (re.ASCII: \w and friends as in RE2; the
    # pattern has no \w left, so this only guards against a careless edit).
    crd_handler = re.compile(pattern, re.ASCII)
    for sample in HANDLER_SAMPLES:
        assert bool(crd_handler.search(sample)) == bool(HANDLER.match(sample)), sample
    assert sum(bool(HANDLER.match(s)) for s in HANDLER_SAMPLES) == 6
    # Stricter than Python on non-ASCII identifiers.
    assert not crd_handler.search("módulo:función")


# -- sample pools against the schema (and parse_spec) -------------------------

ACCEPTED = [
    pytest.param(cr(MINIMAL), id="minimal"),
    pytest.param(cr(FULL), id="full"),
    pytest.param(cr(changed(MINIMAL, "slots", 0)), id="slots-0"),
    pytest.param(cr(changed(MINIMAL, "slots", MAX_SLOTS)), id="slots-max"),
    pytest.param(cr(changed(MINIMAL, "callTimeoutSeconds", 0.001)), id="tiny-timeout"),
    pytest.param(cr(changed(MINIMAL, "callTimeoutSeconds", 3600)), id="timeout-max"),
    pytest.param(cr(changed(MINIMAL, "maxQueueLength", 0)), id="unbounded-queue"),
    pytest.param(cr(MINIMAL, name="a" * 50), id="name-50"),
    pytest.param(cr(changed(MINIMAL, "maxEnvelopeBytes", MIN_LIMIT_BYTES)), id="envelope-min"),
    pytest.param(cr(changed(MINIMAL, "maxResponseBytes", MAX_LIMIT_BYTES)), id="response-max"),
    pytest.param(cr(changed(MINIMAL, "maxDeadLetters", 0)), id="dead-letters-uncapped"),
    pytest.param(cr(changed(MINIMAL, "http", {})), id="http-empty"),
    pytest.param(
        cr(changed(MINIMAL, "http.allowUrls", ["http://x.svc/"] * MAX_LIST_ITEMS)),
        id="allow-urls-max",
    ),
]

# Refused by the API server and by parse_spec alike.
REFUSED = [
    pytest.param("slots", -1, id="slots-negative"),
    pytest.param("slots", MAX_SLOTS + 1, id="slots-too-many"),
    pytest.param("slots", 2.5, id="slots-fraction"),
    pytest.param("slots", "3", id="slots-string"),
    pytest.param("image", DELETE, id="image-missing"),
    pytest.param("image", "", id="image-empty"),
    pytest.param("image", "   ", id="image-blank"),
    pytest.param("handler", "billing.charge", id="handler-no-function"),
    pytest.param("handler", "not a handler", id="handler-spaces"),
    pytest.param("handler", "=billing:charge", id="handler-empty-name"),
    pytest.param("extraHandlers", ["http", "nope"], id="extra-handler-bad"),
    pytest.param("redis", DELETE, id="redis-missing"),
    pytest.param("redis", {"secretRef": {"key": "url"}}, id="secret-name-missing"),
    pytest.param("callTimeoutSeconds", 0, id="timeout-zero"),
    pytest.param("callTimeoutSeconds", -1, id="timeout-negative"),
    pytest.param("heartbeatIntervalSeconds", 0, id="heartbeat-zero"),
    pytest.param("maxAttempts", 0, id="attempts-zero"),
    pytest.param("resultTtlSeconds", 0, id="ttl-zero"),
    pytest.param("maxQueueLength", -1, id="queue-negative"),
    pytest.param("maxUnavailable", 0, id="unavailable-zero"),
    pytest.param("liveness", {"periodSeconds": 0}, id="liveness-period-zero"),
    pytest.param("liveness", {"failureThreshold": 0}, id="liveness-threshold-zero"),
    pytest.param("callTimeoutSeconds", 3601, id="timeout-over-an-hour"),
    pytest.param("image", "repo/app:1 ", id="image-trailing-space"),
    pytest.param("redis", {"secretRef": {"name": "Not_A_Name"}}, id="secret-name-invalid"),
    pytest.param("redis", {"secretRef": {"name": "r", "key": "a/b"}}, id="secret-key-invalid"),
    pytest.param("template", {"env": [{"value": "x"}]}, id="env-without-name"),
    pytest.param("maxEnvelopeBytes", MIN_LIMIT_BYTES - 1, id="envelope-too-small"),
    pytest.param("maxEnvelopeBytes", "1Mi", id="envelope-string"),
    pytest.param("maxResultBytes", 0, id="result-zero"),
    pytest.param("maxResultBytes", MAX_LIMIT_BYTES + 1, id="result-too-large"),
    pytest.param("maxResponseBytes", 1500000.5, id="response-fraction"),
    pytest.param("maxDeadLetters", -1, id="dead-letters-negative"),
    pytest.param("http", "https://api.example.com/", id="http-not-an-object"),
    pytest.param("http.allowUrls", "https://api.example.com/", id="allow-urls-not-a-list"),
    pytest.param("http.allowUrls", ["ftp://files.example.com/"], id="allow-url-ftp"),
    pytest.param("http.allowUrls", ["api.example.com"], id="allow-url-no-scheme"),
    pytest.param("http.allowUrls", ["https://"], id="allow-url-no-host"),
    pytest.param("http.allowUrls", ["http://x/"] * (MAX_LIST_ITEMS + 1), id="allow-urls-many"),
    pytest.param("http.followRedirects", "yes", id="follow-redirects-string"),
    pytest.param("http.redactHeaders", ["X Token"], id="redact-header-space"),
    pytest.param("allowRedisEviction", "true", id="eviction-string"),
    pytest.param("allowRedisEviction", 1, id="eviction-number"),
]

# Refused by the API server only: parse_spec does not check the values inside
# template (the API server does, at pod creation), see the CRD's comments.
REFUSED_BY_SCHEMA_ONLY = [
    pytest.param("template", {"imagePullPolicy": "Sometimes"}, id="pull-policy"),
    pytest.param("template", {"labels": {"team": 1}}, id="label-not-string"),
]


@pytest.mark.parametrize("doc", ACCEPTED)
def test_valid_pools_pass_schema_and_parse_spec(
    validator: jsonschema.Draft4Validator, spec_schema: dict[str, Any], doc: dict[str, Any]
) -> None:
    validator.validate(doc)
    parse_spec(doc["metadata"]["name"], apply_defaults(spec_schema, doc["spec"]))


@pytest.mark.parametrize(("path", "value"), REFUSED)
def test_invalid_pools_fail_schema_and_parse_spec(
    validator: jsonschema.Draft4Validator, path: str, value: Any
) -> None:
    spec = changed(MINIMAL, path, value)
    assert not is_valid(validator, cr(spec))
    assert not parses("billing", spec)


@pytest.mark.parametrize(("path", "value"), REFUSED_BY_SCHEMA_ONLY)
def test_invalid_pools_fail_schema(
    validator: jsonschema.Draft4Validator, path: str, value: Any
) -> None:
    assert not is_valid(validator, cr(changed(MINIMAL, path, value)))


@pytest.mark.parametrize("name", ["a" * 51, "Billing", "billing.eu", "-billing", "billing-"])
def test_pool_name_is_a_short_dns_label(validator: jsonschema.Draft4Validator, name: str) -> None:
    assert not is_valid(validator, cr(MINIMAL, name=name))
    assert not parses(name, MINIMAL)


# -- structure, status, subresources, columns ---------------------------------


def test_schema_is_structural_and_documented(schema: dict[str, Any]) -> None:
    for path, node in walk(schema):
        if "x-kubernetes-int-or-string" not in node:
            assert "type" in node, f"{path}: no type"
        assert not {"$ref", "oneOf", "not", "definitions"} & set(node), path
        assert not ("properties" in node and "additionalProperties" in node), path
        # Every field is described; the items and values of a described list
        # or map need not be.
        field = path.startswith((".spec", ".status")) and "|" not in path
        if field and not path.endswith(("[]", "{}")):
            assert node.get("description", "").strip(), f"{path}: no description"


def test_unknown_fields_are_kept_only_where_a_schema_is_unreasonable(
    schema: dict[str, Any],
) -> None:
    preserved = {p for p, n in walk(schema) if n.get("x-kubernetes-preserve-unknown-fields")}
    assert preserved == {
        ".spec.template.resources",
        ".spec.template.env[].valueFrom",
        ".spec.template.affinity",
    }


def test_status_schema(schema: dict[str, Any], version: dict[str, Any]) -> None:
    assert version["subresources"]["status"] == {}
    status = schema["properties"]["status"]["properties"]
    assert set(status) == {
        "desiredSlots",
        "readySlots",
        "updatedSlots",
        "busySlots",
        "queueDepth",
        "inFlight",
        "deadLetters",
        "utilization",
        "effectiveSlots",
        "largestLoss",
        "observedGeneration",
        "selector",
        "conditions",
        "quarantinedSlots",
    }
    assert (status["utilization"]["minimum"], status["utilization"]["maximum"]) == (0, 1)
    loss = status["largestLoss"]["properties"]
    assert loss["cause"]["enum"] == list(LOSSES)  # the causes the operator reports
    assert (loss["share"]["minimum"], loss["share"]["maximum"]) == (0, 1)
    assert status["selector"]["type"] == "string"
    conditions = status["conditions"]
    assert conditions["x-kubernetes-list-type"] == "map"
    assert conditions["x-kubernetes-list-map-keys"] == ["type"]
    item = conditions["items"]
    # A list-map key must be required (or defaulted), else the CRD is refused.
    assert {"type", "status"} <= set(item["required"])
    assert set(item["properties"]) == {
        "type",
        "status",
        "reason",
        "message",
        "lastTransitionTime",
        "observedGeneration",
    }
    assert item["properties"]["status"]["enum"] == ["True", "False", "Unknown"]
    assert item["properties"]["lastTransitionTime"]["format"] == "date-time"
    for kind in ("Ready", "Progressing", "Degraded"):
        assert kind in conditions["description"]


def test_status_sample_validates(validator: jsonschema.Draft4Validator) -> None:
    doc = cr(MINIMAL)
    doc["status"] = {
        "desiredSlots": 3,
        "readySlots": 2,
        "busySlots": 2,
        "queueDepth": 17,
        "inFlight": 2,
        "deadLetters": 0,
        "utilization": 0.97,
        "observedGeneration": 4,
        "selector": "app.kubernetes.io/name=apipool,apipool.dev/pool=billing",
        "conditions": [
            {
                "type": "Ready",
                "status": "False",
                "reason": "SlotsStarting",
                "message": "2 of 3 slots ready",
                "lastTransitionTime": "2025-01-01T00:00:00Z",
                "observedGeneration": 4,
            }
        ],
    }
    validator.validate(doc)
    doc["status"]["conditions"][0]["status"] = "Maybe"
    assert not is_valid(validator, doc)
    doc["status"]["conditions"][0]["status"] = "True"
    doc["status"]["utilization"] = 1.5
    assert not is_valid(validator, doc)
    doc["status"]["utilization"] = 0.5
    doc["status"]["largestLoss"] = {"cause": "waiting_for_work", "share": 0.4}
    validator.validate(doc)
    doc["status"]["largestLoss"] = {"cause": "coffee", "share": 0.4}
    assert not is_valid(validator, doc)


def test_scale_subresource(version: dict[str, Any]) -> None:
    assert version["subresources"]["scale"] == {
        "specReplicasPath": ".spec.slots",
        "statusReplicasPath": ".status.readySlots",
        "labelSelectorPath": ".status.selector",
    }


def test_printer_columns(version: dict[str, Any]) -> None:
    columns = [(c["name"], c["type"], c["jsonPath"]) for c in version["additionalPrinterColumns"]]
    assert columns == [
        ("Slots", "integer", ".spec.slots"),
        ("Ready", "integer", ".status.readySlots"),
        ("Busy", "integer", ".status.busySlots"),
        ("Queue", "integer", ".status.queueDepth"),
        ("Utilization", "number", ".status.utilization"),
        ("Age", "date", ".metadata.creationTimestamp"),
    ]


# -- RBAC -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def rbac() -> list[dict[str, Any]]:
    return load_all(RBAC_PATH)


@pytest.fixture(scope="module")
def deployment() -> dict[str, Any]:
    (doc,) = [d for d in load_all(OPERATOR_PATH) if d["kind"] == "Deployment"]
    return doc


def is_our_sa(subject: dict[str, Any]) -> bool:
    return subject == {"kind": "ServiceAccount", "name": SA_NAME, "namespace": SA_NAMESPACE}


def bound_rules(rbac: list[dict[str, Any]], namespace: str | None) -> list[dict[str, Any]]:
    """Rules our ServiceAccount gets in ``namespace`` (None: cluster-wide)."""
    roles = {(d["kind"], d["metadata"].get("namespace")): d for d in rbac if "rules" in d}
    rules: list[dict[str, Any]] = []
    for binding in rbac:
        if binding["kind"] not in ("RoleBinding", "ClusterRoleBinding"):
            continue
        if not any(is_our_sa(s) for s in binding["subjects"]):
            continue
        where = binding["metadata"].get("namespace")
        if binding["kind"] == "ClusterRoleBinding" and namespace is not None:
            continue
        if binding["kind"] == "RoleBinding" and where != namespace:
            continue
        ref = binding["roleRef"]
        role_ns = where if ref["kind"] == "Role" else None
        role = roles[(ref["kind"], role_ns)]
        assert role["metadata"]["name"] == ref["name"]
        rules += role["rules"]
    return rules


def verbs(rules: list[dict[str, Any]], group: str, resource: str) -> set[str]:
    return {
        verb
        for rule in rules
        if group in rule["apiGroups"] and resource in rule["resources"]
        for verb in rule["verbs"]
    }


def watched_namespaces(deployment: dict[str, Any]) -> list[str]:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    return [ns.strip() for ns in env["APIPOOL_WATCH_NAMESPACES"].split(",")]


def test_rbac_has_no_wildcards(rbac: list[dict[str, Any]]) -> None:
    rules = [rule for doc in rbac for rule in doc.get("rules", [])]
    assert rules
    for rule in rules:
        for key in ("apiGroups", "resources", "verbs", "resourceNames", "nonResourceURLs"):
            assert not any("*" in item for item in rule.get(key, [])), rule


def test_cluster_wide_rules_are_kopf_reads_only(rbac: list[dict[str, Any]]) -> None:
    rules = bound_rules(rbac, None)
    assert verbs(rules, "apiextensions.k8s.io", "customresourcedefinitions") == {"list", "watch"}
    assert verbs(rules, "", "namespaces") == {"list", "watch"}
    assert {r for rule in rules for r in rule["resources"]} == {
        "customresourcedefinitions",
        "namespaces",
    }


def test_operator_may_do_its_work_in_every_watched_namespace(
    rbac: list[dict[str, Any]], deployment: dict[str, Any]
) -> None:
    namespaces = watched_namespaces(deployment)
    assert namespaces == ["default"]
    for namespace in namespaces:
        rules = bound_rules(rbac, namespace)
        assert {"create", "delete", "list", "watch"} <= verbs(rules, "", "pods")
        assert {"list", "watch", "patch"} <= verbs(rules, GROUP, PLURAL)
        assert "patch" in verbs(rules, GROUP, f"{PLURAL}/status")
        assert "create" in verbs(rules, "", "events")
        assert verbs(rules, "", "secrets") == {"get"}
        assert not {g for rule in rules for g in rule["apiGroups"]} & {"kopf.dev", "zalando.org"}


# -- the operator Deployment ----------------------------------------------------


def test_operator_deployment(deployment: dict[str, Any]) -> None:
    assert deployment["metadata"]["namespace"] == SA_NAMESPACE
    spec = deployment["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"] == {"type": "Recreate"}
    pod = spec["template"]["spec"]
    assert pod["serviceAccountName"] == SA_NAME
    (container,) = pod["containers"]
    assert container["image"] == "apipool:dev"
    assert container["args"] == ["operator"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    probe = container["livenessProbe"]["httpGet"]
    assert probe["path"] == "/healthz"
    assert ports.get(probe["port"], probe["port"]) == 8081
    security = container["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}
    assert {"cpu", "memory"} <= set(container["resources"]["requests"])
    assert "memory" in container["resources"]["limits"]


def test_operator_manifests_name_the_objects_rbac_binds(
    rbac: list[dict[str, Any]],
) -> None:
    kinds = {(d["kind"], d["metadata"]["name"]) for d in load_all(OPERATOR_PATH)}
    assert ("Namespace", SA_NAMESPACE) in kinds
    assert ("ServiceAccount", SA_NAME) in kinds
    subjects = [s for d in rbac for s in d.get("subjects", [])]
    assert subjects
    assert all(is_our_sa(s) for s in subjects)
