"""The chart's Redis settings and the example pool's limits and http policy:
rendered, read back as the operator reads them, and explained in the notes."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from apipool import defaults
from apipool.operator.spec import parse_spec
from apipool.settings import HttpPolicy

from .test_chart import CHART, SCENARIOS, HelmBinary, HelmPython, helm_backend, manifests, one

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def chart() -> HelmBinary | HelmPython:
    return helm_backend()


@pytest.fixture(scope="module")
def rendered(chart: HelmBinary | HelmPython) -> dict[str, list[dict[str, Any]]]:
    wanted = ["internal-redis", "internal-redis-sized", *POOL_SCENARIOS]
    return {name: manifests(chart.render(SCENARIOS[name])) for name in wanted}


def values_pool() -> dict[str, Any]:
    """values.pool of values.yaml."""
    return dict(yaml.safe_load((CHART / "values.yaml").read_text())["pool"])


POOL_SCENARIOS = [
    name for name, values in SCENARIOS.items() if values.get("pool", {}).get("enabled")
]


@pytest.mark.parametrize("scenario", POOL_SCENARIOS)
def test_the_rendered_pool_is_one_the_operator_accepts(
    rendered: dict[str, list[dict[str, Any]]], scenario: str
) -> None:
    spec = one(rendered[scenario], "ApiConcurrencyPool")["spec"]
    for key in ("maxEnvelopeBytes", "maxResultBytes", "maxResponseBytes", "maxDeadLetters"):
        assert type(spec[key]) is int, f"{key}: {spec[key]!r}"  # not 1.048576e+06
    parsed = parse_spec("example", spec)
    values = {**values_pool(), **SCENARIOS[scenario]["pool"]}
    assert parsed.max_envelope_bytes == values["maxEnvelopeBytes"]
    assert parsed.max_result_bytes == values["maxResultBytes"]
    assert parsed.max_response_bytes == values["maxResponseBytes"]
    assert parsed.max_dead_letters == values["maxDeadLetters"]
    assert parsed.allow_redis_eviction is values["allowRedisEviction"]
    http = {**values_pool()["http"], **values["http"]}
    assert parsed.http == HttpPolicy(
        allow_urls=tuple(http["allowUrls"]),
        follow_redirects=http["followRedirects"],
        redact_headers=tuple(http["redactHeaders"]),
    )


def test_the_default_pool_uses_apipools_defaults(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    spec = one(rendered["worker-hpa"], "ApiConcurrencyPool")["spec"]
    parsed = parse_spec("example", spec)
    assert parsed.http == HttpPolicy()
    assert (parsed.max_envelope_bytes, parsed.max_dead_letters) == (
        defaults.MAX_ENVELOPE_BYTES,
        defaults.MAX_DEAD_LETTERS,
    )
    assert parsed.allow_redis_eviction is False


def redis_args(docs: list[dict[str, Any]]) -> list[str]:
    sts = one(docs, "StatefulSet", "-redis")
    (container,) = sts["spec"]["template"]["spec"]["containers"]
    return list(container["args"])


def redis_bytes(size: str) -> int:
    """A Redis size string (256mb, 1gb, 8m, 1024) in bytes, as redis-server reads it."""
    units = {"": 1, "k": 1000, "kb": 1024, "m": 1000**2, "mb": 1024**2, "g": 1000**3, "gb": 1024**3}
    number = size.rstrip("kmgb")
    return int(number) * units[size[len(number) :]]


def kube_bytes(quantity: str) -> int:
    """A Kubernetes memory quantity with a binary suffix (512Mi) in bytes."""
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30}
    return int(quantity[:-2]) * units[quantity[-2:]]


@pytest.mark.parametrize(
    ("scenario", "maxmemory", "bulk"),
    [("internal-redis", "256mb", "8mb"), ("internal-redis-sized", "1gb", "16mb")],
)
def test_internal_redis_never_evicts_and_bounds_elements(
    rendered: dict[str, list[dict[str, Any]]], scenario: str, maxmemory: str, bulk: str
) -> None:
    args = redis_args(rendered[scenario])
    assert args[args.index("--maxmemory") + 1] == maxmemory
    assert args[args.index("--maxmemory-policy") + 1] == "noeviction"
    assert args[args.index("--proto-max-bulk-len") + 1] == bulk


def test_internal_redis_defaults_leave_room(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """The default maxmemory is at most half the container's memory limit (an
    append-only file rewrite forks Redis), and one element may hold the largest
    default envelope."""
    values = yaml.safe_load((CHART / "values.yaml").read_text())["redis"]["internal"]
    limit = kube_bytes(values["resources"]["limits"]["memory"])
    assert 0 < redis_bytes(values["maxmemory"]) <= limit // 2
    bulk = redis_bytes(values["protoMaxBulkLen"])
    assert bulk >= 1 << 20  # redis-server refuses less
    assert bulk > values_pool()["maxEnvelopeBytes"]
    sts = one(rendered["internal-redis"], "StatefulSet", "-redis")
    (container,) = sts["spec"]["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["memory"] == values["resources"]["limits"]["memory"]


def test_notes_tell_that_private_addresses_need_allow_urls(chart: HelmBinary | HelmPython) -> None:
    if isinstance(chart, HelmBinary):
        pytest.skip("helm template does not render NOTES.txt")
    internal = "http://billing.team-a.svc:8080/v1/charge"
    values: dict[str, Any] = {
        "redis": {"internal": {"enabled": True}},
        "pool": {"enabled": True},
        "worker": {"enabled": True, "targetUrl": internal},
    }
    notes = " ".join(chart.render(values)["apipool/templates/NOTES.txt"].split())
    assert "private and link-local addresses" in notes
    assert "pool.http.allowUrls names them." in notes
    assert f"If worker.targetUrl ({internal}) is cluster-internal" in notes
    assert "maxmemory, policy noeviction" in notes
    assert "RedisMayEvict" in notes
    values["pool"]["http"] = {"allowUrls": ["http://billing.team-a.svc:8080/"]}
    notes = " ".join(chart.render(values)["apipool/templates/NOTES.txt"].split())
    assert "(allowed: http://billing.team-a.svc:8080/)" in notes
    assert "If worker.targetUrl" not in notes  # it is allowed


def test_readme_explains_allow_urls_and_redis_settings() -> None:
    readme = " ".join((CHART / "README.md").read_text().split())
    assert "refuses loopback, private and link-local addresses" in readme
    assert "pool.http.allowUrls" in readme
    for value in ("redis.internal.maxmemory", "redis.internal.protoMaxBulkLen", "RedisMayEvict"):
        assert value in readme, value
