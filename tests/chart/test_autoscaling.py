"""The general workers scale on their own input backlog, never on the pool's queue.

The pool's queue (apipool:{POOL}:queue) is the workers' output: scaling the
producers up on it adds load exactly when the API is saturated, and scaling
them down when it is empty leaves paid capacity idle. The chart scales them on
worker.inputList (KEDA) or on an External metric (HPA), CPU only on request.
"""

from __future__ import annotations

from typing import Any

import pytest

from .test_chart import (
    EXCLUSIVE_MESSAGE,
    KUBE_VERSIONS,
    WORKER,
    HelmBinary,
    HelmPython,
    RenderError,
    by_kind,
    helm_backend,
    manifests,
    one,
)

pytestmark = pytest.mark.unit

INPUT = "rq:queue:default"
BASE: dict[str, Any] = {"redis": {"internal": {"enabled": True}}, "pool": {"enabled": True}}
EXTERNAL = {"metricName": "redis_key_size", "targetAverageValue": "5"}


@pytest.fixture(scope="module")
def chart() -> HelmBinary | HelmPython:
    return helm_backend()


def render(chart: HelmBinary | HelmPython, worker: dict[str, Any]) -> list[dict[str, Any]]:
    return manifests(chart.render({**BASE, "worker": {**WORKER, **worker}}))


def env_of(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    dep = one(docs, "Deployment", "-worker")
    (container,) = dep["spec"]["template"]["spec"]["containers"]
    return {e["name"]: e for e in container["env"]}


def validate(docs: list[dict[str, Any]]) -> None:
    import kubernetes_validate

    for doc in docs:
        if doc["kind"] in {"ScaledObject", "ApiConcurrencyPool"}:
            continue
        for version in KUBE_VERSIONS:
            v = kubernetes_validate.latest_version() if version == "latest" else version
            kubernetes_validate.validate(doc, v, strict=True)


def test_keda_watches_the_input_list(chart: HelmBinary | HelmPython) -> None:
    docs = render(chart, {"inputList": INPUT, "keda": {"enabled": True, "listLength": 4}})
    (trigger,) = one(docs, "ScaledObject")["spec"]["triggers"]
    assert trigger["type"] == "redis"
    assert trigger["metadata"]["listName"] == INPUT
    assert trigger["metadata"]["listLength"] == "4"
    # The workers pop from the same list the trigger measures.
    assert env_of(docs)["APIPOOL_INPUT_LIST"]["value"] == INPUT
    assert not by_kind(docs, "HorizontalPodAutoscaler")
    validate(docs)


def test_hpa_scales_on_an_external_metric(chart: HelmBinary | HelmPython) -> None:
    docs = render(chart, {"autoscaling": {"enabled": True, "external": EXTERNAL}})
    hpa = one(docs, "HorizontalPodAutoscaler")
    (metric,) = hpa["spec"]["metrics"]
    assert metric == {
        "type": "External",
        "external": {
            "metric": {"name": "redis_key_size"},
            "target": {"type": "AverageValue", "averageValue": "5"},
        },
    }
    assert "APIPOOL_INPUT_LIST" not in env_of(docs)
    validate(docs)


@pytest.mark.parametrize(
    ("external", "kinds"),
    [
        ({"metricName": ""}, ["Resource"]),
        (EXTERNAL, ["External", "Resource"]),
    ],
)
def test_hpa_cpu_is_opt_in(
    chart: HelmBinary | HelmPython, external: dict[str, Any], kinds: list[str]
) -> None:
    autoscaling = {"enabled": True, "external": external, "targetCPUUtilizationPercentage": 70}
    docs = render(chart, {"autoscaling": autoscaling})
    metrics = one(docs, "HorizontalPodAutoscaler")["spec"]["metrics"]
    assert [m["type"] for m in metrics] == kinds
    cpu = metrics[-1]["resource"]
    assert cpu["name"] == "cpu"
    assert cpu["target"] == {"type": "Utilization", "averageUtilization": 70}
    validate(docs)


def test_the_default_hpa_does_not_use_cpu(chart: HelmBinary | HelmPython) -> None:
    """Enabling the HPA with the defaults fails rather than fall back to CPU."""
    with pytest.raises(RenderError, match="needs a metric"):
        render(chart, {"autoscaling": {"enabled": True}})


@pytest.mark.parametrize(
    ("worker", "message"),
    [
        ({"keda": {"enabled": True}}, "worker.keda.enabled needs worker.inputList"),
        (
            {"inputList": "apipool:{example}:queue", "keda": {"enabled": True}},
            "the pool's queue is the workers' OUTPUT",
        ),
        (
            {"inputList": "apipool:{example}:queue", "autoscaling": {"enabled": True}},
            "the pool's queue is the workers' OUTPUT",
        ),
        (
            {
                "inputList": INPUT,
                "autoscaling": {"enabled": True, "external": EXTERNAL},
                "keda": {"enabled": True},
            },
            EXCLUSIVE_MESSAGE,
        ),
    ],
)
def test_bad_autoscaling_fails_with_a_clear_message(
    chart: HelmBinary | HelmPython, worker: dict[str, Any], message: str
) -> None:
    with pytest.raises(RenderError, match=message):
        render(chart, worker)


@pytest.mark.parametrize(
    "autoscaling",
    [
        {"external": {"metricName": "has space", "targetAverageValue": "5"}},
        {"external": {"metricName": "m", "targetAverageValue": "lots"}},
        {"external": {"metricName": "m", "targetAverageValue": 5}},
        {"external": {"metricName": "m", "targetAverageValue": "5", "selector": {"x": 1}}},
        {"targetCPUUtilizationPercentage": 0},
        {"targetCPUUtilizationPercentage": "80"},
    ],
)
def test_schema_rejects_bad_autoscaling(
    chart: HelmBinary | HelmPython, autoscaling: dict[str, Any]
) -> None:
    with pytest.raises(RenderError):
        chart.validate_schema({"worker": {"autoscaling": autoscaling}})


def test_schema_rejects_a_non_string_input_list(chart: HelmBinary | HelmPython) -> None:
    with pytest.raises(RenderError):
        chart.validate_schema({"worker": {"inputList": 3}})


@pytest.mark.parametrize(
    "worker",
    [
        {"inputList": INPUT, "keda": {"enabled": True}},
        {"inputList": INPUT, "autoscaling": {"enabled": True, "external": EXTERNAL}},
        {"autoscaling": {"enabled": True, "targetCPUUtilizationPercentage": 80}},
    ],
)
def test_no_mode_measures_the_pools_queue(
    chart: HelmBinary | HelmPython, worker: dict[str, Any]
) -> None:
    for doc in render(chart, worker):
        if doc["kind"] in {"ScaledObject", "HorizontalPodAutoscaler"}:
            assert "apipool:{" not in str(doc), doc
