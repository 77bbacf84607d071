"""``apipool operator``: kopf running this operator's registry."""

from __future__ import annotations

import logging

import kopf

from .config import OperatorSettings
from .controller import build_registry


def run_operator() -> int:
    """Read the settings (``APIPOOL_*``) once, build the registry, run kopf until
    it is stopped; the exit status is 0."""
    settings = OperatorSettings.from_env()
    registry = build_registry(settings)
    logging.getLogger("kubernetes").setLevel(logging.WARNING)
    kopf.configure(verbose=False)
    kopf.run(
        registry=registry,
        standalone=True,  # one replica, no peering
        clusterwide=not settings.watch_namespaces,
        namespaces=list(settings.watch_namespaces),
        liveness_endpoint=settings.liveness_endpoint or None,
    )
    return 0
