"""The kopf wiring: which events reconcile which pool, in one explicit registry.

:func:`build_registry` registers every handler of the operator with a new
``kopf.OperatorRegistry`` and returns it; nothing is registered at import, and
nothing here reads the environment. Each entry point (a pool created, changed or
resumed; a slot pod's event; the self-healing timer) runs the same
:meth:`Reconciler.reconcile` (a pod event through :meth:`Reconciler.nudge`, so
that a burst of them while a reconcile runs costs one more, not one each);
deleting a pool removes its pods and its memory.

The pod watch carries a server-side label selector (the slot pods' base labels,
:data:`SLOT_POD_SELECTOR`): the API server sends the events of slot pods only,
not of every pod in the watched namespaces.

The handler ids are fixed strings: kopf keeps its progress on each pool under
them, so they stay the same whatever the functions here are called.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import kopf
from prometheus_client import start_http_server

from .config import OperatorSettings
from .manifests import BASE_LABELS, LABEL_POOL
from .reconcile import Reconciler
from .spec import GROUP, PLURAL, VERSION

SLOT_POD_SELECTOR = ",".join(f"{k}={v}" for k, v in BASE_LABELS.items())
"""The server-side label selector of kopf's pod watch (and list)."""
WATCH_SERVER_TIMEOUT = 300
"""Seconds after which the API server ends a watch: kopf lists again at least this often."""


def configure_kopf(settings: kopf.OperatorSettings) -> None:
    """kopf's own settings for this operator."""
    # Our status has a schema: keep kopf's own bookkeeping in annotations.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration"
    )
    settings.posting.level = logging.INFO
    settings.watching.server_timeout = WATCH_SERVER_TIMEOUT
    settings.watching.client_timeout = WATCH_SERVER_TIMEOUT + 30
    settings.watching.label_selectors["v1", "pods"] = SLOT_POD_SELECTOR


def build_registry(
    settings: OperatorSettings, reconciler: Reconciler | None = None
) -> kopf.OperatorRegistry:
    """A registry with the operator's handlers, for ``kopf.run``/``kopf.operator``.

    ``reconciler`` (default: a new one for ``settings``) does the work; pass one
    to look at its state, as the tests do. The timer ticks every
    ``settings.timer_interval`` seconds per pool."""
    registry = kopf.OperatorRegistry()
    pools = reconciler if reconciler is not None else Reconciler(settings)
    _register_lifecycle(registry, settings, pools)
    _register_pool_handlers(registry, settings, pools)
    return registry


def _register_lifecycle(
    registry: kopf.OperatorRegistry, settings: OperatorSettings, pools: Reconciler
) -> None:
    metrics_port = settings.metrics_port

    @kopf.on.startup(id="configure", registry=registry)
    def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        """kopf's settings, the API client's configuration, the metrics endpoint."""
        configure_kopf(settings)
        pools.connect()
        if metrics_port:
            start_http_server(metrics_port)

    # A registry of our own has no login handler unless it is given one.
    kopf.on.login(id="login_via_client", registry=registry, errors=kopf.ErrorsMode.IGNORED)(
        kopf.login_via_client
    )


def _register_pool_handlers(
    registry: kopf.OperatorRegistry, settings: OperatorSettings, pools: Reconciler
) -> None:
    @kopf.on.create(GROUP, VERSION, PLURAL, id="pool_changed", registry=registry)
    @kopf.on.update(GROUP, VERSION, PLURAL, id="pool_changed", registry=registry)
    @kopf.on.resume(GROUP, VERSION, PLURAL, id="pool_changed", registry=registry)
    def pool_changed(name: str, namespace: str | None, **_: Any) -> None:
        if namespace is not None:
            pools.reconcile(namespace, name, retry_problems=True)

    @kopf.timer(
        GROUP,
        VERSION,
        PLURAL,
        id="pool_timer",
        interval=settings.timer_interval,
        sharp=False,
        registry=registry,
    )
    def pool_timer(name: str, namespace: str | None, **_: Any) -> None:
        """Self-healing: catches whatever an event missed."""
        if namespace is not None:
            pools.reconcile(namespace, name)

    @kopf.on.event(
        "",
        "v1",
        "pods",
        id="slot_pod_event",
        labels={**BASE_LABELS, LABEL_POOL: kopf.PRESENT},
        registry=registry,
    )
    def slot_pod_event(namespace: str | None, labels: Mapping[str, str], **_: Any) -> None:
        """A slot pod changed or went away: reconcile its pool at once."""
        pool = labels.get(LABEL_POOL)
        if pool and namespace:
            pools.nudge(namespace, pool)  # reads the pool itself; gone or deleting: nothing

    @kopf.on.delete(GROUP, VERSION, PLURAL, id="pool_deleted", optional=True, registry=registry)
    def pool_deleted(name: str, namespace: str | None, **_: Any) -> None:
        """Ownership lets the garbage collector remove the pods; this is quicker."""
        if namespace is not None:
            pools.remove(namespace, name)
