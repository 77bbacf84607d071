"""The chart's default values are apipool's defaults, where the chart sets them."""

from __future__ import annotations

import re
import urllib.parse
from pathlib import Path
from typing import Any

import pytest
import yaml

from apipool import defaults
from apipool.operator.config import OperatorSettings
from apipool.operator.spec import parse_spec
from apipool.settings import HttpPolicy

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "apipool"

POOL_DEFAULTS: dict[str, Any] = {
    "handler": defaults.HANDLER,
    "callTimeoutSeconds": defaults.CALL_TIMEOUT,
    "heartbeatIntervalSeconds": defaults.HEARTBEAT_INTERVAL,
    "maxAttempts": defaults.MAX_ATTEMPTS,
    "resultTtlSeconds": defaults.RESULT_TTL,
    "maxQueueLength": defaults.MAX_QUEUE_LENGTH,
    "maxUnavailable": defaults.MAX_UNAVAILABLE,
    "maxEnvelopeBytes": defaults.MAX_ENVELOPE_BYTES,
    "maxResultBytes": defaults.MAX_RESULT_BYTES,
    "maxResponseBytes": defaults.MAX_RESPONSE_BYTES,
    "maxDeadLetters": defaults.MAX_DEAD_LETTERS,
    "allowRedisEviction": False,
    "apiIdleTimeoutSeconds": defaults.API_IDLE_TIMEOUT,
    "standby": defaults.STANDBY,
    "hangWindowSeconds": defaults.HANG_WINDOW,
    "adaptive": defaults.ADAPTIVE,
    "maxPauseSeconds": defaults.MAX_PAUSE,
}
"""Every pool setting of the spec that has a default, by its spec name."""
NOT_SPEC_DEFAULTS = {"enabled", "name", "slots", "image", "extraHandlers", "template", "http"}
"""Keys of values.pool that are not a defaulted spec field."""


@pytest.fixture(scope="module")
def values() -> dict[str, Any]:
    doc = yaml.safe_load((CHART / "values.yaml").read_text())
    assert isinstance(doc, dict)
    return doc


def test_the_example_pool_defaults_are_apipools(values: dict[str, Any]) -> None:
    pool = values["pool"]
    chart_set = set(pool) - NOT_SPEC_DEFAULTS
    assert chart_set, "values.pool sets no default any more: update this test"
    assert chart_set <= set(POOL_DEFAULTS), chart_set - set(POOL_DEFAULTS)
    for key in sorted(chart_set):
        assert pool[key] == POOL_DEFAULTS[key], key
    # The template hands each of them to the pool under the same name.
    template = (CHART / "templates" / "pool.yaml").read_text()
    for key in sorted(chart_set):
        assert re.search(rf"^  {key}: .*\$p\.{key}\b", template, re.MULTILINE), key


def test_the_example_pools_http_policy_is_the_default_one(values: dict[str, Any]) -> None:
    """values.pool.http spells out every field of spec.http, each at its default."""
    http = values["pool"]["http"]
    base = {"slots": 1, "image": "apipool:dev", "redis": {"secretRef": {"name": "redis"}}}
    assert set(http) == {"allowUrls", "followRedirects", "redactHeaders"}
    assert parse_spec("example", {**base, "http": http}).http == HttpPolicy()


def test_the_operator_defaults_are_the_operators(values: dict[str, Any]) -> None:
    operator = values["operator"]
    assert operator["timerInterval"] == OperatorSettings.timer_interval
    assert operator["metricsPort"] == OperatorSettings.metrics_port
    # The liveness port the chart probes is where the operator serves it by default.
    liveness_port = urllib.parse.urlsplit(OperatorSettings.liveness_endpoint).port
    deployment = (CHART / "templates" / "operator-deployment.yaml").read_text()
    assert f"containerPort: {liveness_port}\n" in deployment
