"""The chart's monitoring: PodMonitors, the PrometheusRule and the Grafana dashboard.

Everything is off by default. Switched on, the PodMonitors must select the pods
the operator really creates (built here by ``manifests.slot_pod`` from the
rendered pool) on the ports they really name; every alert and every dashboard
query must be valid PromQL (``apipool.testing.promql``) over metrics the code
exports (the real registries) or the agreed names of :data:`AGREED_METRICS`.
"""

from __future__ import annotations

import importlib
import json
import pkgutil
import re
from collections.abc import Iterable
from typing import Any

import prometheus_client
import pytest
import yaml
from prometheus_client import CollectorRegistry

import apipool.operator
from apipool.metrics import SlotMetrics
from apipool.operator import manifests
from apipool.operator.spec import parse_spec
from apipool.protocol import Outcome
from apipool.testing import promql

from .test_chart import (
    CHART,
    KUBE_VERSIONS,
    NAMESPACE,
    ROOT,
    HelmBinary,
    HelmPython,
    RenderError,
    helm_backend,
    one,
)
from .test_chart import manifests as documents

pytestmark = pytest.mark.unit

AGREED_METRICS = frozenset(
    {
        "apipool_effective_slots",
        "apipool_slot_parked",
        "apipool_pause_seconds_remaining",
        "apipool_slot_seconds_total",
        "apipool_pool_slots",
        "apipool_pool_ready_slots",
        "apipool_pool_effective_slots",
        "apipool_pool_queue_length",
        "apipool_pool_dead_letters",
        "apipool_pool_utilization",
        "apipool_pool_slot_seconds_total",
    }
)
AGREED_OUTCOMES = frozenset({"throttled"})
"""The agreed names of the throttling and slot-second metrics and of the
``outcome`` of a throttled answer, kept here in one place: a rule or panel may
use them before the code exports them. Every other name must come from a real
registry, every other outcome from :class:`apipool.protocol.Outcome`."""
OUTCOMES = {outcome.value for outcome in Outcome} | AGREED_OUTCOMES
GRAFANA_BUILTINS = frozenset({"__rate_interval", "__interval", "__range"})
MONITORING_KINDS = {"PodMonitor", "PrometheusRule"}
ALL_ON: dict[str, Any] = {
    "monitoring": {
        "slots": {"enabled": True},
        "operator": {"enabled": True},
        "prometheusRule": {"enabled": True},
        "dashboard": {"enabled": True},
    }
}
POOL = {"redis": {"internal": {"enabled": True}}, "pool": {"enabled": True, "name": "billing"}}
RULE_KEYS = {"alert", "expr", "for", "labels", "annotations", "keep_firing_for"}


@pytest.fixture(scope="module")
def chart() -> HelmBinary | HelmPython:
    return helm_backend()


@pytest.fixture(scope="module")
def docs(chart: HelmBinary | HelmPython) -> list[dict[str, Any]]:
    return documents(chart.render({**POOL, **ALL_ON}))


# -- what the code exports -------------------------------------------------------

SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "summary": ("", "_count", "_sum", "_created"),
}


def exported(registry: CollectorRegistry) -> set[str]:
    """The apipool series names a registry serves, labelled children or not."""
    return {
        family.name + suffix
        for family in registry.collect()
        if family.name.startswith("apipool_")
        for suffix in SUFFIXES.get(family.type, ("",))
    }


@pytest.fixture(scope="module")
def known_metrics() -> frozenset[str]:
    """The slot's registry, the operator's (every module of apipool.operator
    imported: they register on the default registry) and the agreed names."""
    for module in pkgutil.iter_modules(apipool.operator.__path__):
        importlib.import_module(f"apipool.operator.{module.name}")
    operator = exported(prometheus_client.REGISTRY)
    assert "apipool_operator_reconciles_total" in operator
    slot = exported(SlotMetrics("p", 0).registry)
    assert "apipool_slot_busy" in slot
    return frozenset(operator | slot | AGREED_METRICS)


def check_queries(
    exprs: Iterable[str], known: frozenset[str], *, grafana: bool = False
) -> set[str]:
    """Every expression parses and names known metrics and outcomes; returns the
    variables used."""
    variables: set[str] = set()
    exprs = list(exprs)
    assert exprs
    for expr in exprs:
        try:
            checked = promql.check(expr, grafana=grafana)
        except promql.PromQLError as exc:
            pytest.fail(f"{expr!r}: {exc}")
        assert checked.type == "vector", expr
        assert checked.metrics, expr
        assert checked.metrics <= known, f"{expr!r}: unknown {checked.metrics - known}"
        assert set(re.findall(r'outcome="(\w+)"', expr)) <= OUTCOMES, expr
        variables |= checked.variables
    return variables


# -- off by default, and each flag alone -------------------------------------------


def monitoring_objects(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        d
        for d in docs
        if d["kind"] in MONITORING_KINDS
        or d["metadata"].get("labels", {}).get("app.kubernetes.io/component") == "monitoring"
    ]


def test_nothing_is_rendered_by_default(chart: HelmBinary | HelmPython) -> None:
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())["monitoring"]
    flags = [defaults[part]["enabled"] for part in ALL_ON["monitoring"]]
    assert flags == [False] * len(flags)
    assert monitoring_objects(documents(chart.render(POOL))) == []


@pytest.mark.parametrize(
    ("part", "kind", "suffix"),
    [
        ("slots", "PodMonitor", "-slots"),
        ("operator", "PodMonitor", "-operator"),
        ("prometheusRule", "PrometheusRule", "-alerts"),
        ("dashboard", "ConfigMap", "-dashboard"),
    ],
)
def test_each_flag_renders_its_object_only(
    chart: HelmBinary | HelmPython, part: str, kind: str, suffix: str
) -> None:
    values = {"monitoring": {part: {"enabled": True}}}
    chart.validate_schema(values)
    (found,) = monitoring_objects(documents(chart.render(values)))
    assert found["kind"] == kind
    assert found["metadata"]["name"] == f"rel-apipool{suffix}"
    assert found["metadata"]["namespace"] == NAMESPACE
    if kind in MONITORING_KINDS:
        assert found["apiVersion"] == "monitoring.coreos.com/v1"
    else:
        import kubernetes_validate

        for version in KUBE_VERSIONS:
            v = kubernetes_validate.latest_version() if version == "latest" else version
            kubernetes_validate.validate(found, v, strict=True)


def test_notes_name_what_monitoring_created(chart: HelmBinary | HelmPython) -> None:
    if isinstance(chart, HelmBinary):
        pytest.skip("helm template does not render NOTES.txt")
    assert "Monitoring" not in chart.render({})["apipool/templates/NOTES.txt"]
    notes = chart.render(ALL_ON)["apipool/templates/NOTES.txt"]
    for name in ("rel-apipool-slots", "rel-apipool-operator", "rel-apipool-alerts"):
        assert name in notes
    assert f"{NAMESPACE}/rel-apipool-dashboard" in notes
    assert "set monitoring.labels" in notes
    labelled = {"monitoring": {**ALL_ON["monitoring"], "labels": {"release": "kube-prom"}}}
    assert "set monitoring.labels" not in chart.render(labelled)["apipool/templates/NOTES.txt"]


def test_extra_labels_reach_the_monitoring_objects(chart: HelmBinary | HelmPython) -> None:
    values = {"monitoring": {**ALL_ON["monitoring"], "labels": {"release": "kube-prom"}}}
    for doc in monitoring_objects(documents(chart.render(values))):
        if doc["kind"] in MONITORING_KINDS:
            assert doc["metadata"]["labels"]["release"] == "kube-prom", doc["kind"]


# -- the PodMonitors select the real pods ---------------------------------------------


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A metav1.LabelSelector (matchLabels, matchExpressions with In/NotIn/Exists/
    DoesNotExist) against a pod's labels."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for term in selector.get("matchExpressions", []):
        value = labels.get(term["key"])
        ok = {
            "In": value in term.get("values", []),
            "NotIn": value not in term.get("values", []),
            "Exists": term["key"] in labels,
            "DoesNotExist": term["key"] not in labels,
        }[term["operator"]]
        if not ok:
            return False
    return True


def container_ports(pod_spec: dict[str, Any]) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for c in pod_spec["containers"] for p in c["ports"]}


def slot_pod(docs: list[dict[str, Any]], index: int = 0) -> dict[str, Any]:
    """The pod the operator makes for the pool the chart rendered."""
    pool = one(docs, "ApiConcurrencyPool")
    name = pool["metadata"]["name"]
    spec = parse_spec(name, pool["spec"])
    return manifests.slot_pod(spec, name, pool["metadata"]["namespace"], index)


def operator_pod(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return dict(one(docs, "Deployment", "-operator")["spec"]["template"])


def test_the_slot_podmonitor_scrapes_every_slot_pod_on_its_health_port(
    docs: list[dict[str, Any]],
) -> None:
    monitor = one(docs, "PodMonitor", "-slots")["spec"]
    for index in (0, 1):
        pod = slot_pod(docs, index)
        assert selects(monitor["selector"], pod["metadata"]["labels"])
        assert monitor["namespaceSelector"]["matchNames"] == [pod["metadata"]["namespace"]]
        (endpoint,) = monitor["podMetricsEndpoints"]
        assert endpoint["port"] in container_ports(pod["spec"])
        assert container_ports(pod["spec"])[endpoint["port"]] == manifests.HEALTH_PORT
        assert endpoint["path"] == "/metrics"
    # Slot pods of another pool too, and never the operator.
    other = manifests.slot_pod(
        parse_spec("other", one(docs, "ApiConcurrencyPool")["spec"]), "other", "x", 0
    )
    assert selects(monitor["selector"], other["metadata"]["labels"])
    assert not selects(monitor["selector"], operator_pod(docs)["metadata"]["labels"])


def test_the_operator_podmonitor_scrapes_the_metrics_port(docs: list[dict[str, Any]]) -> None:
    monitor = one(docs, "PodMonitor", "-operator")["spec"]
    pod = operator_pod(docs)
    assert selects(monitor["selector"], pod["metadata"]["labels"])
    assert not selects(monitor["selector"], slot_pod(docs)["metadata"]["labels"])
    assert monitor["namespaceSelector"]["matchNames"] == [NAMESPACE]
    (endpoint,) = monitor["podMetricsEndpoints"]
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert container_ports(pod["spec"])[endpoint["port"]] == values["operator"]["metricsPort"]
    # The pool series' namespace label is the pool's, not the operator pod's.
    assert endpoint["honorLabels"] is True


@pytest.mark.parametrize(
    ("operator", "expected"),
    [
        ({"watchNamespaces": ["team-a", "team-b"]}, {"matchNames": ["team-a", "team-b"]}),
        ({"watchAllNamespaces": True}, {"any": True}),
    ],
)
def test_the_slot_podmonitor_follows_the_watched_namespaces(
    chart: HelmBinary | HelmPython, operator: dict[str, Any], expected: dict[str, Any]
) -> None:
    values = {"operator": operator, "monitoring": {"slots": {"enabled": True}}}
    monitor = one(documents(chart.render(values)), "PodMonitor", "-slots")
    assert monitor["spec"]["namespaceSelector"] == expected


def test_the_operator_podmonitor_needs_the_metrics_port(chart: HelmBinary | HelmPython) -> None:
    values = {"operator": {"metricsPort": 0}, "monitoring": {"operator": {"enabled": True}}}
    with pytest.raises(RenderError, match=r"operator\.metricsPort"):
        chart.render(values)


# -- the alerts ---------------------------------------------------------------------


def rules(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    (group,) = one(docs, "PrometheusRule")["spec"]["groups"]
    return list(group["rules"])


def anchors(markdown: str) -> set[str]:
    """GitHub's anchors of a Markdown file's headings."""
    prose = re.sub(r"^```.*?^```", "", markdown, flags=re.MULTILINE | re.DOTALL)
    headings = re.findall(r"^#+ (.+)$", prose, re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_the_alerts_are_valid_promql_over_exported_metrics(
    docs: list[dict[str, Any]], known_metrics: frozenset[str]
) -> None:
    found = rules(docs)
    assert [r["alert"] for r in found] == [
        "ApipoolCapacityIdle",
        "ApipoolDeadLetters",
        "ApipoolThrottled",
        "ApipoolSlotDown",
    ]
    check_queries((r["expr"] for r in found), known_metrics)
    for rule in found:
        assert set(rule) <= RULE_KEYS, rule["alert"]
        assert promql.DURATION.fullmatch(rule["for"]), rule["for"]


def test_every_alert_names_the_pool_and_has_a_runbook(docs: list[dict[str, Any]]) -> None:
    runbook = anchors((ROOT / "docs" / "operations.md").read_text())
    for rule in rules(docs):
        what = rule["alert"]
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, what
        assert "by (namespace, pool)" in rule["expr"], what
        for key in ("summary", "description"):
            assert "{{ $labels.pool }}" in rule["annotations"][key], what
            assert "{{ $labels.namespace }}" in rule["annotations"][key], what
        page, anchor = rule["annotations"]["runbook_url"].split("#")
        assert page == "docs/operations.md"
        assert anchor == what.lower(), what
        assert anchor in runbook, what


def test_alert_thresholds_and_durations_come_from_values(chart: HelmBinary | HelmPython) -> None:
    values = {
        "monitoring": {
            "prometheusRule": {
                "enabled": True,
                "runbookUrl": "https://docs.example/ops.html",
                "capacityIdle": {"threshold": 0.5, "for": "7m", "severity": "critical"},
                "deadLetters": {"threshold": 12, "window": "1h", "for": "2m", "severity": "info"},
                "throttled": {"threshold": 0.1, "window": "2m", "for": "3m", "severity": "info"},
                "slotDown": {"for": "45s", "severity": "warning"},
            }
        }
    }
    chart.validate_schema(values)
    found = {r["alert"]: r for r in rules(documents(chart.render(values)))}
    idle, dead = found["ApipoolCapacityIdle"], found["ApipoolDeadLetters"]
    assert "(apipool_pool_utilization) < 0.5\n" in idle["expr"]
    assert (idle["for"], idle["labels"]["severity"]) == ("7m", "critical")
    assert dead["expr"].count("[1h])) > 12)") == 2
    assert found["ApipoolThrottled"]["expr"].rstrip().endswith("> 0.1")
    assert found["ApipoolSlotDown"]["for"] == "45s"
    for rule in found.values():
        promql.check(rule["expr"])
        assert rule["annotations"]["runbook_url"].startswith("https://docs.example/ops.html#")


@pytest.mark.parametrize(
    "monitoring",
    [
        {"prometheusRule": {"capacityIdle": {"threshold": 1.5}}},
        {"prometheusRule": {"slotDown": {"for": "5 minutes"}}},
        {"prometheusRule": {"throttled": {"severity": "page"}}},
        {"prometheusRule": {"deadLetters": {"threshold": -1}}},
        {"slots": {"interval": "15"}},
        {"dashboard": {"label": "not a label"}},
        {"dashboard": {"labelValue": 1}},
        {"grafana": {"enabled": True}},
    ],
)
def test_the_schema_rejects_bad_monitoring_values(
    chart: HelmBinary | HelmPython, monitoring: dict[str, Any]
) -> None:
    with pytest.raises(RenderError):
        chart.validate_schema({"monitoring": monitoring})


# -- the dashboard ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def dashboard(docs: list[dict[str, Any]]) -> dict[str, Any]:
    config_map = one(docs, "ConfigMap", "-dashboard")
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    (text,) = config_map["data"].values()
    loaded = json.loads(text)
    assert loaded == json.loads((CHART / "dashboards" / "apipool.json").read_text())
    return dict(loaded)


def targets(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [t for panel in dashboard["panels"] for t in panel["targets"]]


def test_the_dashboard_is_identified_and_uses_a_datasource_variable(
    dashboard: dict[str, Any],
) -> None:
    assert dashboard["uid"]
    assert dashboard["title"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert {"namespace", "pool"} <= set(variables)
    source = {"type": "prometheus", "uid": "${datasource}"}
    for panel in dashboard["panels"]:
        assert panel["datasource"] == source, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == source, panel["title"]
    for variable in variables.values():
        if variable["type"] == "query":
            assert variable["datasource"] == source, variable["name"]


def test_every_dashboard_query_is_valid_promql_over_exported_metrics(
    dashboard: dict[str, Any], known_metrics: frozenset[str]
) -> None:
    exprs = [t["expr"] for t in targets(dashboard)]
    used = check_queries(exprs, known_metrics, grafana=True)
    defined = {v["name"] for v in dashboard["templating"]["list"]}
    assert used - GRAFANA_BUILTINS <= defined, used - GRAFANA_BUILTINS - defined
    assert {"namespace", "pool"} <= used
    # Each panel filters on the chosen namespace and pool.
    for expr in exprs:
        assert 'namespace=~"$namespace"' in expr, expr
        assert 'pool=~"$pool"' in expr, expr


def test_the_dashboard_variables_are_label_values_of_exported_metrics(
    dashboard: dict[str, Any], known_metrics: frozenset[str]
) -> None:
    for variable in dashboard["templating"]["list"]:
        if variable["type"] != "query":
            continue
        found = re.fullmatch(r"label_values\((.+), (\w+)\)", variable["query"]["query"])
        assert found, variable["query"]
        selector, label = found.groups()
        assert label == variable["name"]
        check_queries([selector], known_metrics, grafana=True)


def test_the_dashboard_shows_what_operators_ask_for(dashboard: dict[str, Any]) -> None:
    """In flight against N, the slot-second states stacked, queue, 429s, dead letters."""
    metrics = {
        p["title"]: set().union(
            *(promql.check(t["expr"], grafana=True).metrics for t in p["targets"])
        )
        for p in dashboard["panels"]
    }
    wanted = [
        {"apipool_slot_busy", "apipool_pool_slots", "apipool_pool_effective_slots"},
        {"apipool_pool_slot_seconds_total"},
        {"apipool_pool_queue_length"},
        {"apipool_calls_total"},
        {"apipool_pool_dead_letters"},
        {"apipool_pool_utilization"},
    ]
    for names in wanted:
        assert any(names <= used for used in metrics.values()), names
    states = next(
        p for p in dashboard["panels"] if "apipool_pool_slot_seconds_total" in metrics[p["title"]]
    )
    assert states["fieldConfig"]["defaults"]["custom"]["stacking"]["mode"] == "normal"
    assert any('outcome="throttled"' in t["expr"] for t in targets(dashboard))


def test_the_dashboard_label_and_namespace_are_configurable(
    chart: HelmBinary | HelmPython,
) -> None:
    values = {
        "monitoring": {
            "dashboard": {
                "enabled": True,
                "label": "grafana.example/dashboard",
                "labelValue": "apipool",
                "namespace": "grafana",
                "annotations": {"grafana_folder": "apipool"},
            }
        }
    }
    chart.validate_schema(values)
    config_map = one(documents(chart.render(values)), "ConfigMap", "-dashboard")
    assert config_map["metadata"]["namespace"] == "grafana"
    assert config_map["metadata"]["labels"]["grafana.example/dashboard"] == "apipool"
    assert "grafana_dashboard" not in config_map["metadata"]["labels"]
    assert config_map["metadata"]["annotations"] == {"grafana_folder": "apipool"}
