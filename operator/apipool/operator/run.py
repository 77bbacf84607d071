"""``apipool operator``: kopf running the handlers of this package."""

from __future__ import annotations

import logging

import kopf

from .config import OperatorSettings


def run_operator() -> int:
    settings = OperatorSettings.from_env()
    from . import handlers  # noqa: F401  (registers the handlers with kopf)

    logging.getLogger("kubernetes").setLevel(logging.WARNING)
    kopf.configure(verbose=False)
    kopf.run(
        standalone=True,  # one replica, no peering
        clusterwide=not settings.watch_namespaces,
        namespaces=list(settings.watch_namespaces),
        liveness_endpoint=settings.liveness_endpoint or None,
    )
    return 0
